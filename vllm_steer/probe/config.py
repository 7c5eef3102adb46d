"""``ProbeConfig``: how to probe, validated once (types and ranges, each error names the
field) whether it comes from Python, a YAML experiment or the server's JSON body."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.reading import DEFAULT_MIN_MASS
from vllm_steer.probe.triggers import MAX_MARKER_CHARS, MAX_MARKERS, TRIGGERS

#: vLLM's default ``max_logprobs``: the most top tokens a flagged reading can ask for.
MAX_TOP_K = 20
#: ``every`` when ``trigger`` is ``"every"`` and none is given.
DEFAULT_EVERY = 16
#: Fork placement (``forks.place_point``): exact, or back onto a KV-block boundary.
ALIGNS = ("none", "prefix", "base", "block")


def check_int(v: Any, name: str, lo: int, hi: int | None = None) -> None:
    """An int (not a bool) in ``[lo, hi]``, else ``ProbeError`` naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProbeError(name, f"must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ProbeError(name, f"must be {bound}, got {v}")


def check_number(v: Any, name: str, lo: float, hi: float) -> None:
    """A finite number (not a bool) in ``[lo, hi]``, else ``ProbeError``."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise ProbeError(name, f"must be a number in [{lo:g}, {hi:g}], got {v!r}")


def check_bool(v: Any, name: str) -> None:
    """``True`` or ``False``, else ``ProbeError``."""
    if not isinstance(v, bool):
        raise ProbeError(name, f"must be true or false, got {v!r}")


def _text(v: Any, name: str, *, nullable: bool = False) -> None:
    if v is None and nullable:
        return
    if not isinstance(v, str) or not v:
        raise ProbeError(name, "must be a non-empty string" + (" or null" if nullable else ""))


@dataclass
class ProbeConfig:
    """How to probe.

    ``choices``: answer strings (single- or multi-token, see ``choices``); ``trigger``:
    where to fork (``triggers``): ``"every"`` ``every`` generated tokens (default 16), or
    ``"steps"``: where the decoded text reaches a reasoning step (``markers``; None: the
    defaults, ``triggers.DEFAULT_MARKERS``), skipping steps closer than ``min_spacing``
    tokens to the previous reading, with ``every`` (None: none) as an "at least every N
    tokens" fallback; the start and the end are read either way. ``align``: ``"none"``
    forks exactly there; ``"prefix"`` / ``"base"`` move each trigger's fork back to where
    the sequence prefix / the whole fork base ends on a KV block (computes only what the
    cache cannot supply, reading up to a block earlier); ``"block"``: ``"base"`` for
    multi-token choices, else ``"prefix"``. ``suffix``: forcing text appended at each
    fork (``None``, one-shot readings only: read right after the prompt); ``max_tokens``:
    trajectory length; ``min_mass``: readings whose choices hold less probability are flagged and
    re-asked for their ``top_k_flagged`` top tokens (0: not re-asked);
    ``think_start``/``think_end``: the thinking-section markers (a fork inside an open
    section appends ``think_end``; None: the tokenizer's own, see ``vllm_steer.thinking``);
    ``temperature``/``seed``/``ignore_eos``: trajectory
    sampling. ``steer_suffix``: whether the fork's inserted ``think_end``, the suffix and
    the choice tokens are steered like the trajectory's own next tokens would be (default
    True, as if the model had written them itself). False steers only the trajectory's
    tokens; its forks cannot share the trajectory's prefix-cache blocks (the cache salt
    covers the steered range) and recompute their prefix.
    """

    choices: list[str] = field(default_factory=lambda: ["Yes", "No"])
    every: int | None = None
    suffix: str | None = "\nThe final answer is"
    max_tokens: int = 256
    min_mass: float = DEFAULT_MIN_MASS
    think_start: str | None = None
    think_end: str | None = None
    temperature: float = 0.0
    seed: int = 0
    top_k_flagged: int = 5
    ignore_eos: bool = False
    steer_suffix: bool = True
    trigger: str = "every"
    markers: list[str] | None = None
    min_spacing: int = 0
    align: str = "none"

    def __post_init__(self) -> None:
        if self.every is None and self.trigger == "every":
            self.every = DEFAULT_EVERY

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> ProbeConfig:
        """Build and validate from a mapping; unknown keys are errors (``prefix`` is
        prepended to the field names in errors, e.g. ``"probe."``)."""
        if not isinstance(d, dict):
            raise ProbeError(prefix.rstrip(".") or "probe", "must be a mapping")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ProbeError(prefix + unknown[0], f"unknown field (known: {', '.join(known)})")
        cfg = cls(**d)
        try:
            cfg.validate()
        except ProbeError as e:
            raise ProbeError(prefix + e.field, str(e).split(": ", 1)[1]) from None
        return cfg

    def validate(self) -> None:
        """Raise ``ProbeError`` naming the first bad field."""
        if not isinstance(self.choices, list | tuple) or not self.choices or not all(
                isinstance(c, str) for c in self.choices):
            raise ProbeError("choices", "must be a non-empty list of strings")
        if self.trigger not in TRIGGERS:
            raise ProbeError("trigger", f"{self.trigger!r} is not one of {', '.join(TRIGGERS)}")
        if self.every is not None or self.trigger == "every":
            check_int(self.every, "every", 1)
        if self.markers is not None:
            if self.trigger != "steps":
                raise ProbeError("markers", "only applies to trigger 'steps'")
            if not isinstance(self.markers, list | tuple) or not self.markers or len(
                    self.markers) > MAX_MARKERS or not all(
                    isinstance(m, str) and 0 < len(m) <= MAX_MARKER_CHARS
                    for m in self.markers):
                raise ProbeError("markers", f"must be a list of 1 to {MAX_MARKERS} non-empty "
                                 f"strings of at most {MAX_MARKER_CHARS} characters")
        check_int(self.min_spacing, "min_spacing", 0)
        if self.min_spacing and self.trigger != "steps":
            raise ProbeError("min_spacing", "only applies to trigger 'steps'")
        if self.align not in ALIGNS:
            raise ProbeError("align", f"{self.align!r} is not one of {', '.join(ALIGNS)}")
        if self.suffix is not None and not isinstance(self.suffix, str):
            raise ProbeError("suffix", "must be a string or null")
        if self.suffix == "":
            raise ProbeError("suffix", "must not be empty (use null to read right after a "
                             "one-shot prompt)")
        check_int(self.max_tokens, "max_tokens", 1)
        check_number(self.min_mass, "min_mass", 0.0, 1.0)
        _text(self.think_start, "think_start", nullable=True)
        _text(self.think_end, "think_end", nullable=True)
        check_number(self.temperature, "temperature", 0.0, 100.0)
        check_int(self.seed, "seed", 0)  # vLLM seeds its generator with it
        check_int(self.top_k_flagged, "top_k_flagged", 0, MAX_TOP_K)
        check_bool(self.ignore_eos, "ignore_eos")
        check_bool(self.steer_suffix, "steer_suffix")

    def to_json(self) -> dict[str, Any]:
        """Every field, as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

"""One probe reading: per-choice log-probabilities, normalized probabilities, log ratio
and the probability mass of all choices."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: Below this total probability of all choice variants a reading is flagged.
DEFAULT_MIN_MASS = 0.05


def logsumexp(xs: Sequence[float]) -> float:
    m = max(xs, default=-math.inf)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


@dataclass
class Reading:
    """A reading at one probe point (natural logs, full-vocabulary probabilities).

    ``logprobs[c]``: log P(c), logsumexp over c's variants of the sum of each variant's
    token log-probs; ``normalized[c]``: ``logprobs[c] - logsumexp(logprobs)``;
    ``probs[c]``: ``exp(normalized[c])`` = p_c / sum of p over the choices; ``log_ratio``:
    ``logprobs[c0] - logprobs[c1]`` for two choices, else None (also None when both are
    impossible, never NaN); ``mass``: total probability of all choices (low mass: the
    model would not answer with any of them, and the reading means little).
    ``cached_tokens``: prefix-cache hits of the point's head fork; ``requests`` and
    ``computed_tokens``: engine requests and prompt tokens computed (not cached) for this
    point over all its forks (vLLM's ``num_cached_tokens`` of each). ``trigger``: what
    placed the reading (``start``, ``every``, ``step``, ``end``; ``once`` for a one-shot
    reading), ``marker``: the step's marker text, ``trigger_index``: where the trigger
    fired (``token_index`` is where the fork went: earlier when moved out of a thinking
    marker or onto a KV-block boundary).
    """

    token_index: int
    in_thinking: bool
    logprobs: dict[str, float]
    normalized: dict[str, float]
    probs: dict[str, float]
    log_ratio: float | None
    mass: float
    low_mass: bool
    top_tokens: list[tuple[str, float]] | None = None
    cached_tokens: int = 0
    requests: int = 1
    computed_tokens: int = 0
    trigger: str = "every"
    marker: str | None = None
    trigger_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Reading:
        """Back from ``to_json`` (null log-probs are impossible choices; unknown keys, such
        as a live reading's ``index``, are left out)."""
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("logprobs", "normalized"):
            kw[key] = {c: (-math.inf if v is None else v) for c, v in kw[key].items()}
        if kw.get("top_tokens") is not None:
            kw["top_tokens"] = [tuple(t) for t in kw["top_tokens"]]
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        """The reading as JSON (impossible choices' log-probs as null: JSON has no -inf)."""
        d = asdict(self)
        # JSON has no -inf: impossible choices are reported as null.
        for key in ("logprobs", "normalized"):
            d[key] = {k: (v if math.isfinite(v) else None) for k, v in d[key].items()}
        return d


def make_reading(choices: Sequence[str], variant_logprobs: Sequence[Sequence[float]], *,
                 token_index: int, in_thinking: bool, min_mass: float = DEFAULT_MIN_MASS,
                 cached_tokens: int = 0, requests: int = 1,
                 computed_tokens: int = 0, trigger: str = "every", marker: str | None = None,
                 trigger_index: int | None = None) -> Reading:
    """Fold ``variant_logprobs[k][v]`` (log P of variant ``v`` of choice ``k``) into a
    ``Reading``."""
    per = {c: logsumexp(list(lps)) for c, lps in zip(choices, variant_logprobs, strict=True)}
    total = logsumexp(list(per.values()))
    mass = math.exp(total) if total > -math.inf else 0.0
    norm = {c: (v - total if total > -math.inf else -math.inf) for c, v in per.items()}
    probs = {c: math.exp(v) for c, v in norm.items()}
    ratio = None
    if len(per) == 2:
        a, b = per.values()
        if math.isfinite(a) and math.isfinite(b):
            ratio = a - b
    return Reading(token_index, in_thinking, per, norm, probs, ratio, mass, mass < min_mass,
                   cached_tokens=cached_tokens, requests=requests,
                   computed_tokens=computed_tokens, trigger=trigger, marker=marker,
                   trigger_index=token_index if trigger_index is None else trigger_index)

"""The resolved steering as it travels from the frontend to the workers: ``WireSteering``.

vLLM carries ``SamplingParams.extra_args`` to the engine core and its workers either as
msgpack (multiprocess engine) or by reference (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The
struct therefore travels as msgspec builtins (``to_extra_arg``: a dict keyed by the field
names, ``delta`` kept as raw bytes), and the worker rebuilds it with ``from_extra_arg``,
which type-checks every field (msgspec) and validates shapes and values; both transports
give the worker the same typed, checked value. A malformed wire is refused with
``WireError`` naming the field, never steered as best it can.

Version 2 carries the request's *program* (``steering.program``): its vectors by content
id with op, parameter and layers, a few hundred bytes whatever the model size. Workers
read the vectors from the content-addressed store (``steering.store``; its root travels
in ``store``) the first time they see an id, or from ``inline`` when the transport is
inline (engines on several machines without shared storage). Extending it: add fields
with defaults and bump ``WIRE_VERSION`` when the meaning of existing ones changes; a
worker refuses fields and versions it does not know. vLLM-free.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from vllm_steer.steering.condition import AGGREGATES, COMPARES, MAX_CONDITIONS, RULE_MODES
from vllm_steer.steering.program import Part, Program
from vllm_steer.steering.values import OPS

#: Version of the struct's meaning; a worker refuses any other.
WIRE_VERSION = 2
#: Token-selection modes after resolution (``prompt``/``generated`` become ``all`` + positions).
WIRE_MODES = ("all", "thinking", "answer")
#: ``end`` value meaning "no end position".
NO_END = -1
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_MAX_ID = 2**63 - 1


class WireError(ValueError):
    """A malformed wire steering; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"vllm-steer: malformed steering wire, field {field!r}: {message}")
        self.field = field


class WirePart(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One vector of the program: store ``content`` id, ``op``, ``param`` (scale, strength
    or value) and strictly increasing ``layers``."""

    content: str
    op: str
    param: float
    layers: tuple[int, ...]


class WireVector(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A vector's content sent inline: float32 little-endian ``[len(layers), hidden]``."""

    content: str
    layers: tuple[int, ...]
    data: bytes


class WireCondition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One condition (``steering.condition``): the direction's store ``content`` id (read at
    ``layer``), ``aggregate`` (``mean``/``last``), ``threshold``, ``compare``
    (``above``/``below``) and the ``label`` its report carries."""

    content: str
    layer: int
    aggregate: str
    threshold: float
    compare: str
    label: str = ""


class WireGate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The gated part of a request: positions below ``split`` are its prompt (steered by
    the prompt program, if any); the request's ``parts`` steer its selected generated
    tokens when the rule holds, ``else_parts`` when it does not. The rule is ``conditions``
    combined by ``mode`` (``all``/``any``), read from the prompt, or a replay's fixed
    ``decision`` (1 holds, 0 not; -1: decided by the conditions). ``report``: the key the
    scores are collected by (the request id the caller gave). An empty digest means "no
    steering" for that program."""

    conditions: tuple[WireCondition, ...] = ()
    mode: str = "all"
    decision: int = -1
    else_digest: str = ""
    else_parts: tuple[WirePart, ...] = ()
    prompt_digest: str = ""
    prompt_parts: tuple[WirePart, ...] = ()
    split: int = 0
    report: str = ""
    #: The request's ``n``: with more than one, vLLM runs each choice as a request
    #: ``"{index}_{parent id}"`` and reports carry that index.
    choices: int = 1

    def check(self) -> None:
        """Checks that need no model (``WireError`` naming ``gate.<field>``)."""
        if self.decision not in (-1, 0, 1):
            raise WireError("gate.decision", f"{self.decision} is not -1, 0 or 1")
        if (self.decision == -1) == (not self.conditions):
            raise WireError("gate.conditions", "conditions are needed exactly when there is no "
                                               "decision")
        if len(self.conditions) > MAX_CONDITIONS:
            raise WireError("gate.conditions", f"more than {MAX_CONDITIONS}")
        if self.mode not in RULE_MODES:
            raise WireError("gate.mode", f"{self.mode!r} is not one of {', '.join(RULE_MODES)}")
        for k, c in enumerate(self.conditions):
            where = f"gate.conditions[{k}]"
            if not _DIGEST_RE.fullmatch(c.content):
                raise WireError(f"{where}.content", "not a sha256 hex digest")
            if c.layer < 0:
                raise WireError(f"{where}.layer", f"negative layer {c.layer}")
            if c.aggregate not in AGGREGATES:
                raise WireError(f"{where}.aggregate", f"{c.aggregate!r}")
            if c.compare not in COMPARES:
                raise WireError(f"{where}.compare", f"{c.compare!r}")
            if not (math.isfinite(c.threshold) and -1.0 <= c.threshold <= 1.0):
                raise WireError(f"{where}.threshold", f"{c.threshold} is not in [-1, 1]")
        for name in ("else", "prompt"):
            digest, parts = getattr(self, f"{name}_digest"), getattr(self, f"{name}_parts")
            if bool(digest) != bool(parts):
                raise WireError(f"gate.{name}_digest", "given exactly when there are parts")
            if digest and not _DIGEST_RE.fullmatch(digest):
                raise WireError(f"gate.{name}_digest", "not a sha256 hex digest")
            for k, p in enumerate(parts):
                _check_part(p, f"gate.{name}_parts[{k}]")
        if self.split < 0:
            raise WireError("gate.split", f"negative position {self.split}")
        if len(self.report) > 1024:
            raise WireError("gate.report", "longer than 1024 characters")
        if self.choices < 1:
            raise WireError("gate.choices", f"{self.choices} is not a number of choices")

    @property
    def needs_whole_prompt(self) -> bool:
        """A ``mean`` condition reads every prompt token (no prefix-cache hit may skip one)."""
        return self.decision == -1 and any(c.aggregate == "mean" for c in self.conditions)


class WireSteering(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One request's resolved steering, as the workers need it.

    ``digest``: sha256 of the program (the worker's slot key); ``hidden``: the model's hidden
    size; ``parts`` + ``normalize``: the program; ``mode``: one of ``WIRE_MODES``; positions
    ``start <= pos < end`` (``end == NO_END``: unbounded); ``think_start_ids`` /
    ``think_end_ids``: marker token ids (non-empty for ``thinking``/``answer``); ``store``:
    root of the vector store; ``inline``: vector contents sent with the request (inline
    transport only).
    """

    version: int
    digest: str
    hidden: int
    parts: tuple[WirePart, ...]
    normalize: bool
    mode: str
    start: int
    end: int
    think_start_ids: tuple[int, ...] = ()
    think_end_ids: tuple[int, ...] = ()
    store: str = ""
    inline: tuple[WireVector, ...] = ()
    #: Conditional steering (``WireGate``), else None.
    gate: WireGate | None = None

    def __post_init__(self) -> None:
        # Checks that need no model; run on construction (frontend) and on conversion
        # (worker). msgspec turns a ValueError here into its ValidationError.
        if self.version != WIRE_VERSION:
            raise WireError("version", f"{self.version} is not the supported version "
                                       f"{WIRE_VERSION} (frontend and worker differ?)")
        if not _DIGEST_RE.fullmatch(self.digest):
            raise WireError("digest", "not a sha256 hex digest")
        if self.hidden <= 0:
            raise WireError("hidden", f"{self.hidden} is not a hidden size")
        if not self.parts:
            raise WireError("parts", "empty")
        for k, p in enumerate(self.parts):
            _check_part(p, f"parts[{k}]")
        if self.gate is not None:
            self.gate.check()
        for k, v in enumerate(self.inline):
            if not _DIGEST_RE.fullmatch(v.content):
                raise WireError(f"inline[{k}].content", "not a sha256 hex digest")
            _check_layers(v.layers, f"inline[{k}].layers")
            if len(v.data) != len(v.layers) * self.hidden * 4:
                raise WireError(f"inline[{k}].data", f"{len(v.data)} bytes, expected "
                                f"float32 [{len(v.layers)}, {self.hidden}]")
        if not self.inline and not self.store:
            raise WireError("store", "empty, and no vectors are sent inline")
        if self.mode not in WIRE_MODES:
            raise WireError("mode", f"{self.mode!r} is not one of {', '.join(WIRE_MODES)}")
        if self.start < 0:
            raise WireError("start", f"negative position {self.start}")
        if self.end < NO_END:
            raise WireError("end", f"{self.end} is neither a position nor {NO_END} (no end)")
        for name in ("think_start_ids", "think_end_ids"):
            ids = getattr(self, name)
            if self.mode != "all" and not ids:
                raise WireError(name, f"empty, but mode {self.mode!r} needs the marker")
            if any(not 0 <= i <= _MAX_ID for i in ids):
                raise WireError(name, "token ids must be non-negative")

    # -- transport -------------------------------------------------------------------
    def to_extra_arg(self) -> dict[str, Any]:
        """Builtins (dicts, lists, int/float/str/bytes) for ``extra_args`` (an
        unconditioned request's wire has no ``gate`` key: it stays as before)."""
        out = msgspec.to_builtins(self, builtin_types=(bytes,))
        if out.get("gate") is None:
            out.pop("gate", None)
        return out

    @classmethod
    def from_extra_arg(cls, raw: Any) -> WireSteering:
        """Rebuild and validate what ``to_extra_arg`` produced (after msgpack or not)."""
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, WireError):
                raise cause from None
            raise WireError(_path_field(str(e)), str(e)) from None

    # -- worker-side checks ----------------------------------------------------------
    def check_model(self, num_layers: int, hidden: int) -> None:
        """Refuse a wire built for another model shape."""
        if self.hidden != hidden:
            raise WireError("hidden", f"{self.hidden}, but the served model's hidden size "
                                      f"is {hidden}")
        parts = list(self.parts)
        if self.gate is not None:
            parts += [*self.gate.else_parts, *self.gate.prompt_parts]
            bad = [c.layer for c in self.gate.conditions if c.layer >= num_layers]
            if bad:
                raise WireError("gate.conditions", f"layer {bad[0]} out of range: the model "
                                                   f"has {num_layers} layers")
        top = max(p.layers[-1] for p in parts if p.layers)
        if top >= num_layers:
            raise WireError("parts", f"layer {top} out of range: the model has {num_layers} "
                                     "layers")

    def program(self) -> Program:
        """The program, after checking that it matches ``digest`` (the slot key)."""
        r = Program(tuple(Part(p.content, p.op, p.param, p.layers) for p in self.parts),
                   self.normalize)
        if r.digest != self.digest:
            raise WireError("digest", "does not match the program")
        return r

    def gate_program(self, name: str) -> tuple[str, Program] | None:
        """``(digest, program)`` of the gate's ``else`` or ``prompt`` program (with the
        request's ``normalize``), checked against its digest; None when it has none."""
        if self.gate is None:
            return None
        parts = getattr(self.gate, f"{name}_parts")
        if not parts:
            return None
        r = Program(tuple(Part(p.content, p.op, p.param, p.layers) for p in parts),
                    self.normalize)
        if r.digest != getattr(self.gate, f"{name}_digest"):
            raise WireError(f"gate.{name}_digest", "does not match the program")
        return r.digest, r


def _check_part(p: WirePart, where: str) -> None:
    if not _DIGEST_RE.fullmatch(p.content):
        raise WireError(f"{where}.content", "not a sha256 hex digest")
    if p.op not in OPS:
        raise WireError(f"{where}.op", f"{p.op!r} is not one of {', '.join(OPS)}")
    if not math.isfinite(p.param):
        raise WireError(f"{where}.param", "not finite")
    _check_layers(p.layers, f"{where}.layers")


def _check_layers(layers: tuple[int, ...], field: str) -> None:
    if not layers:
        raise WireError(field, "empty")
    if layers[0] < 0:
        raise WireError(field, f"negative layer {layers[0]}")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise WireError(field, f"not strictly increasing: {list(layers)}")


def _path_field(message: str) -> str:
    # msgspec: "Expected `int`, got `str` - at `$.start`" / "... unknown field `x`"
    m = re.search(r"at `\$\.([A-Za-z_]+)", message) or re.search(r"field `([^`]+)`", message)
    return m.group(1) if m else "wire"


def first_read_position(extra_args: dict[str, Any] | None, wire_key: str) -> int | None:
    """The scheduler's cap on a request's prefix-cache hit for its conditions: 0 when a
    ``mean`` condition must read every prompt token, else None. Cheap: reads the wire's
    builtins (``extra_args[wire_key]``) without converting them."""
    if not extra_args:
        return None
    raw = extra_args.get(wire_key)
    gate = raw.get("gate") if isinstance(raw, dict) else None
    if not gate or gate.get("decision", -1) != -1:
        return None
    return 0 if any(c.get("aggregate") == "mean" for c in gate.get("conditions", ())) else None

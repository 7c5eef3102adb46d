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
            if not _DIGEST_RE.fullmatch(p.content):
                raise WireError(f"parts[{k}].content", "not a sha256 hex digest")
            if p.op not in OPS:
                raise WireError(f"parts[{k}].op", f"{p.op!r} is not one of {', '.join(OPS)}")
            if not math.isfinite(p.param):
                raise WireError(f"parts[{k}].param", "not finite")
            _check_layers(p.layers, f"parts[{k}].layers")
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
        """Builtins (dicts, lists, int/float/str/bytes) for ``extra_args``."""
        return msgspec.to_builtins(self, builtin_types=(bytes,))

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
        top = max(p.layers[-1] for p in self.parts if p.layers)
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

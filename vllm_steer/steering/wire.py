"""The resolved steering as it travels from the frontend to the workers: ``WireSteering``.

vLLM carries ``SamplingParams.extra_args`` to the engine core and its workers either as
msgpack (multiprocess engine) or by reference (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The
struct therefore travels as msgspec builtins (``to_extra_arg``: a dict keyed by the field
names, ``delta`` kept as raw bytes), and the worker rebuilds it with ``from_extra_arg``,
which type-checks every field (msgspec) and validates shapes and values; both transports
give the worker the same typed, checked value. A malformed wire is refused with
``WireError`` naming the field, never steered as best it can.

Extending it: add fields with defaults and bump ``WIRE_VERSION`` when the meaning of the
existing ones changes; a worker refuses fields and versions it does not know. ``delta`` is
already optional in the type (a later version may send only the digest of a vector the
worker holds); version 1 always carries it. vLLM-free.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any

import msgspec
import numpy as np

#: Version of the struct's meaning; a worker refuses any other.
WIRE_VERSION = 1
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


def content_digest(layers: tuple[int, ...], delta: np.ndarray) -> str:
    """sha256 of the layer list and the float32 little-endian delta bytes."""
    h = hashlib.sha256()
    h.update(struct.pack(f"<{len(layers)}q", *layers))
    h.update(np.ascontiguousarray(delta, dtype="<f4").tobytes())
    return h.hexdigest()


class WireSteering(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One request's resolved steering, as the workers need it.

    ``digest``: sha256 hex of ``layers`` + ``delta`` (the worker's slot key);
    ``layers``: strictly increasing decoder-layer indices; ``hidden``: the model's hidden
    size; ``delta``: float32 little-endian ``[len(layers), hidden]`` (``sum scale * v``);
    ``mode``: one of ``WIRE_MODES``; positions ``start <= pos < end`` (``end == NO_END``:
    unbounded); ``think_start_ids`` / ``think_end_ids``: marker token ids (non-empty for
    ``thinking``/``answer``).
    """

    version: int
    digest: str
    layers: tuple[int, ...]
    hidden: int
    delta: bytes | None
    mode: str
    start: int
    end: int
    think_start_ids: tuple[int, ...] = ()
    think_end_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Checks that need no model; run on construction (frontend) and on conversion
        # (worker). msgspec turns a ValueError here into its ValidationError.
        if self.version != WIRE_VERSION:
            raise WireError("version", f"{self.version} is not the supported version "
                                       f"{WIRE_VERSION} (frontend and worker differ?)")
        if not _DIGEST_RE.fullmatch(self.digest):
            raise WireError("digest", "not a sha256 hex digest")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise WireError("layers", f"not strictly increasing: {list(self.layers)}")
        if self.layers and self.layers[0] < 0:
            raise WireError("layers", f"negative layer {self.layers[0]}")
        if self.hidden <= 0:
            raise WireError("hidden", f"{self.hidden} is not a hidden size")
        if self.delta is None:
            raise WireError("delta", f"missing (version {WIRE_VERSION} always carries it)")
        want = len(self.layers) * self.hidden * 4
        if len(self.delta) != want:
            raise WireError("delta", f"{len(self.delta)} bytes, expected {want} "
                                     f"(float32 [{len(self.layers)}, {self.hidden}])")
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
        """Builtins (dict of field name -> int/str/bytes/tuple) for ``extra_args``."""
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
        if self.layers and self.layers[-1] >= num_layers:
            raise WireError("layers", f"layer {self.layers[-1]} out of range: the model has "
                                      f"{num_layers} layers")

    def delta_array(self) -> np.ndarray:
        """``delta`` as float32 ``[len(layers), hidden]`` (a copy, writable)."""
        assert self.delta is not None
        return np.frombuffer(self.delta, dtype="<f4").reshape(
            len(self.layers), self.hidden).astype(np.float32, copy=True)

    def verify_content(self) -> np.ndarray:
        """The delta, after checking it is finite and matches ``digest`` (the slot key)."""
        delta = self.delta_array()
        if not np.isfinite(delta).all():
            raise WireError("delta", "non-finite values")
        if content_digest(self.layers, delta) != self.digest:
            raise WireError("digest", "does not match layers + delta")
        return delta


def _path_field(message: str) -> str:
    # msgspec: "Expected `int`, got `str` - at `$.start`" / "... unknown field `x`"
    m = re.search(r"at `\$\.([A-Za-z_]+)", message) or re.search(r"field `([^`]+)`", message)
    return m.group(1) if m else "wire"

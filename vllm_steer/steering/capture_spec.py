"""The hidden-state capture option a request carries, parsed at the edge. vLLM-free.

``SamplingParams.extra_args["capture"]`` (a dict, or the same dict as a JSON string)::

    {"id": "any string naming this capture",      # required: the key to collect it by
     "layers": [10, 12] | "all",                   # decoder-block outputs (default "all")
     "at": "last" | "mean" | "tokens" | "positions",
     "start": 5, "end": 20,                        # mean / tokens: positions start <= p < end
     "positions": [3, 7, -1]}                      # positions: explicit list

- ``last``: the last prompt token (one vector per layer);
- ``mean``: the mean over prompt positions ``[start, end)`` (default the whole prompt);
- ``tokens``: every prompt position in ``[start, end)`` (one vector per position);
- ``positions``: the listed prompt positions (negative ones count from the prompt's end).

Only prompt positions can be captured: they are all computed before the first output
token, so a capture is complete as soon as the request has produced any output. A
request with captured positions never reads those positions from the prefix cache (the
scheduler caps its cache hit at its first captured position); other requests keep theirs.

``CaptureSpec.parse`` checks structure (``SpecError`` naming ``capture.<field>``);
``CaptureSpec.resolve`` checks it against the model and the prompt and returns the wire
form (``WireCapture``) that travels to the workers in ``extra_args[WIRE_CAPTURE_KEY]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vllm_steer.steering.values import SpecError, parse_layers

EXTRA_ARGS_KEY = "capture"
#: Key of the resolved capture the frontend hands to the workers (and the scheduler).
WIRE_CAPTURE_KEY = "_vllm_steer_capture"
WIRE_VERSION = 1
MODES = ("last", "mean", "tokens", "positions")
MAX_ID_CHARS = 256
MAX_SPEC_CHARS = 1 << 20
_KEYS = {"id", "layers", "at", "start", "end", "positions"}
#: Bytes per captured value on the way back (float32).
VALUE_BYTES = 4


def _field(name: str) -> str:
    return f"{EXTRA_ARGS_KEY}.{name}"


def _int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise SpecError(_field(name), f"must be an integer, got {x!r}")
    return x


@dataclass(frozen=True)
class CaptureSpec:
    """A structurally valid capture option (not yet checked against model and prompt)."""

    id: str
    layers: tuple[int, ...] | None  # None: every layer
    at: str = "last"
    start: int | None = None
    end: int | None = None
    positions: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, raw: Any) -> CaptureSpec:
        """Parse ``extra_args["capture"]`` (dict or JSON string); ``SpecError`` names the field."""
        if isinstance(raw, str | bytes):
            if len(raw) > MAX_SPEC_CHARS:
                raise SpecError(EXTRA_ARGS_KEY, f"longer than {MAX_SPEC_CHARS} characters")
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise SpecError(EXTRA_ARGS_KEY, f"malformed JSON ({e})") from e
        if not isinstance(raw, dict):
            raise SpecError(EXTRA_ARGS_KEY, f"must be an object, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in _KEYS)
        if unknown:
            raise SpecError(_field(unknown[0]),
                            f"unknown field (known: {', '.join(sorted(_KEYS))})")
        cid = raw.get("id")
        if not isinstance(cid, str) or not cid:
            raise SpecError(_field("id"), "required: a non-empty string naming this capture "
                                          "(the key its values are collected by)")
        if len(cid) > MAX_ID_CHARS:
            raise SpecError(_field("id"), f"longer than {MAX_ID_CHARS} characters")
        layers = raw.get("layers", "all")
        layer_t = None if layers == "all" else parse_layers(layers, _field("layers"))
        at = raw.get("at", "last")
        if not isinstance(at, str) or at not in MODES:
            raise SpecError(_field("at"), f"{at!r} is not one of {', '.join(MODES)}")
        start = None if raw.get("start") is None else _int(raw["start"], "start")
        end = None if raw.get("end") is None else _int(raw["end"], "end")
        positions = raw.get("positions")
        if at in ("mean", "tokens"):
            if positions is not None:
                raise SpecError(_field("positions"), f"applies to at 'positions', not {at!r} "
                                                     "(give start/end)")
            for name, v in (("start", start), ("end", end)):
                if v is not None and v < 0:
                    raise SpecError(_field(name), f"must be >= 0, got {v}")
            if start is not None and end is not None and end <= start:
                raise SpecError(_field("end"), f"must be greater than start ({start})")
        else:
            for name, v in (("start", start), ("end", end)):
                if v is not None:
                    raise SpecError(_field(name), f"applies to at 'mean' or 'tokens', not {at!r}")
        pos_t = None
        if at == "positions":
            if not isinstance(positions, list) or not positions:
                raise SpecError(_field("positions"), "must be a non-empty list of prompt "
                                                     "positions (negative: from the end)")
            pos_t = tuple(_int(p, "positions") for p in positions)
        elif positions is not None:
            raise SpecError(_field("positions"), f"applies to at 'positions', not {at!r}")
        return cls(cid, layer_t, at, start, end, pos_t)

    def resolve(self, prompt_len: int, num_layers: int, max_bytes: int,
                hidden_size: int) -> WireCapture:
        """Absolute positions for a prompt of ``prompt_len`` tokens on a model with
        ``num_layers`` blocks; refuses a capture larger than ``max_bytes`` (float32)."""
        if prompt_len < 1:
            raise SpecError(EXTRA_ARGS_KEY, "the prompt is empty")
        layers = self.layers if self.layers is not None else tuple(range(num_layers))
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise SpecError(_field("layers"), f"layer {bad[0]} out of range: the model has "
                                              f"{num_layers} layers (0..{num_layers - 1})")
        if self.at == "last":
            positions: tuple[int, ...] | None = (prompt_len - 1,)
            start, end = prompt_len - 1, prompt_len
        elif self.at == "positions":
            assert self.positions is not None
            absolute = []
            for p in self.positions:
                q = p + prompt_len if p < 0 else p
                if not 0 <= q < prompt_len:
                    raise SpecError(_field("positions"), f"position {p} is outside the prompt "
                                    f"({prompt_len} tokens; only prompt positions are captured)")
                absolute.append(q)
            positions = tuple(sorted(set(absolute)))
            start, end = positions[0], positions[-1] + 1
        else:
            positions = None
            start = self.start or 0
            end = prompt_len if self.end is None else self.end
            if end > prompt_len:
                raise SpecError(_field("end"), f"{end} is past the prompt ({prompt_len} tokens; "
                                               "only prompt positions are captured)")
            if start >= end:
                raise SpecError(_field("start"), f"{start} leaves no prompt position before "
                                                 f"end {end}")
        rows = 1 if self.at == "mean" else (len(positions) if positions else end - start)
        size = rows * len(layers) * hidden_size * VALUE_BYTES
        if size > max_bytes:
            raise SpecError(EXTRA_ARGS_KEY, f"captures {size} bytes ({rows} positions x "
                            f"{len(layers)} layers x {hidden_size} floats); the engine allows "
                            f"{max_bytes} per request (option capture_max_bytes)")
        mode = "mean" if self.at == "mean" else "tokens"
        return WireCapture(self.id, tuple(layers), mode, start, end,
                           positions if self.at in ("last", "positions") else None)


@dataclass(frozen=True)
class WireCapture:
    """A resolved capture: what the workers record (``mode`` ``tokens``: each position
    in ``positions``, or every position of ``[start, end)`` when ``positions`` is None;
    ``mean``: the mean over ``[start, end)``) and where the scheduler caps the cache hit
    (``start``, the first captured position)."""

    id: str
    layers: tuple[int, ...]
    mode: str
    start: int
    end: int
    positions: tuple[int, ...] | None = None

    def to_extra_arg(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": WIRE_VERSION, "id": self.id, "layers": list(self.layers),
                             "mode": self.mode, "start": self.start, "end": self.end}
        if self.positions is not None:
            d["positions"] = list(self.positions)
        return d

    @classmethod
    def from_extra_arg(cls, raw: Any) -> WireCapture:
        """Rebuild (and check) a wire capture; ``ValueError`` naming the field otherwise."""
        if not isinstance(raw, dict) or raw.get("v") != WIRE_VERSION:
            raise ValueError(f"{WIRE_CAPTURE_KEY}: not a version-{WIRE_VERSION} capture "
                             f"(a frontend of another vllm-steer version?): {raw!r:.200}")
        try:
            cid, mode = raw["id"], raw["mode"]
            start, end = int(raw["start"]), int(raw["end"])
            layers = tuple(int(x) for x in raw["layers"])
            pos = raw.get("positions")
            positions = None if pos is None else tuple(int(x) for x in pos)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{WIRE_CAPTURE_KEY}: malformed ({e})") from e
        if not isinstance(cid, str) or mode not in ("tokens", "mean") or not 0 <= start < end \
                or not layers:
            raise ValueError(f"{WIRE_CAPTURE_KEY}: malformed {raw!r:.200}")
        if positions is not None and (mode != "tokens" or not positions
                                      or list(positions) != sorted(set(positions))
                                      or positions[0] != start or positions[-1] != end - 1):
            raise ValueError(f"{WIRE_CAPTURE_KEY}: positions inconsistent with start/end")
        return cls(cid, layers, mode, start, end, positions)

    @property
    def num_rows(self) -> int:
        """Vectors per layer the capture returns."""
        if self.mode == "mean":
            return 1
        return len(self.positions) if self.positions is not None else self.end - self.start


def first_captured_position(extra_args: dict[str, Any] | None) -> int | None:
    """The scheduler's cap on a request's prefix-cache hit: its first captured position
    (None for a request without capture). Cheap: no full parse in the scheduler loop."""
    if not extra_args:
        return None
    raw = extra_args.get(WIRE_CAPTURE_KEY)
    if raw is None:
        return None
    return int(raw["start"])


def check_reserved(extra_args: dict[str, Any]) -> None:
    """Users may not set the wire key themselves."""
    if WIRE_CAPTURE_KEY in extra_args:
        raise SpecError(WIRE_CAPTURE_KEY, "is reserved for vllm-steer")

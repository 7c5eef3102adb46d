"""Validation of the values a spec, a registry entry or a vector upload carries: scales and
layer lists. One implementation for all three edges; each maps ``SpecError`` to its own
error type (``VLLMValidationError``, ``RegistryError``, HTTP 400) keeping the field name.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_ABS_SCALE = 1000.0


class SpecError(ValueError):
    """A malformed steering value. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def _number(x: Any, field: str) -> float:
    """``x`` as a float: an int, a float or a numeric string (not a bool)."""
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        raise SpecError(field, f"must be a number, got {type(x).__name__}")
    try:
        return float(x)
    except (ValueError, OverflowError) as e:
        raise SpecError(field, f"must be a number, got {x!r}") from e


def parse_scale(x: Any, field: str) -> float:
    """A finite number with ``|x| <= MAX_ABS_SCALE`` (numeric strings accepted)."""
    scale = _number(x, field)
    if not math.isfinite(scale):
        raise SpecError(field, f"must be finite, got {scale}")
    if abs(scale) > MAX_ABS_SCALE:
        raise SpecError(field, f"|scale| must be <= {MAX_ABS_SCALE:g}, got {scale:g}")
    return scale


def parse_layers(x: Any, field: str, num_layers: int | None = None) -> tuple[int, ...]:
    """A non-empty list of distinct layer indices, sorted; given as a list, a JSON list string
    or a comma-separated string (``"8,9,10"``). With ``num_layers`` each must be below it."""
    if isinstance(x, str):
        try:
            x = json.loads(x) if x.strip().startswith("[") else [int(v) for v in x.split(",")]
        except (ValueError, RecursionError) as e:
            raise SpecError(field, "must be a list of layer indices") from e
    if not isinstance(x, list | tuple) or not x:
        raise SpecError(field, "must be a non-empty list of layer indices")
    for v in x:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(field, f"layer {v!r} is not an integer")
        if v < 0:
            raise SpecError(field, f"layer {v} is negative")
        if num_layers is not None and v >= num_layers:
            raise SpecError(field, f"layer {v} out of range: the model has {num_layers} layers "
                                   f"(0..{num_layers - 1})")
    if len(set(x)) != len(x):
        raise SpecError(field, "layers repeat")
    return tuple(sorted(x))


#: Per-vector interventions (``steering.recipe`` has the formulas).
OPS = ("add", "ablate", "clamp")
#: Bound on a clamp value (the component along the unit direction, in stream units).
MAX_ABS_CLAMP = 1e6


def parse_op(x: Any, field: str) -> str:
    if not isinstance(x, str) or x not in OPS:
        raise SpecError(field, f"{x!r} is not one of {', '.join(OPS)}")
    return x


def parse_strength(x: Any, field: str) -> float:
    """An ablation strength in [0, 1] (1: remove the whole component)."""
    s = parse_scale(x, field)
    if not 0.0 <= s <= 1.0:
        raise SpecError(field, f"must be in [0, 1], got {s:g}")
    return s


def parse_clamp_value(x: Any, field: str) -> float:
    v = _number(x, field)
    if not math.isfinite(v) or abs(v) > MAX_ABS_CLAMP:
        raise SpecError(field, f"must be finite with |value| <= {MAX_ABS_CLAMP:g}, got {v:g}")
    return v


def parse_flag(x: Any, field: str) -> bool:
    """A boolean (also "true"/"false"/"1"/"0" strings, as flat ``vllm_xargs`` carry them)."""
    if isinstance(x, bool):
        return x
    if isinstance(x, str) and x.lower() in ("true", "false", "1", "0"):
        return x.lower() in ("true", "1")
    raise SpecError(field, f"must be true or false, got {x!r}")


def check_op_fields(op: str, *, scale: Any, strength: Any, value: Any, where: str) -> None:
    """Refuse parameters that the op does not use (nothing is silently ignored). Fields
    are named ``where.key`` (``key`` for an empty ``where``)."""
    def field(key: str) -> str:
        return f"{where}.{key}" if where else key

    if op != "add" and scale is not None:
        raise SpecError(field("scale"), f"applies to op 'add', not {op!r} (ablate/clamp use "
                                        "the unit direction)")
    if op != "ablate" and strength is not None:
        raise SpecError(field("strength"), f"applies to op 'ablate', not {op!r}")
    if op != "clamp" and value is not None:
        raise SpecError(field("value"), f"applies to op 'clamp', not {op!r}")


def parse_op_fields(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``op`` (default ``add``) with its ``strength``/``value`` from a mapping (a registry
    entry, a vector upload), checked as a spec's are: a parameter the op does not use is
    refused. Returns ``{"op", ["strength"], ["value"]}``; fields named ``prefix + key``."""
    op = parse_op(d.get("op", "add"), prefix + "op")
    check_op_fields(op, scale=d.get("scale"), strength=d.get("strength"),
                    value=d.get("value"), where=prefix.rstrip("."))
    out: dict[str, Any] = {"op": op}
    if d.get("strength") is not None:
        out["strength"] = parse_strength(d["strength"], prefix + "strength")
    if d.get("value") is not None:
        out["value"] = parse_clamp_value(d["value"], prefix + "value")
    return out

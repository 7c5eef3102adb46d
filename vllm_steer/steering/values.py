"""Validation of the values a spec, a registry entry or a vector upload carries: scales and
layer lists. One implementation for all three edges; each maps ``SpecError`` to its own
error type (``VLLMValidationError``, ``RegistryError``, HTTP 400) keeping the field name.

Typed carriers get typed values, nothing lenient: a spec object (a dict, or the JSON
string in ``vllm_xargs``), a JSON request body and a registry file give numbers as
numbers, booleans as booleans and layer lists as lists. Only the two text carriers take
text spellings (``text=True``): the upload route's query parameters and the flat ``steer*``
shorthand of ``extra_args``/``vllm_xargs``, where a number may be a numeric string, a
boolean ``true``/``false``/``1``/``0`` (any case; vLLM turns a JSON boolean in
``vllm_xargs`` into the integer 1 or 0), and a layer list a comma-separated string
(``"8,9,10"``).
"""

from __future__ import annotations

import math
from typing import Any

MAX_ABS_SCALE = 1000.0


class SpecError(ValueError):
    """A malformed steering value. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def _number(x: Any, field: str, text: bool = False) -> float:
    """``x`` as a float: an int or a float (not a bool); with ``text`` also a numeric
    string."""
    if isinstance(x, str) and text:
        try:
            return float(x)
        except (ValueError, OverflowError) as e:
            raise SpecError(field, f"must be a number, got {x!r}") from e
    if isinstance(x, bool) or not isinstance(x, int | float):
        got = repr(x) if isinstance(x, str) else type(x).__name__
        raise SpecError(field, f"must be a number, got {got}")
    try:
        return float(x)
    except OverflowError as e:  # an int beyond float range
        raise SpecError(field, "must be a number of float range") from e


def parse_number(x: Any, field: str, *, text: bool = False) -> float:
    """An int or a float (not a bool) as a float; numeric strings only with ``text``."""
    return _number(x, field, text)


def parse_scale(x: Any, field: str, *, text: bool = False) -> float:
    """A finite number with ``|x| <= MAX_ABS_SCALE`` (numeric strings only with ``text``)."""
    scale = _number(x, field, text)
    if not math.isfinite(scale):
        raise SpecError(field, f"must be finite, got {scale}")
    if abs(scale) > MAX_ABS_SCALE:
        raise SpecError(field, f"|scale| must be <= {MAX_ABS_SCALE:g}, got {scale:g}")
    return scale


def parse_layers(x: Any, field: str, num_layers: int | None = None, *, text: bool = False
                 ) -> tuple[int, ...]:
    """A non-empty list of distinct layer indices, sorted; with ``text`` also a
    comma-separated string (``"8,9,10"``). With ``num_layers`` each must be below it."""
    if isinstance(x, str):
        if not text:
            raise SpecError(field, f"must be a list of layer indices, got the string {x!r} "
                                   "(give a list, e.g. [8, 9, 10])")
        try:
            x = [int(v) for v in x.split(",")]
        except ValueError as e:
            raise SpecError(field, "must be comma-separated layer indices (e.g. 8,9,10), "
                                   f"got {x[:40]!r}") from e
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


#: Per-vector interventions (``steering.program`` has the formulas).
OPS = ("add", "ablate", "clamp")
#: Bound on a clamp value (the component along the unit direction, in stream units).
MAX_ABS_CLAMP = 1e6


def parse_op(x: Any, field: str, *, text: bool = False) -> str:
    """One of ``OPS`` (``text`` changes nothing: an op is a string in every carrier)."""
    if not isinstance(x, str) or x not in OPS:
        raise SpecError(field, f"{x!r} is not one of {', '.join(OPS)}")
    return x


def parse_strength(x: Any, field: str, *, text: bool = False) -> float:
    """An ablation strength in [0, 1] (1: remove the whole component)."""
    s = parse_scale(x, field, text=text)
    if not 0.0 <= s <= 1.0:
        raise SpecError(field, f"must be in [0, 1], got {s:g}")
    return s


def parse_clamp_value(x: Any, field: str, *, text: bool = False) -> float:
    v = _number(x, field, text)
    if not math.isfinite(v) or abs(v) > MAX_ABS_CLAMP:
        raise SpecError(field, f"must be finite with |value| <= {MAX_ABS_CLAMP:g}, got {v:g}")
    return v


#: Text spellings of a boolean (any case) in the text carriers.
FLAG_SPELLINGS = {"true": True, "1": True, "false": False, "0": False}


def parse_flag(x: Any, field: str, *, text: bool = False) -> bool:
    """A boolean; with ``text`` also ``FLAG_SPELLINGS`` and the integers 1 and 0 (what vLLM
    makes of a JSON boolean in ``vllm_xargs``)."""
    if isinstance(x, bool):
        return x
    if text and isinstance(x, str) and x.lower() in FLAG_SPELLINGS:
        return FLAG_SPELLINGS[x.lower()]
    if text and isinstance(x, int) and x in (0, 1):
        return bool(x)
    spelled = " (or 'true', 'false', '1', '0')" if text else " (a JSON boolean)"
    raise SpecError(field, f"must be true or false{spelled}, got {x!r}")


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


def parse_op_fields(d: dict[str, Any], prefix: str = "", *, text: bool = False
                    ) -> dict[str, Any]:
    """``op`` (default ``add``) with its ``strength``/``value`` from a mapping (a registry
    entry, a vector upload), checked as a spec's are: a parameter the op does not use is
    refused. Returns ``{"op", ["strength"], ["value"]}``; fields named ``prefix + key``;
    ``text``: the mapping is a query string."""
    op = parse_op(d.get("op", "add"), prefix + "op")
    check_op_fields(op, scale=d.get("scale"), strength=d.get("strength"),
                    value=d.get("value"), where=prefix.rstrip("."))
    out: dict[str, Any] = {"op": op}
    if d.get("strength") is not None:
        out["strength"] = parse_strength(d["strength"], prefix + "strength", text=text)
    if d.get("value") is not None:
        out["value"] = parse_clamp_value(d["value"], prefix + "value", text=text)
    return out

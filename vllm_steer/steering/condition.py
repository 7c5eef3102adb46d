"""Conditions (CAST, Conditional Activation Steering): parsed at the edge, and the score.
vLLM-free.

A condition reads a request's prompt and says whether its steering applies::

    {"name": "harmful",            # or "path": a condition vector file
     "layer": 7,                   # block L (default: the file's trained layer)
     "aggregate": "mean" | "last", # over the prompt's tokens at L (default: the file's)
     "threshold": 0.07,            # (default: the file's)
     "compare": "above" | "below"} # above: holds when score >= threshold (default: the file's)

A rule is one condition or ``{"any": [c, ...]}`` / ``{"all": [c, ...]}`` (at most
``MAX_CONDITIONS``). The score is CAST's::

    score = cos(h, tanh(P h)),   P = v vᵀ / (vᵀ v)

with ``v`` the condition vector's direction at layer ``L`` and ``h`` the aggregated
residual stream at the output of block ``L`` (the steering layer convention): ``mean``
over every prompt token as the engine sees it (chat template included), or the ``last``
prompt token. ``P h = ((v·h) / (v·v)) v``, so ``tanh`` acts elementwise on a multiple of
``v``. A zero ``h`` or ``h ⟂ v`` gives ``tanh(P h) = 0`` and the score 0.

A condition vector file is a vector file (``vllm_steer.vector``) whose metadata holds its
trained defaults as JSON in ``extra["condition"]`` (``CONDITION_META``):
``{"layer", "aggregate", "threshold", "compare", ...}``; a request's fields override them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_steer.steering.values import SpecError, parse_number

AGGREGATES = ("mean", "last")
COMPARES = ("above", "below")
RULE_MODES = ("all", "any")
#: Conditions one request's rule may combine (each costs two accumulator rows per request).
MAX_CONDITIONS = 4
#: Key in a vector file's ``metadata.extra`` holding a condition's trained defaults (JSON).
CONDITION_META = "condition"
_KEYS = {"name", "path", "layer", "aggregate", "threshold", "compare"}


@dataclass(frozen=True)
class ConditionRef:
    """One condition as a request wrote it; ``None`` fields take the file's defaults."""

    name: str | None = None
    path: str | None = None
    layer: int | None = None
    aggregate: str | None = None
    threshold: float | None = None
    compare: str | None = None

    @property
    def label(self) -> str:
        """How reports name it: its registry name, else its path."""
        return self.name if self.name is not None else str(self.path)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name} if self.name is not None else {"path": self.path}
        for key in ("layer", "aggregate", "threshold", "compare"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class Rule:
    """``conditions`` combined by ``mode``: ``all`` (every one holds) or ``any``."""

    conditions: tuple[ConditionRef, ...]
    mode: str = "all"
    #: The rule was written as a single condition object (kept for ``to_dict``).
    single: bool = False

    def to_dict(self) -> dict[str, Any]:
        if self.single:
            return self.conditions[0].to_dict()
        return {self.mode: [c.to_dict() for c in self.conditions]}


def parse_rule(raw: Any, where: str) -> Rule:
    """A condition object or ``{"any"|"all": [...]}``; ``SpecError`` names the field."""
    if not isinstance(raw, dict):
        raise SpecError(where, f"must be a condition object or {{\"any\"|\"all\": [...]}}, "
                               f"got {type(raw).__name__}")
    modes = [m for m in RULE_MODES if m in raw]
    if not modes:
        return Rule((parse_condition(raw, where),), "all", single=True)
    if len(raw) != 1:
        extra = sorted(str(k) for k in raw if k not in RULE_MODES)
        field = f"{where}.{extra[0]}" if extra else where
        raise SpecError(field, "a rule is exactly one of {\"any\": [...]} or {\"all\": [...]}")
    mode = modes[0]
    items = raw[mode]
    if not isinstance(items, list) or not items:
        raise SpecError(f"{where}.{mode}", "must be a non-empty list of conditions")
    if len(items) > MAX_CONDITIONS:
        raise SpecError(f"{where}.{mode}", f"{len(items)} conditions; at most "
                                           f"{MAX_CONDITIONS} per request")
    return Rule(tuple(parse_condition(c, f"{where}.{mode}[{i}]") for i, c in enumerate(items)),
                mode)


def parse_condition(raw: Any, where: str) -> ConditionRef:
    if not isinstance(raw, dict):
        raise SpecError(where, f"must be an object with 'name' or 'path', got "
                               f"{type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}",
                        f"unknown field (known: {', '.join(sorted(_KEYS))})")
    name, path = raw.get("name"), raw.get("path")
    if (name is None) == (path is None):
        raise SpecError(where, "give exactly one of 'name' or 'path'")
    for key, val in (("name", name), ("path", path)):
        if val is not None and (not isinstance(val, str) or not val):
            raise SpecError(f"{where}.{key}", "must be a non-empty string")
    layer = raw.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                              or layer < 0):
        raise SpecError(f"{where}.layer", f"must be a layer index (an integer >= 0), got "
                                          f"{layer!r}")
    return ConditionRef(
        name=name, path=path, layer=layer,
        aggregate=_choice(raw.get("aggregate"), AGGREGATES, f"{where}.aggregate"),
        threshold=(None if raw.get("threshold") is None
                   else parse_threshold(raw["threshold"], f"{where}.threshold")),
        compare=_choice(raw.get("compare"), COMPARES, f"{where}.compare"))


def _choice(x: Any, allowed: tuple[str, ...], field: str) -> str | None:
    if x is None:
        return None
    if not isinstance(x, str) or x not in allowed:
        raise SpecError(field, f"{x!r} is not one of {', '.join(allowed)}")
    return x


def parse_threshold(x: Any, field: str) -> float:
    """A finite number in [-1, 1] (the score is a cosine)."""
    t = parse_number(x, field)
    if not math.isfinite(t) or not -1.0 <= t <= 1.0:
        raise SpecError(field, f"must be a number in [-1, 1] (the score is a cosine), got {x!r}")
    return t


# -- defaults stored in a condition vector file -----------------------------------------------
@dataclass(frozen=True)
class ConditionDefaults:
    """A condition file's trained defaults (``CONDITION_META``); any may be missing."""

    layer: int | None = None
    aggregate: str | None = None
    threshold: float | None = None
    compare: str | None = None

    @classmethod
    def from_extra(cls, extra: Mapping[str, str], where: str) -> ConditionDefaults:
        raw = extra.get(CONDITION_META)
        if not raw:
            return cls()
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise SpecError(where, f"the vector file's {CONDITION_META!r} metadata is not "
                                   f"JSON ({e})") from e
        if not isinstance(d, dict):
            raise SpecError(where, f"the vector file's {CONDITION_META!r} metadata is not an "
                                   "object")
        ref = parse_condition({"name": "file", **{k: d[k] for k in
                                                  ("layer", "aggregate", "threshold", "compare")
                                                  if d.get(k) is not None}},
                              f"{where} (file metadata)")
        return cls(ref.layer, ref.aggregate, ref.threshold, ref.compare)


def defaults_json(layer: int, aggregate: str, threshold: float, compare: str,
                  **info: Any) -> str:
    """The ``CONDITION_META`` value for a trained condition (plus training ``info``)."""
    return json.dumps({"layer": layer, "aggregate": aggregate, "threshold": threshold,
                       "compare": compare, **info}, sort_keys=True)


# -- the score ----------------------------------------------------------------------------------
def cast_score(h: Any, v: Any) -> Any:
    """``cos(h, tanh(P h))`` with ``P = v vᵀ / (vᵀ v)`` over the last dimension.

    ``h``, ``v``: torch tensors ``[..., hidden]`` (broadcasting); computed in float32 at
    least. A zero product of norms gives 0. The engine's scoring and the training search
    both call this (the tests' reference is written separately from the formula).
    """
    import torch

    dt = torch.promote_types(h.dtype, torch.float32)
    h, v = h.to(dt), v.to(dt)
    c = (h * v).sum(-1) / (v * v).sum(-1).clamp_min(1e-30)
    t = torch.tanh(c.unsqueeze(-1) * v)
    num = (h * t).sum(-1)
    den = torch.linalg.vector_norm(h, dim=-1) * torch.linalg.vector_norm(t, dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def holds(score: float | np.ndarray, threshold: float, compare: str) -> Any:
    """``above``: ``score >= threshold``; ``below``: ``score <= threshold``."""
    return score >= threshold if compare == "above" else score <= threshold

"""The steering spec a request carries, parsed and structurally validated at the edge.

Accepted in ``SamplingParams.extra_args`` (and so in the OpenAI body's ``vllm_xargs``):

- ``{"steering": {...}}`` where ``{...}`` is a dict or the same dict as a JSON string;
- the flat shorthand ``steer="happy"`` (or ``"happy,formal"``), ``steer_scale=1.5``,
  ``steer_layers=[8, 9]``, ``steer_apply_to="generated"``, ``steer_op="ablate"``,
  ``steer_strength=0.5``, ``steer_value=2.0``, ``steer_normalize=true``.

Spec fields: ``vectors`` (list of ``{"name" | "path" | "data", "op", "scale" |
"strength" | "value", "layers"}``; ``data`` is a vector file (safetensors or GGUF) in
base64, accepted only where the operator allows inline vectors (``steering.resolve``);
``op`` is ``add`` (default: ``scale * v``), ``ablate`` (remove ``strength`` in [0, 1] of
the component along the unit direction) or ``clamp`` (set that component to
``value``)), ``normalize`` (restore each steered token's pre-steering norm),
``apply_to`` (``all | prompt | generated | thinking | answer``), ``start_position`` /
``end_position`` (absolute token positions: steer ``start <= pos < end``), and
``think_start`` / ``think_end`` (marker strings overriding the registry's).
Conditional steering (``steering.condition``): ``condition`` (a condition or an
``any``/``all`` rule, read from the prompt) makes ``vectors`` apply to the generated tokens
only when the rule holds, and ``else_vectors`` (optional) when it does not;
``prompt_vectors`` (optional) steer the prompt tokens unconditionally; ``apply_to`` is then
``generated`` (its default), ``thinking`` or ``answer``. Replays of a conditioned request
(probe forks) carry its ``decision`` (true/false) instead of the condition, and
``split_position`` (where its prompt ended).
Unknown keys are errors: nothing is silently ignored. The spec object takes JSON types
only (numbers, booleans, lists); the flat shorthand, being text in ``vllm_xargs``, also
takes their text spellings (``"1.5"``, ``"true"``/``"1"``, ``"8,9,10"``; see
``steering.values``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_steer.steering.condition import Rule, parse_rule
from vllm_steer.steering.values import (
    SpecError,
    check_op_fields,
    parse_clamp_value,
    parse_flag,
    parse_layers,
    parse_op,
    parse_scale,
    parse_strength,
)

APPLY_TO_MODES = ("all", "prompt", "generated", "thinking", "answer")
MAX_VECTORS = 16
MAX_SPEC_CHARS = 65536
#: Positions travel to the workers as msgpack int64; anything this large means "no bound".
MAX_POSITION = (1 << 62) - 1
EXTRA_ARGS_KEY = "steering"
FLAT_KEYS = ("steer", "steer_scale", "steer_layers", "steer_apply_to", "steer_op",
             "steer_strength", "steer_value", "steer_normalize")
#: Flat key -> the spec field it fills (per vector, or for the whole spec).
_FLAT_VECTOR = {"steer_scale": "scale", "steer_layers": "layers", "steer_op": "op",
                "steer_strength": "strength", "steer_value": "value"}
#: Key under which the frontend hands the resolved, wire-format steering to the workers.
WIRE_KEY = "_vllm_steer"

_SPEC_KEYS = {"vectors", "apply_to", "start_position", "end_position", "think_start", "think_end",
              "normalize", "condition", "decision", "else_vectors", "prompt_vectors",
              "split_position"}
#: Token selections a gated (conditioned or decided) spec may use: generated tokens only.
GATED_APPLY_TO = ("generated", "thinking", "answer")
_VECTOR_KEYS = {"name", "path", "data", "op", "scale", "strength", "value", "layers"}


@dataclass(frozen=True)
class VectorRef:
    """One vector in a spec: by registered ``name``, by file ``path`` or inline (``data``,
    a base64 vector file), with its ``op``.

    ``None`` means "the registry's default" (``op`` add, ``scale`` 1.0, ``strength`` 1.0,
    ``value`` 0.0, all its layers). ``scale`` is for ``add``, ``strength`` for ``ablate``,
    ``value`` for ``clamp``.
    """

    name: str | None = None
    path: str | None = None
    scale: float | None = None
    layers: tuple[int, ...] | None = None
    op: str | None = None
    strength: float | None = None
    value: float | None = None
    data: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SteeringSpec:
    """A request's steering, structurally valid but not yet resolved against vectors/model."""

    vectors: tuple[VectorRef, ...]
    apply_to: str = "all"
    start_position: int = 0
    end_position: int | None = None
    think_start: str | None = None
    think_end: str | None = None
    #: Rescale each steered token's residual stream to its norm before steering.
    normalize: bool = False
    #: True when parsed from the flat ``steer*`` shorthand (errors then name those keys).
    flat: bool = field(default=False, compare=False)
    #: The rule read from the prompt (``steering.condition``); None: unconditional.
    condition: Rule | None = None
    #: A replay's fixed decision (the rule held: ``vectors``; else ``else_vectors``).
    decision: bool | None = None
    #: Steering of the generated tokens when the rule does not hold.
    else_vectors: tuple[VectorRef, ...] = ()
    #: Unconditional steering of the prompt tokens (positions before ``split_position``).
    prompt_vectors: tuple[VectorRef, ...] = ()
    #: Where the prompt ends (replays; default: the request's prompt length).
    split_position: int | None = None

    @property
    def gated(self) -> bool:
        """True when a condition (or a replay's decision) picks the generated tokens'
        steering."""
        return self.condition is not None or self.decision is not None

    def decided(self, holds: bool) -> SteeringSpec:
        """The same steering with the condition replaced by its outcome ``holds`` (how
        replays of a conditioned request are steered)."""
        if not self.gated:
            return self
        return replace(self, condition=None, decision=bool(holds))

    def user_field(self, field_name: str) -> str:
        """``field_name`` (a dotted spec path) as the user wrote it."""
        if not self.flat:
            return field_name
        for key, name in _FLAT_VECTOR.items():
            if field_name.endswith("." + name):
                return key
        if field_name.endswith("normalize"):
            return "steer_normalize"
        return "steer_apply_to" if field_name.endswith("apply_to") else "steer"

    def at_absolute_positions(self, prompt_len: int) -> SteeringSpec:
        """The same steering with ``prompt``/``generated`` rewritten as ``all`` within
        absolute positions (``generated``: from ``prompt_len``; ``prompt``: up to it).

        The one place this rewrite lives: the resolver canonicalises every request with it,
        and replays of a trajectory (probe forks) send its result, so both get the same
        prefix-cache salt and share KV blocks. A gated spec's steered tokens start at its
        split (``split_position``, else ``prompt_len``), which the result carries.
        """
        if self.gated:
            split = self.split_position if self.split_position is not None else prompt_len
            mode = "all" if self.apply_to == "generated" else self.apply_to
            return replace(self, apply_to=mode, split_position=split,
                           start_position=max(self.start_position, split))
        if self.apply_to == "generated":
            return replace(self, apply_to="all",
                           start_position=max(self.start_position, prompt_len))
        if self.apply_to == "prompt":
            end = prompt_len if self.end_position is None else min(self.end_position, prompt_len)
            return replace(self, apply_to="all", end_position=end)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The spec as the JSON object a request carries (``vectors``, ``apply_to`` and the
        optional fields that are set, conditions included)."""
        out: dict[str, Any] = {"vectors": _refs_to_dicts(self.vectors),
                               "apply_to": self.apply_to}
        if self.normalize:
            out["normalize"] = True
        if self.start_position:
            out["start_position"] = self.start_position
        if self.end_position is not None:
            out["end_position"] = self.end_position
        if self.think_start is not None:
            out["think_start"] = self.think_start
        if self.think_end is not None:
            out["think_end"] = self.think_end
        if self.condition is not None:
            out["condition"] = self.condition.to_dict()
        if self.decision is not None:
            out["decision"] = self.decision
        for key in ("else_vectors", "prompt_vectors"):
            if getattr(self, key):
                out[key] = _refs_to_dicts(getattr(self, key))
        if self.split_position is not None:
            out["split_position"] = self.split_position
        return out


def _refs_to_dicts(refs: tuple[VectorRef, ...]) -> list[dict[str, Any]]:
    vecs = []
    for v in refs:
        d: dict[str, Any] = ({"name": v.name} if v.name is not None else
                             {"path": v.path} if v.path is not None else {"data": v.data})
        for key in ("op", "scale", "strength", "value"):
            if getattr(v, key) is not None:
                d[key] = getattr(v, key)
        if v.layers is not None:
            d["layers"] = list(v.layers)
        vecs.append(d)
    return vecs


def make_spec(
    *vectors: str | tuple[str, float] | dict[str, Any],
    apply_to: str = "all",
    start_position: int = 0,
    end_position: int | None = None,
    think_start: str | None = None,
    think_end: str | None = None,
    normalize: bool = False,
    condition: dict[str, Any] | None = None,
    else_vectors: list[Any] | None = None,
    prompt_vectors: list[Any] | None = None,
) -> dict[str, Any]:
    """Build a spec dict for ``SamplingParams(extra_args={"steering": make_spec(...)})``.

    ``make_spec("happy")``, ``make_spec(("happy", 1.5), ("formal", -0.5))`` or full dicts.
    ``condition`` (a condition or an ``any``/``all`` rule) gates the generated tokens'
    steering (``apply_to`` then defaults to ``generated``); ``else_vectors`` and
    ``prompt_vectors`` take the same entry forms as ``vectors``.
    The result is validated, so mistakes fail here rather than at submission.
    """
    vecs = _entries(vectors, "vectors")
    if condition is not None and apply_to == "all":
        apply_to = "generated"
    d: dict[str, Any] = {"vectors": vecs, "apply_to": apply_to}
    if condition is not None:
        d["condition"] = condition
    if else_vectors:
        d["else_vectors"] = _entries(else_vectors, "else_vectors")
    if prompt_vectors:
        d["prompt_vectors"] = _entries(prompt_vectors, "prompt_vectors")
    if start_position:
        d["start_position"] = start_position
    if end_position is not None:
        d["end_position"] = end_position
    if think_start is not None:
        d["think_start"] = think_start
    if think_end is not None:
        d["think_end"] = think_end
    if normalize:
        d["normalize"] = True
    parse_spec(d)
    return d


def _entries(vectors: Any, where: str) -> list[dict[str, Any]]:
    vecs: list[dict[str, Any]] = []
    for v in vectors:
        if isinstance(v, str):
            vecs.append({"name": v})
        elif isinstance(v, tuple) and len(v) == 2:
            vecs.append({"name": v[0], "scale": v[1]})
        elif isinstance(v, dict):
            vecs.append(dict(v))
        else:
            raise SpecError(where, f"cannot build a vector entry from {v!r}")
    return vecs


def parse_extra_args(extra_args: dict[str, Any] | None) -> SteeringSpec | None:
    """The spec carried in ``extra_args``, or None when the request is unsteered."""
    if not extra_args:
        return None
    flat = {k: v for k, v in extra_args.items() if k.startswith("steer") and k != EXTRA_ARGS_KEY}
    has_spec = extra_args.get(EXTRA_ARGS_KEY) is not None
    unknown = sorted(set(flat) - set(FLAT_KEYS))
    if unknown:
        raise SpecError(unknown[0], f"unknown steering argument (known: {', '.join(FLAT_KEYS)})")
    if has_spec and flat:
        raise SpecError(
            sorted(flat)[0], "give either 'steering' or the flat steer* shorthand, not both"
        )
    if has_spec:
        return parse_spec(extra_args[EXTRA_ARGS_KEY])
    if not flat:
        return None
    if "steer" not in flat:
        raise SpecError(sorted(flat)[0], "flat shorthand needs 'steer' (the vector name)")
    names = flat["steer"]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not names:
        raise SpecError("steer", "must be a vector name, comma-separated names, or a list")
    entry = {name: flat[key] for key, name in _FLAT_VECTOR.items() if key in flat}
    spec: dict[str, Any] = {"vectors": [{"name": n, **entry} for n in names]}
    if "steer_apply_to" in flat:
        spec["apply_to"] = flat["steer_apply_to"]
    if "steer_normalize" in flat:
        spec["normalize"] = flat["steer_normalize"]
    return _parse_dict(spec, prefix="", flat=True)


def parse_spec(raw: Any) -> SteeringSpec:
    """Parse a spec given as a dict or a JSON string; raise ``SpecError`` naming the field."""
    if isinstance(raw, str | bytes):
        if len(raw) > MAX_SPEC_CHARS:
            raise SpecError("steering", f"spec longer than {MAX_SPEC_CHARS} characters")
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise SpecError("steering", f"malformed JSON ({e})") from e
    if not isinstance(raw, dict):
        raise SpecError("steering", f"must be an object, got {type(raw).__name__}")
    return _parse_dict(raw, prefix="steering.")


def _parse_dict(raw: dict[str, Any], prefix: str, flat: bool = False) -> SteeringSpec:
    def f(name: str) -> str:
        if flat:
            return {"vectors": "steer", "apply_to": "steer_apply_to",
                    "normalize": "steer_normalize"}.get(name, name)
        return prefix + name

    unknown = sorted(str(k) for k in raw if k not in _SPEC_KEYS)
    if unknown:
        raise SpecError(f(unknown[0]), f"unknown field (known: {', '.join(sorted(_SPEC_KEYS))})")
    vectors = raw.get("vectors")
    if not isinstance(vectors, list) or not vectors:
        raise SpecError(f("vectors"), "must be a non-empty list of vector entries")
    if len(vectors) > MAX_VECTORS:
        raise SpecError(f("vectors"), f"{len(vectors)} vectors; at most {MAX_VECTORS} per request")
    refs = tuple(_parse_vector(v, f"{f('vectors')}[{i}]", flat) for i, v in enumerate(vectors))
    gate = _parse_gate(raw, f)

    apply_to = raw.get("apply_to", "generated" if gate["gated"] else "all")
    if not isinstance(apply_to, str) or apply_to not in APPLY_TO_MODES:
        raise SpecError(f("apply_to"), f"{apply_to!r} is not one of {', '.join(APPLY_TO_MODES)}")
    if gate["gated"] and apply_to not in GATED_APPLY_TO and not (
            apply_to == "all" and gate["split_position"] is not None):
        raise SpecError(f("apply_to"), f"{apply_to!r}: a condition picks the steering of the "
                        "generated tokens, so apply_to must be one of "
                        f"{', '.join(GATED_APPLY_TO)} (steer the prompt with prompt_vectors)")
    start = _opt_int(raw.get("start_position"), f("start_position"))
    end = _opt_int(raw.get("end_position"), f("end_position"))
    start = start or 0
    if end is not None and end <= start:
        raise SpecError(f("end_position"), f"must be greater than start_position ({start})")
    markers = {}
    for key in ("think_start", "think_end"):
        m = raw.get(key)
        if m is not None and (not isinstance(m, str) or not m):
            raise SpecError(f(key), "must be a non-empty string")
        if m is not None and not _is_utf8(m):
            raise SpecError(f(key), "must be valid Unicode text (no lone surrogates)")
        markers[key] = m
    # the flat shorthand is text (``vllm_xargs`` values): "true", "8,9", "1.5" are spellings
    normalize = parse_flag(raw.get("normalize", False), f("normalize"), text=flat)
    return SteeringSpec(refs, apply_to, start, end, markers["think_start"], markers["think_end"],
                        normalize=normalize, flat=flat, condition=gate["condition"],
                        decision=gate["decision"], else_vectors=gate["else_vectors"],
                        prompt_vectors=gate["prompt_vectors"],
                        split_position=gate["split_position"])


def _parse_gate(raw: dict[str, Any], f: Any) -> dict[str, Any]:
    """The conditional fields (``condition``, ``decision``, ``else_vectors``,
    ``prompt_vectors``, ``split_position``), checked for consistency."""
    cond_raw, decision = raw.get("condition"), raw.get("decision")
    condition = None if cond_raw is None else parse_rule(cond_raw, f("condition"))
    if decision is not None and not isinstance(decision, bool):
        raise SpecError(f("decision"), f"must be true or false, got {decision!r}")
    if condition is not None and decision is not None:
        raise SpecError(f("decision"), "give either 'condition' (decided from the prompt) or "
                                       "'decision' (a replay's outcome), not both")
    gated = condition is not None or decision is not None
    out: dict[str, Any] = {"gated": gated, "condition": condition, "decision": decision}
    for key in ("else_vectors", "prompt_vectors"):
        items = raw.get(key)
        if items is None:
            out[key] = ()
            continue
        if not gated:
            raise SpecError(f(key), "only with a 'condition' (or a replay's 'decision')")
        if not isinstance(items, list) or not items:
            raise SpecError(f(key), "must be a non-empty list of vector entries")
        if len(items) > MAX_VECTORS:
            raise SpecError(f(key), f"{len(items)} vectors; at most {MAX_VECTORS} per request")
        out[key] = tuple(_parse_vector(v, f"{f(key)}[{i}]", False) for i, v in enumerate(items))
    split = _opt_int(raw.get("split_position"), f("split_position"))
    if split is not None and decision is None:
        raise SpecError(f("split_position"), "only in a replay, with 'decision' (a condition "
                                             "reads the request's own prompt)")
    out["split_position"] = split
    return out


#: A vector's op fields in the order they are checked; absent ones stay None (the
#: registry entry's defaults apply).
_OP_FIELD_PARSERS = (("op", parse_op), ("scale", parse_scale), ("strength", parse_strength),
                     ("value", parse_clamp_value))


def _parse_vector(v: Any, where: str, flat: bool) -> VectorRef:
    if not isinstance(v, dict):
        raise SpecError(where, f"must be an object with 'name' or 'path', got {type(v).__name__}")
    unknown = sorted(str(k) for k in v if k not in _VECTOR_KEYS)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}",
                        f"unknown field (known: {', '.join(sorted(_VECTOR_KEYS))})")
    name, path, data = v.get("name"), v.get("path"), v.get("data")
    if sum(x is not None for x in (name, path, data)) != 1:
        raise SpecError(where, "give exactly one of 'name', 'path' or 'data'")
    if name is not None and (not isinstance(name, str) or not name):
        raise SpecError("steer" if flat else f"{where}.name", "must be a non-empty string")
    if path is not None and (not isinstance(path, str) or not path):
        raise SpecError(f"{where}.path", "must be a non-empty string")
    if data is not None and (not isinstance(data, str) or not data):
        raise SpecError(f"{where}.data", "must be a non-empty base64 string (a vector file)")
    def fld(name: str) -> str:
        flat_key = next((k for k, n in _FLAT_VECTOR.items() if n == name), None)
        return flat_key if flat and flat_key else f"{where}.{name}"

    op, scale, strength, value = (None if v.get(k) is None else parse(v[k], fld(k), text=flat)
                                  for k, parse in _OP_FIELD_PARSERS)
    if op is not None:
        try:
            check_op_fields(op, scale=scale, strength=strength, value=value, where=where)
        except SpecError as e:
            raise SpecError(fld(e.field.rsplit(".", 1)[1]), e.message) from None
    layers = v.get("layers")
    if layers is not None:
        layers = parse_layers(layers, fld("layers"), text=flat)
    return VectorRef(name=name, path=path, scale=scale, layers=layers, op=op,
                     strength=strength, value=value, data=data)


def _opt_int(x: Any, where: str) -> int | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        raise SpecError(where, f"must be an integer, got {x!r}")
    if x < 0:
        raise SpecError(where, f"must be >= 0, got {x}")
    if x > MAX_POSITION:
        raise SpecError(where, f"must be <= {MAX_POSITION}")
    return x


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

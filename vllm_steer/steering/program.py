"""What a request does to the residual stream: the program and its composition (vLLM-free).

A **program** lists the request's vectors by content id (``store.content_id``), each with
its op, parameter and layers, plus the spec-level ``normalize`` flag. It is small (a few
hundred bytes whatever the model size), content-addressed (``Program.digest``: the slot key
and the base of the prefix-cache salt) and composed into per-layer tables by ``compose``,
the one implementation of the ops' semantics (the frontend runs it to validate, workers to
fill their tables).

For a steered token with residual stream ``h`` after decoder block ``i``, with every
vector's direction ``v_i`` at that layer and unit direction ``r = v_i / |v_i|``:

1. projections, in the spec's order: ``ablate`` ``h <- h - strength * (h . r) r``;
   ``clamp`` ``h <- h + (value - h . r) r`` (the component along ``r`` becomes ``value``);
2. additions: ``h <- h + sum(scale * v_i)`` over the ``add`` vectors;
3. ``normalize``: ``h <- h * |h_0| / |h|``, ``h_0`` being the stream before step 1.

Per layer a projection is the pair ``(a, b)`` in ``h <- h + (b - a (h . r)) r``: ablate is
``(strength, 0)``, clamp is ``(1, value)``; a zero direction is the identity.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vllm_steer.steering.values import OPS, SpecError

#: A direction shorter than this (L2) cannot be made a unit vector for ablate/clamp.
MIN_DIRECTION_NORM = 1e-12


@dataclass(frozen=True)
class Part:
    """One vector of a program: ``content`` (id in the vector store), ``op``, its parameter
    (``scale`` for add, ``strength`` for ablate, ``value`` for clamp) and ``layers``."""

    content: str
    op: str
    param: float
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    parts: tuple[Part, ...]
    normalize: bool = False

    @property
    def digest(self) -> str:
        """sha256 of the canonical program (floats by their exact float64 bits)."""
        doc = [[p.content, p.op, struct.pack("<d", p.param).hex(), list(p.layers)]
               for p in self.parts]
        payload = json.dumps({"parts": doc, "normalize": self.normalize}, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def uses_projections(self) -> bool:
        return self.normalize or any(p.op != "add" for p in self.parts)


@dataclass(frozen=True)
class Composed:
    """A program as per-layer tables for the rows of one slot.

    ``layers``: sorted layers the program touches; ``add``: float32 ``[L, hidden]``;
    ``proj_dir``: unit float32 ``[L, K, hidden]`` (zeros: no projection); ``proj_a`` /
    ``proj_b``: float32 ``[L, K]``; ``normalize``. ``K`` is the most projections any one
    layer has (0 for add-only programs).
    """

    layers: tuple[int, ...]
    add: np.ndarray
    proj_dir: np.ndarray
    proj_a: np.ndarray
    proj_b: np.ndarray
    normalize: bool

    @property
    def num_projections(self) -> int:
        return int(self.proj_dir.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.add.nbytes + self.proj_dir.nbytes + self.proj_a.nbytes
                   + self.proj_b.nbytes)


def compose(program: Program, directions: Callable[[str], Mapping[int, np.ndarray]],
            hidden: int, max_projections: int, where: str = "steering.vectors") -> Composed:
    """Compose ``program`` with ``directions(content) -> {layer: float32 [hidden]}``.

    Raises ``SpecError`` (field ``{where}[k]...``) for a zero direction under ablate/clamp,
    more than ``max_projections`` projections on one layer, or non-finite results.
    """
    layers = sorted({layer for p in program.parts for layer in p.layers})
    row = {layer: i for i, layer in enumerate(layers)}
    add = np.zeros((len(layers), hidden), dtype=np.float32)
    projs: dict[int, list[tuple[np.ndarray, float, float]]] = {layer: [] for layer in layers}
    with np.errstate(over="ignore", invalid="ignore"):
        for k, part in enumerate(program.parts):
            if part.op not in OPS:
                raise SpecError(f"{where}[{k}].op", f"{part.op!r} is not one of {', '.join(OPS)}")
            dirs = directions(part.content)
            for layer in part.layers:
                v = np.asarray(dirs[layer], dtype=np.float32)
                if part.op == "add":
                    add[row[layer]] += np.float32(part.param) * v
                    continue
                norm = float(np.linalg.norm(v.astype(np.float64)))
                if not norm > MIN_DIRECTION_NORM:
                    raise SpecError(f"{where}[{k}]", f"direction at layer {layer} is zero: "
                                                     f"{part.op} needs a direction")
                unit = (v.astype(np.float64) / norm).astype(np.float32)
                a, b = (part.param, 0.0) if part.op == "ablate" else (1.0, part.param)
                projs[layer].append((unit, a, b))
    most = max((len(p) for p in projs.values()), default=0)
    if most > max_projections:
        layer = next(x for x, p in projs.items() if len(p) == most)
        limit = ("this engine steers by addition only" if max_projections == 0 else
                 f"this engine allows {max_projections} per layer")
        raise SpecError(where, f"{most} ablate/clamp vectors act on layer {layer}; {limit} "
                               "(engine option additional_config={'vllm_steer': "
                               "{'max_projections': N}})")
    if program.normalize and max_projections == 0:
        raise SpecError(where.rsplit(".", 1)[0] + ".normalize",
                        "this engine steers by addition only (max_projections 0)")
    proj_dir = np.zeros((len(layers), most, hidden), dtype=np.float32)
    proj_a = np.zeros((len(layers), most), dtype=np.float32)
    proj_b = np.zeros((len(layers), most), dtype=np.float32)
    for layer, items in projs.items():
        for j, (unit, a, b) in enumerate(items):
            proj_dir[row[layer], j], proj_a[row[layer], j], proj_b[row[layer], j] = unit, a, b
    if not np.isfinite(add).all():
        raise SpecError(where, "composed steering overflows (non-finite values)")
    return Composed(tuple(layers), add, proj_dir, proj_a, proj_b, program.normalize)


def apply_reference(h: np.ndarray, composed: Composed, layer: int) -> np.ndarray:
    """float64 ``[T, hidden]``: the steered stream for tokens ``h [T, hidden]`` at ``layer``
    (the formulas above, token by token; for unit tests of the traced forwards)."""
    h0 = np.asarray(h, dtype=np.float64)
    if layer not in composed.layers:
        return h0.copy()
    i = composed.layers.index(layer)
    x = h0.copy()
    for k in range(composed.num_projections):
        r = composed.proj_dir[i, k].astype(np.float64)
        x = x + (composed.proj_b[i, k] - composed.proj_a[i, k] * (x @ r))[:, None] * r
    x = x + composed.add[i]
    if composed.normalize:
        x = x * (np.linalg.norm(h0, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1),
                                                          1e-30))[:, None]
    return x

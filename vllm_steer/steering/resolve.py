"""Resolution of a parsed spec against the registry and the served model (frontend side).

The result is what the workers need and nothing else: one composed delta per layer
(``sum_k scale_k * v_k``), a token-selection rule in canonical absolute-position form,
and content digests. ``prompt``/``generated`` become ``all`` with an end/start position
equal to the prompt length, so that a later request replaying the same tokens with an
explicit ``start_position`` produces the same cache salt and shares the prefix cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_steer.steering.registry import Registry
from vllm_steer.steering.spec import SpecError, SteeringSpec
from vllm_steer.steering.wire import NO_END, WIRE_VERSION, WireSteering, content_digest
from vllm_steer.thinking import markers_for
from vllm_steer.vector import SteeringVector, SteeringVectorError
from vllm_steer.vector import load as load_vector

_COMPOSED_CACHE = 4096


@dataclass(frozen=True)
class ResolvedSteering:
    """A request's steering in canonical form.

    ``layers``: sorted layer indices with a non-zero contribution; ``delta``: float32
    ``[len(layers), hidden]``; ``mode``: ``all | thinking | answer``; positions
    ``start <= pos < end`` (``end == -1``: unbounded); ``think_start_ids`` /
    ``think_end_ids``: marker token ids (only used by thinking/answer).
    """

    layers: tuple[int, ...]
    delta: torch.Tensor
    mode: str
    start: int
    end: int
    think_start_ids: tuple[int, ...] = ()
    think_end_ids: tuple[int, ...] = ()
    digest: str = ""

    @property
    def vector_digest(self) -> str:
        """Content hash of the composed vectors: the worker's slot key."""
        return self.digest or content_digest(self.layers, self.delta.numpy())

    @property
    def cache_salt(self) -> str:
        """Hash of everything that changes which KV values a token gets."""
        h = hashlib.sha256(self.vector_digest.encode())
        h.update(repr((self.mode, self.start, self.end, self.think_start_ids,
                       self.think_end_ids if self.mode != "all" else ())).encode())
        return "vllm-steer:" + h.hexdigest()[:32]

    def to_wire(self) -> WireSteering:
        """The typed struct that travels (as builtins) in ``extra_args[WIRE_KEY]``."""
        return WireSteering(
            version=WIRE_VERSION,
            digest=self.vector_digest,
            layers=tuple(self.layers),
            hidden=int(self.delta.shape[1]),
            delta=self.delta.numpy().astype("<f4", copy=False).tobytes(),
            mode=self.mode,
            start=self.start,
            end=self.end,
            think_start_ids=tuple(self.think_start_ids),
            think_end_ids=tuple(self.think_end_ids),
        )

    @classmethod
    def from_wire(cls, w: WireSteering) -> ResolvedSteering:
        return cls(w.layers, torch.from_numpy(w.delta_array()), w.mode, w.start, w.end,
                   w.think_start_ids, w.think_end_ids, w.digest)


@dataclass(frozen=True)
class _Composed:
    layers: tuple[int, ...]
    delta: torch.Tensor   # float32 [len(layers), hidden]
    digest: str


class Resolver:
    """Turns ``SteeringSpec`` into ``ResolvedSteering`` for one served model. Thread-safe."""

    def __init__(self, registry: Registry, *, num_layers: int, hidden_size: int,
                 tokenizer: Any = None, thinking_supported: bool = True) -> None:
        self.registry = registry
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.tokenizer = tokenizer
        self.thinking_supported = thinking_supported
        self._lock = threading.Lock()
        # (path, mtime_ns, size) -> (vector, {layer: float32 ndarray [hidden]})
        self._files: dict[tuple[str, int, int],
                          tuple[SteeringVector, dict[int, np.ndarray]]] = {}
        # Composition is cached by what it depends on: file identities, scales, layers.
        self._composed: OrderedDict[tuple, _Composed] = OrderedDict()
        self._markers: dict[str, tuple[int, ...]] = {}
        self._model_markers = markers_for(tokenizer)

    # -- vectors ---------------------------------------------------------------------
    def _load_file(self, path: Path, where: str
                   ) -> tuple[tuple[str, int, int], SteeringVector, dict[int, np.ndarray]]:
        try:
            st = path.stat()
        except OSError as e:
            raise SpecError(where, f"vector file {path} cannot be read ({e.strerror})") from e
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._files.get(key)
        if hit is None:
            try:
                v = load_vector(path)
            except SteeringVectorError as e:
                raise SpecError(where, str(e)) from e
            hit = (v, {k: t.numpy() for k, t in v.directions.items()})
            with self._lock:
                self._files[key] = hit
        return (key, *hit)

    def load_vector_file(self, path: Path, where: str) -> SteeringVector:
        """The parsed vector at ``path`` (cached by path, mtime and size)."""
        return self._load_file(path, where)[1]

    def forget_file(self, path: Path) -> None:
        """Drop ``path``'s cached vector and the compositions that used it."""
        p = str(path)
        with self._lock:
            for key in [k for k in self._files if k[0] == p]:
                del self._files[key]
            for key in [k for k in self._composed if any(part[0][0] == p for part in k)]:
                del self._composed[key]

    def vector_for(self, ref_name: str | None, ref_path: str | None, where: str
                   ) -> tuple[tuple[tuple[str, int, int], SteeringVector, dict[int, np.ndarray]],
                              float, tuple[int, ...] | None]:
        """((file key, vector, numpy directions), default scale, default layers)."""
        if ref_name is not None:
            entry = self.registry.entries.get(ref_name)
            if entry is None:
                known = ", ".join(sorted(self.registry.entries)) or "none registered"
                raise SpecError(f"{where}.name", f"unknown vector {ref_name!r} (known: {known})")
            return self._load_file(entry.path, f"{where}.name"), entry.scale, entry.layers
        assert ref_path is not None
        real = self.registry.is_allowed(ref_path)
        if real is None:
            raise SpecError(f"{where}.path",
                            f"{ref_path!r} is not inside an allowed vector directory")
        return self._load_file(real, f"{where}.path"), 1.0, None

    def compose(self, spec: SteeringSpec, prefix: str = "steering.") -> _Composed:
        """Sum ``scale * vector`` per layer: layers and float32 ``[len(layers), hidden]``.

        Cached by (file identity, scale, layers) of every vector, so a repeated spec costs a
        few ``stat`` calls; composing is numpy on the calling thread (torch's small-op
        overhead and thread pool cost milliseconds per request here).
        """
        parts = []
        for i, ref in enumerate(spec.vectors):
            where = f"{prefix}vectors[{i}]"
            (key, vec, dirs), default_scale, default_layers = self.vector_for(
                ref.name, ref.path, where)
            if vec.hidden_size != self.hidden_size:
                raise SpecError(where, f"vector hidden size {vec.hidden_size} does not match "
                                       f"the served model's hidden size {self.hidden_size}")
            layers = ref.layers if ref.layers is not None else default_layers
            if layers is None:
                layers = tuple(vec.layers)
            bad = [x for x in layers if x >= self.num_layers]
            if bad:
                raise SpecError(f"{where}.layers", f"layer {bad[0]} out of range: the model has "
                                f"{self.num_layers} layers (0..{self.num_layers - 1})")
            missing = [x for x in layers if x not in dirs]
            if missing:
                raise SpecError(f"{where}.layers",
                                f"vector has no direction for layers {missing} (has {vec.layers})")
            scale = ref.scale if ref.scale is not None else default_scale
            parts.append((key, float(scale), tuple(layers), dirs))
        cache_key = tuple((k, sc, ls) for k, sc, ls, _ in parts)
        with self._lock:
            hit = self._composed.get(cache_key)
            if hit is not None:
                self._composed.move_to_end(cache_key)
                return hit
        used = sorted({layer for _, _, ls, _ in parts for layer in ls})
        row = {layer: i for i, layer in enumerate(used)}
        delta = np.zeros((len(used), self.hidden_size), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for _, scale, layers, dirs in parts:
                for layer in layers:
                    delta[row[layer]] += np.float32(scale) * dirs[layer]
        if not np.isfinite(delta).all():
            raise SpecError(f"{prefix}vectors", "composed steering overflows (non-finite values)")
        idx = tuple(used)
        out = _Composed(idx, torch.from_numpy(delta), content_digest(idx, delta))
        with self._lock:
            self._composed[cache_key] = out
            while len(self._composed) > _COMPOSED_CACHE:
                self._composed.popitem(last=False)
        return out

    # -- whole spec ------------------------------------------------------------------
    def resolve(self, spec: SteeringSpec, prompt_len: int) -> ResolvedSteering:
        composed = self.compose(spec)

        canon = spec.at_absolute_positions(prompt_len)
        mode, start = canon.apply_to, canon.start_position
        end = NO_END if canon.end_position is None else canon.end_position
        ts: tuple[int, ...] = ()
        te: tuple[int, ...] = ()
        if mode in ("thinking", "answer"):
            if not self.thinking_supported:
                raise SpecError("steering.apply_to", f"{mode!r} needs the engine to run without "
                                "async scheduling (start it with --no-async-scheduling)")
            m_start, m_end = self.think_markers
            ts = self._marker_ids(spec.think_start or m_start, "steering.think_start")
            te = self._marker_ids(spec.think_end or m_end, "steering.think_end")
        return ResolvedSteering(composed.layers, composed.delta, mode, start, end, ts, te,
                                composed.digest)

    @property
    def think_markers(self) -> tuple[str, str]:
        """The registry's markers, else the served model's own, else ``<think>``/``</think>``."""
        return self.registry.think_markers or self._model_markers

    def _marker_ids(self, marker: str, where: str) -> tuple[int, ...]:
        if self.tokenizer is None:
            raise SpecError(where, "thinking/answer modes need the engine's tokenizer")
        ids = self._markers.get(marker)
        if ids is None:
            ids = tuple(int(i) for i in self.tokenizer.encode(marker, add_special_tokens=False))
            if len(self._markers) < 1024:
                self._markers[marker] = ids
        if not ids:
            raise SpecError(where, f"marker {marker!r} tokenizes to nothing")
        return ids


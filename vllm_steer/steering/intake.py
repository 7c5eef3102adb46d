"""Worker side of the wire: program -> composed tables, with the vectors fetched once.

A worker sees a program's vectors by content id. ``Intake.composed`` finds each vector in
this order: sent inline with the request (hash-checked), the worker's memory, the
content-addressed store (``steering.store``; hash-checked on first read). Composed programs
are kept by digest while live (``SlotTable``) and in a bounded LRU after, so a program is
composed once per worker, not once per request. vLLM-free.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from vllm_steer.steering.program import Composed, compose
from vllm_steer.steering.store import Directions, StoreError, VectorStore, content_id, decode
from vllm_steer.steering.values import SpecError
from vllm_steer.steering.wire import WireError, WireSteering


class Intake:
    """Per-worker caches of vectors (by content id) and composed programs (by digest)."""

    def __init__(self, num_layers: int, hidden: int, max_projections: int,
                 cache_bytes: int = 256 << 20) -> None:
        self.num_layers, self.hidden = num_layers, hidden
        self.max_projections = max_projections
        self.cache_bytes = cache_bytes
        self._stores: dict[str, VectorStore] = {}
        self._composed: OrderedDict[str, Composed] = OrderedDict()
        self._composed_bytes = 0
        self.stats = {"composed": 0, "store_reads": 0, "inline_vectors": 0}

    def composed(self, w: WireSteering, which: str = "then") -> Composed:
        """The composed tables of ``w``'s program (``then``: its ``parts``; ``else`` /
        ``prompt``: its gate's; checked against the digest)."""
        if which == "then":
            digest = w.digest
        else:
            got = w.gate_program(which)
            if got is None:
                raise WireError(f"gate.{which}_parts", "empty")
            digest = got[0]
        hit = self._composed.get(digest)
        if hit is not None:
            self._composed.move_to_end(digest)
            return hit
        program = w.program() if which == "then" else got[1]
        out = self._compose(w, program)
        self._remember(digest, out)
        return out

    def directions(self, w: WireSteering, content: str, layer: int) -> np.ndarray:
        """One vector's float32 direction at ``layer`` (a condition's ``v``)."""
        dirs = self._reader(w)(content)
        if layer not in dirs:
            raise WireError("gate.conditions", f"vector {content[:12]} has no direction for "
                                               f"layer {layer}")
        return np.asarray(dirs[layer], dtype=np.float32)

    def _reader(self, w: WireSteering):
        inline: dict[str, Directions] = {}
        for k, v in enumerate(w.inline):
            dirs = decode(v.layers, v.data, w.hidden)
            if content_id(dirs) != v.content:
                raise WireError(f"inline[{k}].content", "does not match the data")
            inline[v.content] = dirs
            self.stats["inline_vectors"] += 1

        def directions(cid: str) -> Directions:
            if cid in inline:
                return inline[cid]
            store = self._stores.get(w.store)
            if store is None:
                store = self._stores[w.store] = VectorStore(w.store, self.cache_bytes)
            try:
                found = store.get(cid)
            except StoreError as e:
                raise WireError("parts", str(e)) from e
            self.stats["store_reads"] += 1
            return found

        return directions

    def _compose(self, w: WireSteering, program: Any) -> Composed:
        directions = self._reader(w)
        try:
            out = compose(program, directions, self.hidden, self.max_projections, where="parts")
        except SpecError as e:  # the frontend ran the same checks: version skew
            raise WireError(e.field, e.message) from None
        except KeyError as e:
            raise WireError("parts", f"vector has no direction for layer {e}") from None
        if not (np.isfinite(out.proj_dir).all() and np.isfinite(out.proj_a).all()
                and np.isfinite(out.proj_b).all()):
            raise WireError("parts", "non-finite projection tables")
        self.stats["composed"] += 1
        return out

    def _remember(self, digest: str, c: Composed) -> None:
        if c.nbytes > self.cache_bytes:
            return
        self._composed[digest] = c
        self._composed_bytes += c.nbytes
        while self._composed_bytes > self.cache_bytes:
            _, old = self._composed.popitem(last=False)
            self._composed_bytes -= old.nbytes

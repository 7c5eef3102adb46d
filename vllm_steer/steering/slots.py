"""Preallocated steering tables and the slot manager (worker side).

Like vLLM's LoRA manager: every distinct program (``steering.program``) gets one slot (row)
of per-layer tables; slot 0 stays all zeros, the identity, for unsteered tokens. A
per-token row index, refilled in place before each forward, selects each token's slot, so
a layer costs one gather per table however many vectors a request composes.

Per decoder layer ``i`` (``LayerTables``): ``add[i]`` ``[num_slots, hidden]``; with
``max_projections`` K > 0 also ``proj_dir[i]`` ``[num_slots, K, hidden]`` (unit
directions), ``proj_a[i]`` / ``proj_b[i]`` ``[num_slots, K]``, and one ``norm`` flag
``[num_slots]`` shared by all layers. K = 0 allocates only ``add`` (addition only).

Slots are keyed by the program digest and reference-counted by live requests. The tables
have ``max_num_seqs + 1`` rows, so the distinct programs of one batch always fit; when
preempted requests keep digests alive and the rows run out, a row whose digest is not in
the current batch is evicted and re-uploaded from host memory when needed again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_steer.steering.program import Composed


@dataclass(frozen=True)
class LayerTables:
    """What one decoder layer's traced forward reads (all preallocated, updated in place)."""

    add: torch.Tensor
    proj_dir: torch.Tensor | None
    proj_a: torch.Tensor | None
    proj_b: torch.Tensor | None
    norm: torch.Tensor | None

    @property
    def num_projections(self) -> int:
        return 0 if self.proj_dir is None else int(self.proj_dir.shape[1])


class SlotTable:
    """Per-layer device tables plus digest -> slot bookkeeping."""

    def __init__(self, num_layers: int, num_slots: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, max_projections: int = 0) -> None:
        if num_slots < 2:
            raise ValueError("need at least 2 slots (slot 0 is the zero row)")
        if max_projections < 0:
            raise ValueError("max_projections must be >= 0")
        self.num_layers, self.num_slots, self.hidden = num_layers, num_slots, hidden
        self.max_projections = k = max_projections

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.tables = [zeros(num_slots, hidden) for _ in range(num_layers)]
        self.proj_dir = [zeros(num_slots, k, hidden) for _ in range(num_layers)] if k else None
        self.proj_a = [zeros(num_slots, k) for _ in range(num_layers)] if k else None
        self.proj_b = [zeros(num_slots, k) for _ in range(num_layers)] if k else None
        self.norm = zeros(num_slots) if k else None
        self._host: dict[str, Composed] = {}
        self._refs: dict[str, int] = {}
        self._slot_of: dict[str, int] = {}
        self._digest_in: list[str | None] = [None] * num_slots
        self._free = list(range(num_slots - 1, 0, -1))

    def layer(self, i: int) -> LayerTables:
        if self.proj_dir is None:
            return LayerTables(self.tables[i], None, None, None, None)
        assert self.proj_a is not None and self.proj_b is not None
        return LayerTables(self.tables[i], self.proj_dir[i], self.proj_a[i], self.proj_b[i],
                           self.norm)

    # -- reference counting (request lifetime) -------------------------------------
    def acquire(self, digest: str, composed: Composed | None) -> None:
        """A live request uses ``digest``; ``composed`` may be None only while ``digest``
        is live (the tables already hold it)."""
        if digest not in self._refs:
            if composed is None:
                raise ValueError(f"vllm-steer: no content for steering {digest[:12]}, which "
                                 "this worker does not hold")
            if composed.num_projections > self.max_projections or (
                    composed.normalize and not self.max_projections):
                raise ValueError(f"vllm-steer: steering {digest[:12]} needs "
                                 f"{composed.num_projections} projections per layer; the "
                                 f"tables hold {self.max_projections}")
            self._refs[digest] = 0
            self._host[digest] = composed
        self._refs[digest] += 1

    def is_live(self, digest: str) -> bool:
        """True while a live request holds ``digest``."""
        return digest in self._refs

    def release(self, digest: str) -> None:
        n = self._refs[digest] - 1
        if n:
            self._refs[digest] = n
            return
        del self._refs[digest], self._host[digest]
        slot = self._slot_of.pop(digest, None)
        if slot is not None:
            self._digest_in[slot] = None
            self._free.append(slot)

    # -- residency (per step) --------------------------------------------------------
    def slot_for(self, digest: str, pinned: set[str]) -> int:
        """Row holding ``digest``, uploading it if needed; never evicts a ``pinned`` digest."""
        slot = self._slot_of.get(digest)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
        else:
            slot = next((s for s in range(1, self.num_slots)
                         if self._digest_in[s] not in pinned), None)
            if slot is None:  # cannot happen with num_slots > max_num_seqs
                raise RuntimeError("vllm-steer: more distinct steering vectors in one batch "
                                   f"than table slots ({self.num_slots - 1})")
            old = self._digest_in[slot]
            if old is not None:
                del self._slot_of[old]
        self._upload(slot, self._host[digest])
        self._slot_of[digest] = slot
        self._digest_in[slot] = digest
        return slot

    def _upload(self, slot: int, c: Composed) -> None:
        dev, dtype = self.tables[0].device, self.tables[0].dtype
        rows = list(c.layers)
        add = torch.zeros(self.num_layers, self.hidden, dtype=torch.float32)
        add[rows] = torch.from_numpy(c.add)
        add = add.to(device=dev, dtype=dtype)
        for i, table in enumerate(self.tables):
            table[slot].copy_(add[i])
        if self.proj_dir is None:
            return
        assert self.proj_a is not None and self.proj_b is not None and self.norm is not None
        k, kc = self.max_projections, c.num_projections
        pd = torch.zeros(self.num_layers, k, self.hidden, dtype=torch.float32)
        pa = torch.zeros(self.num_layers, k, dtype=torch.float32)
        pb = torch.zeros(self.num_layers, k, dtype=torch.float32)
        if kc:
            pd[rows, :kc] = torch.from_numpy(c.proj_dir)
            pa[rows, :kc] = torch.from_numpy(c.proj_a)
            pb[rows, :kc] = torch.from_numpy(c.proj_b)
        pd, pa, pb = (t.to(device=dev, dtype=dtype) for t in (pd, pa, pb))
        for i in range(self.num_layers):
            self.proj_dir[i][slot].copy_(pd[i])
            self.proj_a[i][slot].copy_(pa[i])
            self.proj_b[i][slot].copy_(pb[i])
        self.norm[slot] = 1.0 if c.normalize else 0.0

    # -- introspection (tests, benchmarks) ------------------------------------------
    def stats(self) -> dict[str, int]:
        per_slot = self.num_layers * (self.hidden + self.max_projections * (self.hidden + 2))
        per_slot = per_slot * self.tables[0].element_size()
        if self.norm is not None:
            per_slot += self.norm.element_size()
        return {
            "num_slots": self.num_slots,
            "live_digests": len(self._refs),
            "resident": len(self._slot_of),
            "free_slots": len(self._free),
            "max_projections": self.max_projections,
            "table_bytes": per_slot * self.num_slots,
            "bytes_per_slot": per_slot,
        }

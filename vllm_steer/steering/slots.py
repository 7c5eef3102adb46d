"""Preallocated steering tables and the slot manager (worker side).

Like vLLM's LoRA manager: every distinct composed vector gets one slot (row) of a
per-layer table ``[num_slots, hidden]``; slot 0 stays all zeros for unsteered tokens.
A per-token row index, refilled in place before each forward, selects each token's
slot, so a layer costs one gather and one add however many vectors a request composes.

Slots are keyed by the vector digest and reference-counted by live requests. The
table has ``max_num_seqs + 1`` rows, so the distinct digests of one batch always fit;
when preempted requests keep digests alive and the rows run out, a row whose digest is
not in the current batch is evicted and reloaded from host memory when needed again.
"""

from __future__ import annotations

import torch


class SlotTable:
    """Per-layer device tables plus digest -> slot bookkeeping.

    ``tables[i]``: ``[num_slots, hidden]`` in the model dtype for decoder layer ``i``.
    """

    def __init__(self, num_layers: int, num_slots: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_slots < 2:
            raise ValueError("need at least 2 slots (slot 0 is the zero row)")
        self.num_layers, self.num_slots, self.hidden = num_layers, num_slots, hidden
        self.tables = [torch.zeros(num_slots, hidden, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self._host: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}  # digest -> delta
        self._refs: dict[str, int] = {}
        self._slot_of: dict[str, int] = {}
        self._digest_in: list[str | None] = [None] * num_slots
        self._free = list(range(num_slots - 1, 0, -1))

    # -- reference counting (request lifetime) -------------------------------------
    def acquire(self, digest: str, layers: tuple[int, ...], delta: torch.Tensor | None) -> None:
        """A live request uses ``digest``; ``delta`` is float32 ``[len(layers), hidden]``
        (may be None only while ``digest`` is live: the table already holds it)."""
        if digest not in self._refs:
            if delta is None:
                raise ValueError(f"vllm-steer: no delta for steering {digest[:12]}, which this "
                                 "worker does not hold")
            self._refs[digest] = 0
            self._host[digest] = (layers, delta)
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
        layers, delta = self._host[digest]
        dense = torch.zeros(self.num_layers, self.hidden, dtype=torch.float32)
        dense[list(layers)] = delta
        dense = dense.to(device=self.tables[0].device, dtype=self.tables[0].dtype)
        for i, table in enumerate(self.tables):
            table[slot].copy_(dense[i])
        self._slot_of[digest] = slot
        self._digest_in[slot] = digest
        return slot

    # -- introspection (tests, benchmarks) ------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "num_slots": self.num_slots,
            "live_digests": len(self._refs),
            "resident": len(self._slot_of),
            "free_slots": len(self._free),
            "table_bytes": sum(t.numel() * t.element_size() for t in self.tables),
            "bytes_per_slot": self.num_layers * self.hidden * self.tables[0].element_size(),
        }

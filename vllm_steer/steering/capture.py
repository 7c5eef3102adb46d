"""Hidden-state capture inside the serving engine: the per-layer op and the worker's book.
vLLM-free.

Each steerable decoder layer (``steering.layers``) ends its wrapped forward with one call
of the custom op ``torch.ops.vllm_steer.capture(stream, residual, layer, sink)``: the
residual stream after block ``layer`` is ``stream`` (+ ``residual`` for layers that
defer the residual add), after any steering. The op is opaque to torch.compile, so the
compiled graph calls its Python body at run time; that body returns at once unless the
process's ``CaptureBook`` has a plan for the current step. The cost of a batch without
captures is therefore one dispatcher call per layer and no per-token Python. ``sink``
(one element, never written) is declared mutated so that the compiler keeps the call.

The book (one per runner that records, i.e. on tensor-parallel rank 0; the stream is
the same on every rank) holds each capturing request's entry. Before each forward the
runner gives it the batch (``plan``: request order, scheduled token counts, first
positions), from which it computes, per capturing request, which rows of the flattened
token dimension hold captured positions; the op then copies those rows (``tokens``) or
adds their sum (``mean``) into the entry. A position is recorded once even when it is
computed again (preemption recomputes a request from the start): each entry remembers
how far it has recorded. Entries are collected by id (``take``); finished entries that
nobody collects are dropped oldest first beyond ``pending_limit_bytes``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_steer.steering.capture_spec import WireCapture
from vllm_steer.steering.layer_ops import define_layer_op

logger = logging.getLogger("vllm_steer")

#: The book whose plan covers the forward about to run (set by ``CaptureBook.plan``, which
#: runs right before its engine's forward; None when that step captures nothing). Engines
#: sharing a process (in-process engine cores) run their steps one at a time, so the
#: latest plan is always the running forward's.
_ACTIVE: CaptureBook | None = None


def _capture_impl(stream: torch.Tensor, residual: torch.Tensor | None, layer: int,
                  sink: torch.Tensor) -> None:
    book = _ACTIVE
    if book is None:
        return
    book.record(layer, stream, residual)


capture_op = define_layer_op(
    "capture", "Tensor stream, Tensor? residual, int layer, Tensor(a!) sink", _capture_impl)


# -- the book ---------------------------------------------------------------------------------
@dataclass
class _Entry:
    wire: WireCapture
    req_id: str
    layer_rows: dict[int, int]
    positions: np.ndarray | None   # sorted absolute positions (tokens mode), else None
    values: torch.Tensor | None = None   # tokens: [L, P, H]; mean: [L, H] (sums), float32
    done_upto: int = 0             # positions below this are recorded (or were skipped)
    count: int = 0                 # positions recorded (mean: summed) so far
    finished: bool = False
    error: str | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return self.done_upto >= self.wire.end

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * 4


@dataclass
class _Take:
    """One capturing request's rows in this step's flattened token dimension."""

    entry: _Entry
    lo: int                       # flattened row of the first captured token of the step
    hi: int
    src: torch.Tensor | None      # tokens mode: rows (relative to lo) to copy, or None = all
    dst: torch.Tensor | slice     # tokens mode: destination rows in entry.values
    first_pos: int                # position of row lo


class CaptureBook:
    """Captures of the requests one worker runs, keyed by capture id."""

    def __init__(self, num_layers: int, hidden: int, pending_limit_bytes: int = 1 << 30) -> None:
        self.num_layers, self.hidden = num_layers, hidden
        self.pending_limit_bytes = pending_limit_bytes
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.by_req: dict[str, _Entry] = {}
        self.step: list[_Take] = []
        self.stats = {"captures": 0, "taken": 0, "dropped_uncollected": 0}

    # -- request lifetime -------------------------------------------------------------------
    def add_request(self, req_id: str, wire: WireCapture) -> None:
        bad = [i for i in wire.layers if not 0 <= i < self.num_layers]
        if wire.id in self.entries:
            old = self.entries.pop(wire.id)
            self.by_req.pop(old.req_id, None)
            logger.warning("vllm-steer: capture id %r reused before it was collected; the "
                           "earlier capture is dropped", wire.id)
        positions = None if wire.positions is None else np.asarray(wire.positions, np.int64)
        entry = _Entry(wire, req_id, {layer: k for k, layer in enumerate(wire.layers)},
                       positions, done_upto=wire.start)
        if bad:
            entry.error = f"layers {bad} out of range for {self.num_layers} layers"
        self.entries[wire.id] = entry
        self.by_req[req_id] = entry
        self.stats["captures"] += 1

    def finish_requests(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            entry = self.by_req.pop(rid, None)
            if entry is not None:
                entry.finished = True
        self._trim()

    def _trim(self) -> None:
        total = sum(e.nbytes for e in self.entries.values())
        if total <= self.pending_limit_bytes:
            return
        for cid in [c for c, e in self.entries.items() if e.finished]:
            if total <= self.pending_limit_bytes:
                break
            total -= self.entries.pop(cid).nbytes
            self.stats["dropped_uncollected"] += 1
            logger.warning("vllm-steer: capture %r was not collected; dropped (more than %d "
                           "bytes of captures pending)", cid, self.pending_limit_bytes)

    # -- per step ---------------------------------------------------------------------------
    def plan(self, req_ids: Sequence[str], num_scheduled: np.ndarray,
             num_computed: np.ndarray) -> None:
        """Work out this step's captured rows (``req_ids``, ``num_scheduled`` and
        ``num_computed``: the batch in order; its scheduled tokens are contiguous per
        request in that order). Clears the plan when nothing is captured."""
        global _ACTIVE
        self.step = []
        _ACTIVE = None
        if not self.by_req:
            return
        offsets = None
        for i, rid in enumerate(req_ids):
            entry = self.by_req.get(rid)
            if entry is None or entry.error is not None:
                continue
            n, first = int(num_scheduled[i]), int(num_computed[i])
            lo_pos = max(first, entry.done_upto)
            hi_pos = min(first + n, entry.wire.end)
            if lo_pos >= hi_pos:
                continue
            if offsets is None:
                offsets = np.concatenate(([0], np.cumsum(num_scheduled[:len(req_ids)])))
            base = int(offsets[i]) - first   # flattened row of position p is base + p
            w = entry.wire
            src: torch.Tensor | None = None
            dst: torch.Tensor | slice
            if w.mode == "mean":
                dst = slice(None)
                count = hi_pos - lo_pos
            elif entry.positions is None:            # every position of [start, end)
                dst = slice(lo_pos - w.start, hi_pos - w.start)
                count = hi_pos - lo_pos
            else:
                a, b = np.searchsorted(entry.positions, [lo_pos, hi_pos])
                if a == b:
                    entry.done_upto = hi_pos
                    continue
                picked = entry.positions[a:b]
                src = torch.from_numpy(picked - lo_pos)
                dst = slice(int(a), int(b))
                count = int(b - a)
            self.step.append(_Take(entry, base + lo_pos, base + hi_pos, src, dst, lo_pos))
            entry.done_upto = hi_pos
            entry.count += count
        if self.step:
            _ACTIVE = self

    def record(self, layer: int, stream: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Called by the op for block ``layer`` with its output stream ``[T, H]``
        (``stream + residual`` when the layer defers the residual add)."""
        for t in self.step:
            row = t.entry.layer_rows.get(layer)
            if row is None:
                continue
            x = stream[t.lo:t.hi]
            if residual is not None:
                x = x + residual[t.lo:t.hi]
            if t.src is not None:
                x = x.index_select(0, t.src.to(x.device))
            x = x.float()
            e = t.entry
            if e.values is None:
                shape = ((len(e.layer_rows), self.hidden) if e.wire.mode == "mean"
                         else (len(e.layer_rows), e.wire.num_rows, self.hidden))
                e.values = torch.zeros(shape, dtype=torch.float32, device=x.device)
            if e.wire.mode == "mean":
                e.values[row] += x.sum(0)
            else:
                e.values[row, t.dst] = x

    # -- collection -------------------------------------------------------------------------
    def take(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Pop the captures ``ids`` that this book holds: ``{id: {"layers", "mode",
        "positions" (absolute, tokens mode), "start", "end", "values" (float32 bytes of
        ``shape`` ``[layers, positions, hidden]`` or, mean, ``[layers, hidden]``),
        "shape", "count", "complete", "error"}}``. Ids it does not hold are left out."""
        out: dict[str, dict[str, Any]] = {}
        for cid in ids:
            e = self.entries.pop(cid, None)
            if e is None:
                continue
            if not e.finished:
                self.by_req.pop(e.req_id, None)
            w = e.wire
            vals = e.values
            if vals is not None and w.mode == "mean" and e.count:
                vals = vals / e.count
            out[cid] = {
                "layers": list(w.layers), "mode": w.mode, "start": w.start, "end": w.end,
                "positions": (list(w.positions) if w.positions is not None
                              else list(range(w.start, w.end))) if w.mode == "tokens" else None,
                # raw float32 bytes + shape: survive every RPC encoding vLLM uses
                "values": None if vals is None else vals.cpu().numpy().tobytes(),
                "shape": None if vals is None else list(vals.shape),
                "count": e.count, "complete": e.complete, "error": e.error,
            }
            self.stats["taken"] += 1
        return out

    def summary(self) -> dict[str, Any]:
        return {**self.stats, "capture_pending": len(self.entries),
                "capture_pending_bytes": sum(e.nbytes for e in self.entries.values())}

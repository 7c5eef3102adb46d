"""Conditions on the worker: what the traced forwards accumulate, and the decision. vLLM-free.

Device state (preallocated, updated in place; ``R`` request slots, slot 0 unused,
``C = MAX_CONDITIONS``):

- ``acc`` float32 ``[1 + R * C * 2, hidden]``: per request slot ``r`` and distinct
  condition layer ``j`` two rows, ``S`` (sum of the block outputs of prompt positions
  ``0 .. split - 2``) and ``Lst`` (the output at the last prompt position ``split - 1``);
  row 0 is the trash row every other token adds into.
- ``targets[i]`` long ``[num_rows]`` per decoder layer (device targets only, see below):
  the ``acc`` row each scheduled token adds its block-``i`` output to (0: trash). Every
  layer's traced forward runs ``acc.index_add_(0, targets[i][:T], stream)``: one
  reduction per layer, no branch.
- per slot: directions ``dirs [R, C, hidden]``, thresholds, comparison, aggregation,
  validity, ``split``, ``any``/``all``; results ``score [R, C]``, ``held [R, C]`` and
  ``gate [R]`` (1: the rule holds). ``gate[0]`` is 1 for ever: tokens of requests without
  a condition point at it and keep their row.

Between steps (``flush``), for every request whose last prompt position was computed in
an earlier step, a few tensor ops (no host sync, no branch on tensor data) compute
``h`` (``mean = (S + Lst) / split``, ``last = Lst``), the score (``condition.cast_score``),
each condition's outcome and the rule, into ``gate``. The runner then picks each gated
token's table row with ``torch.where(gate[req], then_row, else_row)``. The first
generated position is computed one step after the last prompt position, so its gate is
always decided; the decision is never recomputed (preemption keeps it).

Two ways to accumulate, chosen per engine (``host_planned``):

- **device targets** (above): every layer's traced forward runs one ``index_add_`` of the
  whole ``[T, hidden]`` stream, whatever the batch holds. A replayed CUDA graph runs it
  with fresh targets, so this is the way under CUDA graphs, where it is cheap; on a CPU it
  cost every request ~7% (30 layers x ``T x hidden`` scattered adds, most into the trash).
- **host-planned spans** (engines without CUDA graphs: CPU, eager, cudagraph mode NONE):
  every layer ends with the opaque op ``torch.ops.vllm_steer.cond_accumulate``, whose
  Python body returns at once unless this step planned spans at that layer; then it adds
  ``stream[a:b] (+ residual[a:b])`` summed over the span to the request's row. The cost of
  a step without a conditioned prompt is one dispatcher call per layer; with one, one
  reduction at each of its condition layers (the op, like the capture op, does not run
  inside a replayed CUDA graph, hence the other way there).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_steer.steering.condition import MAX_CONDITIONS, cast_score
from vllm_steer.steering.layer_ops import define_layer_op
from vllm_steer.steering.wire import WireGate

logger = logging.getLogger("vllm_steer")

#: The host-planned table whose plan covers the forward about to run (set by ``plan``,
#: which runs right before its engine's forward). Engines sharing a process (in-process
#: engine cores) run their steps one at a time; the op also checks that the accumulator it
#: was given is this table's, so another engine's forward never adds this plan. Nothing
#: engine-specific is baked into a compiled graph (a cached graph may serve another engine).
_ACTIVE: ConditionTable | None = None


def _accumulate_impl(stream: torch.Tensor, residual: torch.Tensor | None, layer: int,
                     acc: torch.Tensor) -> None:
    t = _ACTIVE
    if t is not None and t._spans and t.acc.data_ptr() == acc.data_ptr():
        t.accumulate(layer, stream, residual)


cond_accumulate_op = define_layer_op(
    "cond_accumulate", "Tensor stream, Tensor? residual, int layer, Tensor(a!) acc",
    _accumulate_impl)


@dataclass
class CondReq:
    """Host bookkeeping of one conditioned request (one slot)."""

    req_id: str
    slot: int
    split: int
    layers: tuple[int, ...]          # distinct condition layers; index j
    labels: tuple[str, ...]
    cond_layers: tuple[int, ...]     # per condition
    thresholds: tuple[float, ...]
    compares: tuple[str, ...]
    aggregates: tuple[str, ...]
    mode: str
    report: str
    needs_whole_prompt: bool
    child: int | None                # choice index (n > 1), else None
    done_upto: int = 0               # prompt positions below this are accumulated
    pending: bool = False            # prompt complete, not scored yet
    scored: bool = False
    collected: bool = False          # its decided report was handed out while it ran
    error: str | None = None
    created: float = field(default_factory=time.monotonic)


class ConditionTable:
    """The device tables of ``num_slots - 1`` conditioned requests and their scoring."""

    def __init__(self, num_layers: int, num_slots: int, hidden: int, device: torch.device,
                 num_rows: int, max_reports: int = 8192, host_planned: bool = False) -> None:
        c = MAX_CONDITIONS
        self.num_layers, self.num_slots, self.hidden = num_layers, num_slots, hidden
        self.device = device
        self.host_planned = host_planned
        #: host-planned: per layer this step's ``(a, b, row_s, row_l)`` spans of flattened
        #: rows (``row_l`` -1: the span ends before the last prompt position)
        self._spans: dict[int, list[tuple[int, int, int, int]]] = {}

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.acc = zeros(1 + num_slots * c * 2, hidden)
        if host_planned:
            num_rows = 1    # no device targets: the spans say where each sum goes
        self.targets = [zeros(num_rows, dtype=torch.long) for _ in range(num_layers)]
        self._targets_host = (self.targets if device.type == "cpu" else
                              [torch.zeros(num_rows, dtype=torch.long, pin_memory=True)
                               for _ in range(num_layers)])
        self._targets_np = [t.numpy() for t in self._targets_host]
        self._dirty: dict[int, int] = {}           # layer -> targets[:n] may be non-zero
        self.dirs = zeros(num_slots, c, hidden)
        self.thr = zeros(num_slots, c)
        self.above = zeros(num_slots, c, dtype=torch.bool)
        self.mean = zeros(num_slots, c, dtype=torch.bool)
        self.valid = zeros(num_slots, c, dtype=torch.bool)
        self.row_s = zeros(num_slots, c, dtype=torch.long)
        self.row_l = zeros(num_slots, c, dtype=torch.long)
        self.split = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.any = zeros(num_slots, dtype=torch.bool)
        self.score = zeros(num_slots, c)
        self.held = zeros(num_slots, c, dtype=torch.bool)
        self.gate = zeros(num_slots, dtype=torch.long)
        self.gate[0] = 1
        self._free = list(range(num_slots - 1, 0, -1))
        self.by_req: dict[str, CondReq] = {}
        self._pending: list[CondReq] = []
        #: Reports of finished requests, by report key, until collected (bounded).
        self.reports: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.max_reports = max_reports
        self.stats = {"conditioned": 0, "scored": 0, "reports_taken": 0,
                      "reports_dropped": 0}

    @staticmethod
    def acc_row(slot: int, j: int, last: bool) -> int:
        return 1 + (slot * MAX_CONDITIONS + j) * 2 + int(last)

    # -- request lifetime -------------------------------------------------------------------
    def add(self, req_id: str, gate: WireGate, directions: list[np.ndarray]) -> CondReq:
        """Take a request's conditions (``directions[k]``: condition ``k``'s float32 ``v``
        at its layer). Raises ``RuntimeError`` when no slot is free (cannot happen with
        ``num_slots`` > the engine's ``max_num_seqs``)."""
        if not self._free:
            raise RuntimeError("vllm-steer: more conditioned requests than condition slots "
                               f"({self.num_slots - 1})")
        slot = self._free.pop()
        conds = gate.conditions
        layers = tuple(dict.fromkeys(c.layer for c in conds))
        req = CondReq(req_id, slot, gate.split, layers, tuple(c.label for c in conds),
                      tuple(c.layer for c in conds),
                      tuple(c.threshold for c in conds), tuple(c.compare for c in conds),
                      tuple(c.aggregate for c in conds), gate.mode, gate.report,
                      gate.needs_whole_prompt, child_index(req_id) if gate.choices > 1 else None)
        c = MAX_CONDITIONS
        j = [layers.index(x.layer) for x in conds]
        dirs = torch.zeros(c, self.hidden)
        for k, d in enumerate(directions):
            dirs[k] = torch.from_numpy(np.asarray(d, dtype=np.float32))
        pad = c - len(conds)
        self.dirs[slot].copy_(dirs)
        self.thr[slot].copy_(torch.tensor([x.threshold for x in conds] + [0.0] * pad))
        self.above[slot].copy_(torch.tensor([x.compare == "above" for x in conds] + [False] * pad))
        self.mean[slot].copy_(torch.tensor([x.aggregate == "mean" for x in conds] + [False] * pad))
        self.valid[slot].copy_(torch.tensor([True] * len(conds) + [False] * pad))
        self.row_s[slot].copy_(torch.tensor([self.acc_row(slot, x, False) for x in j] + [0] * pad))
        self.row_l[slot].copy_(torch.tensor([self.acc_row(slot, x, True) for x in j] + [0] * pad))
        self.split[slot] = float(max(gate.split, 1))
        self.any[slot] = gate.mode == "any"
        lo, hi = self.acc_row(slot, 0, False), self.acc_row(slot, c - 1, True) + 1
        self.acc[lo:hi].zero_()
        self.gate[slot] = 0
        self.score[slot].zero_()
        self.held[slot].zero_()
        if gate.split <= 0:
            req.error = "the prompt is empty: nothing to read a condition from"
        self.by_req[req_id] = req
        self.stats["conditioned"] += 1
        return req

    def remove(self, req_id: str) -> None:
        """A request finished: keep its report for collection, free its slot."""
        req = self.by_req.pop(req_id, None)
        if req is None:
            return
        if req.pending:
            self.flush()
        if req.report and not req.collected:
            self.reports.setdefault(req.report, []).append(self.report(req))
            self.reports.move_to_end(req.report)
            while len(self.reports) > self.max_reports:
                self.reports.popitem(last=False)
                self.stats["reports_dropped"] += 1
        self._free.append(req.slot)

    # -- per step ---------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Clear the previous step's targets and score the prompts it completed."""
        for layer, n in self._dirty.items():
            self._targets_np[layer][:n] = 0
        self._cleared = dict(self._dirty)
        self._dirty = {}
        self._spans = {}
        self.flush()

    def plan(self, req: CondReq, offset: int, first: int, n: int) -> None:
        """Targets for ``req``'s ``n`` tokens scheduled at flattened rows ``offset..`` with
        positions ``first..``: prompt positions not yet accumulated go to its rows."""
        lo, hi = max(first, req.done_upto), min(first + n, req.split)
        if lo >= hi or req.error is not None:
            return
        if lo > req.done_upto and req.needs_whole_prompt:
            # the scheduler's cap should make this impossible: refuse to decide from part
            req.error = (f"prompt positions {req.done_upto}..{lo - 1} came from the prefix "
                         "cache: a mean condition cannot be read")
            logger.error("vllm-steer: request %s: %s", req.req_id, req.error)
            return
        a, b = offset + lo - first, offset + hi - first
        if self.host_planned:
            global _ACTIVE
            _ACTIVE = self
        for j, layer in enumerate(req.layers):
            if self.host_planned:
                last = self.acc_row(req.slot, j, True) if hi == req.split else -1
                self._spans.setdefault(layer, []).append(
                    (a, b - 1 if last >= 0 else b, self.acc_row(req.slot, j, False), last))
                continue
            t = self._targets_np[layer]
            t[a:b] = self.acc_row(req.slot, j, False)
            if hi == req.split:
                t[b - 1] = self.acc_row(req.slot, j, True)
            self._dirty[layer] = max(self._dirty.get(layer, 0), b)
        req.done_upto = hi
        if hi == req.split:
            req.pending = True
            self._pending.append(req)

    def end_step(self) -> None:
        """Copy the targets written (or cleared) this step to the device."""
        if self.device.type == "cpu":
            return
        for layer in set(self._dirty) | set(getattr(self, "_cleared", {})):
            n = max(self._dirty.get(layer, 0), self._cleared.get(layer, 0))
            self.targets[layer][:n].copy_(self._targets_host[layer][:n], non_blocking=True)

    def accumulate(self, layer: int, stream: torch.Tensor, residual: torch.Tensor | None
                   ) -> None:
        """Host-planned: add this step's spans at ``layer`` of the block output
        (``stream`` [T, hidden], + ``residual`` where the block defers its add) to their
        rows (float32; one reduction per span, one row copy for a last position)."""
        for a, b, row_s, row_l in self._spans.get(layer, ()):
            end = b + 1 if row_l >= 0 else b
            x = stream[a:end] if residual is None else stream[a:end] + residual[a:end]
            x = x.to(self.acc.dtype)
            if b > a:
                self.acc[row_s] += x[: b - a].sum(0)
            if row_l >= 0:
                self.acc[row_l] += x[b - a]

    def clear_targets(self) -> None:
        """Every token adds to the trash row (before a forward no step planned)."""
        self._spans = {}
        for layer in range(self.num_layers):
            self._targets_np[layer][:] = 0
            if self.device.type != "cpu":
                self.targets[layer].zero_()
        self._dirty = {}

    @property
    def active(self) -> bool:
        """True when this step's forward accumulates anything."""
        return bool(self._dirty) or bool(self._spans)

    def flush(self) -> None:
        """Score every completed prompt not scored yet (device ops, queued after the
        forward that accumulated it)."""
        reqs = [r for r in self._pending if r.pending and r.error is None]
        for r in self._pending:
            r.pending = False
        self._pending = []
        if not reqs:
            return
        idx = torch.tensor([r.slot for r in reqs], dtype=torch.long).to(self.device)
        s, last = self.acc[self.row_s[idx]], self.acc[self.row_l[idx]]      # [m, C, H]
        mean = self.mean[idx]
        h = torch.where(mean.unsqueeze(-1), (s + last) / self.split[idx][:, None, None], last)
        score = cast_score(h, self.dirs[idx])                                 # [m, C]
        thr, valid = self.thr[idx], self.valid[idx]
        ok = torch.where(self.above[idx], score >= thr, score <= thr) & valid
        rule = torch.where(self.any[idx], ok.any(-1), (ok | ~valid).all(-1))
        self.score[idx] = score
        self.held[idx] = ok
        self.gate[idx] = rule.long()
        for r in reqs:
            r.scored = True
        self.stats["scored"] += len(reqs)

    # -- reports ----------------------------------------------------------------------------
    def report(self, req: CondReq) -> dict[str, Any]:
        """``{"index", "holds", "conditions": [{"label", "score", "holds", ...}], "error"}``
        (host copies; ``holds`` None while undecided)."""
        if req.pending:
            self.flush()
        n = len(req.labels)
        out: dict[str, Any] = {"index": req.child, "mode": req.mode, "error": req.error,
                               "holds": None, "conditions": []}
        if req.scored:
            score = self.score[req.slot, :n].tolist()
            held = self.held[req.slot, :n].tolist()
            out["holds"] = bool(self.gate[req.slot].item())
        else:
            score, held = [None] * n, [None] * n
        for k in range(n):
            out["conditions"].append({
                "label": req.labels[k], "layer": req.cond_layers[k],
                "aggregate": req.aggregates[k], "threshold": req.thresholds[k],
                "compare": req.compares[k], "score": score[k], "holds": held[k]})
        return out

    def take(self, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Reports by key: finished requests' (popped) and live requests' (current; once
        decided, handed out once: the request keeps no copy when it finishes)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for key in keys:
            got = self.reports.pop(key, None)
            if got is not None:
                out[key] = list(got)
                self.stats["reports_taken"] += 1
        live = [r for r in self.by_req.values() if r.report in keys]
        for r in live:
            rep = self.report(r)
            out.setdefault(r.report, []).append(rep)
            # a decided report does not change: not kept again when the request finishes
            r.collected = rep["holds"] is not None or r.error is not None
        return out


def child_index(req_id: str) -> int | None:
    """The choice index of a request vLLM fanned out for ``n > 1``: its id is
    ``"{index}_{parent id}"`` (vLLM's ``ParentRequest.get_child_info``)."""
    head, sep, _ = req_id.partition("_")
    return int(head) if sep and head.isdigit() else None

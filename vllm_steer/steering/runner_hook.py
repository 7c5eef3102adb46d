"""The worker-side hook: steering tables inside vLLM's (V1) model runner.

``install`` patches three runner methods, all outside the compiled model:

- ``load_model``: after the model loads, wrap each decoder layer's ``forward`` so that
  it adds ``table_i[rows[:num_tokens]]`` to the block output (the residual stream).
  The wrapper is traced by torch.compile like the rest of the model; the tables and
  ``rows`` are preallocated and only ever updated in place, so the compiled graph
  (and a CUDA graph) reads fresh values without any Python branch on tensor data.
- ``_update_states``: acquire/release slot references as requests arrive and finish.
- ``_prepare_inputs``: fill ``rows`` (one slot index per scheduled token) in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vllm_steer.steering.layers import attach, plan_layers
from vllm_steer.steering.resolve import NO_END, ResolvedSteering
from vllm_steer.steering.slots import SlotTable
from vllm_steer.steering.spec import WIRE_KEY
from vllm_steer.steering.think_tracker import ANSWER, THINK, ThinkTracker

logger = logging.getLogger("vllm_steer")
_MODE_STATE = {"thinking": THINK, "answer": ANSWER}
COMPILE_KEY = "vllm_steer_hook"


@dataclass
class _ReqSteer:
    digest: str
    mode: str
    start: int
    end: int
    tracker: ThinkTracker | None = field(default=None)


class RunnerSteering:
    """Steering state attached to one model runner (one per worker process)."""

    def __init__(self, runner: Any, model: nn.Module) -> None:
        hf = runner.model_config.hf_text_config
        self.num_layers = int(hf.num_hidden_layers)
        self.hidden = int(hf.hidden_size)
        self.device = runner.device
        self.runner = runner
        num_slots = int(runner.max_num_reqs) + 1
        self.slots = SlotTable(self.num_layers, num_slots, self.hidden,
                               runner.model_config.dtype, self.device)
        n_rows = int(runner.max_num_tokens) + int(runner.max_num_reqs) + 256
        self.rows = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self._rows_host = (self.rows if self.device.type == "cpu"
                           else torch.zeros(n_rows, dtype=torch.long, pin_memory=True))
        self._rows_np = self._rows_host.numpy()
        self._filled = 0            # rows[:_filled] may be non-zero
        self.reqs: dict[str, _ReqSteer] = {}

        plan = plan_layers(model, self.num_layers, layer_adapter_option(runner.vllm_config))
        for i, layer in enumerate(plan.layers):
            if layer is not None:
                attach(layer, plan.kind, self.slots.tables[i], self.rows)
        self.adapter = plan.kind
        if plan.forced:
            logger.warning("vllm-steer: layers of %s matched no adapter; steering them as %r "
                           "because additional_config forces it", type(model).__name__,
                           plan.kind.value)
        logger.info("vllm-steer: steering %d layers of %s (%s adapter), %d slots "
                    "(%.1f MiB of tables)", self.num_layers, type(model).__name__,
                    plan.kind.value, num_slots, self.slots.stats()["table_bytes"] / 2**20)

    # -- request lifetime ----------------------------------------------------------
    def add_request(self, req_id: str, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        wire = extra.get(WIRE_KEY)
        if wire is None:
            return
        if req_id in self.reqs:      # resubmitted id: the old one was finished first
            self.remove_request(req_id)
        r = ResolvedSteering.from_wire(wire)
        digest = wire["digest"]
        self.slots.acquire(digest, r.layers, r.delta)
        tracker = (ThinkTracker(r.think_start_ids, r.think_end_ids)
                   if r.mode in _MODE_STATE else None)
        self.reqs[req_id] = _ReqSteer(digest, r.mode, r.start,
                                      r.end if r.end != NO_END else 1 << 62, tracker)

    def remove_request(self, req_id: str) -> None:
        st = self.reqs.pop(req_id, None)
        if st is not None:
            self.slots.release(st.digest)

    def remove_requests(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.remove_request(rid)

    # -- per step ------------------------------------------------------------------
    def fill_rows(self, req_ids: list[str], num_scheduled: np.ndarray,
                  num_computed: np.ndarray, token_ids: np.ndarray) -> None:
        """Write one slot index per scheduled token into ``rows`` (in place).

        ``num_scheduled``/``num_computed``: ``[num_reqs]`` in batch order;
        ``token_ids``: the batch's ``[max_reqs, max_len]`` token table (prompt + output).
        """
        rows = self._rows_np
        total = int(num_scheduled.sum())
        clear_to = max(self._filled, total)
        rows[:clear_to] = 0
        self._filled = 0
        if self.reqs:
            pinned = {self.reqs[r].digest for r in req_ids if r in self.reqs}
            offset = 0
            for i, rid in enumerate(req_ids):
                n = int(num_scheduled[i])
                st = self.reqs.get(rid)
                if st is not None and n:
                    first = int(num_computed[i])
                    lo, hi = max(st.start, first), min(st.end, first + n)
                    if lo < hi:
                        slot = self.slots.slot_for(st.digest, pinned)
                        a, b = offset + lo - first, offset + hi - first
                        if st.tracker is None:
                            rows[a:b] = slot
                        else:
                            mask = st.tracker.flags(token_ids[i], first, n, _MODE_STATE[st.mode])
                            seg = rows[offset:offset + n]
                            sel = np.zeros(n, dtype=bool)
                            sel[lo - first:hi - first] = True
                            seg[mask & sel] = slot
                        self._filled = offset + n
                offset += n
        if self.device.type != "cpu" and clear_to:
            self.rows[:clear_to].copy_(self._rows_host[:clear_to], non_blocking=True)


def install() -> None:
    """Patch vLLM's V1 model runner classes (idempotent)."""
    from vllm.v1.worker import gpu_model_runner

    classes = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner

        # CPUModelRunner overrides load_model, so patching only the GPU class misses it.
        classes.append(cpu_model_runner.CPUModelRunner)
    except Exception:  # CUDA build without the CPU runner importable
        pass
    for cls in classes:
        if "load_model" in cls.__dict__ and not getattr(cls.load_model, "_vllm_steer", False):
            cls.load_model = _wrap_load_model(cls.load_model)
    from vllm.v1.worker.worker_base import WorkerBase

    # Reachable with LLM.collective_rpc("vllm_steer_stats"): slot usage per worker.
    WorkerBase.vllm_steer_stats = _worker_stats
    base = gpu_model_runner.GPUModelRunner
    if not getattr(base._update_states, "_vllm_steer", False):
        base._update_states = _wrap_update_states(base._update_states)
        base._prepare_inputs = _wrap_prepare_inputs(base._prepare_inputs)


def layer_adapter_option(vllm_config: Any) -> str | None:
    """``additional_config={"vllm_steer": {"layer_adapter": KIND}}``: the opt-in that steers
    layers no adapter matches as ``KIND`` (see ``steering.layers``)."""
    extra = getattr(vllm_config, "additional_config", None)
    opts = extra.get("vllm_steer") if isinstance(extra, dict) else None
    value = opts.get("layer_adapter") if isinstance(opts, dict) else None
    return str(value) if value else None


def _worker_stats(worker: Any) -> dict[str, Any] | None:
    steer: RunnerSteering | None = getattr(worker.model_runner, "_vllm_steer", None)
    if steer is None:
        return None
    return {**steer.slots.stats(), "live_requests": len(steer.reqs),
            "adapter": steer.adapter.value}


def _mark(fn):
    fn._vllm_steer = True
    return fn


def traced_files() -> list[str]:
    """Source files whose code runs inside the compiled model (the layer forwards) or
    decides what is traced (which adapter a layer gets)."""
    import vllm_steer.steering.layers as layers

    return [layers.__file__, __file__]


def _add_to_compile_key(vllm_config: Any, files: list[str]) -> None:
    """Make the steering hook part of vLLM's torch.compile cache key.

    A graph compiled without the steering wrapper (plugin absent, disabled or older) must
    never be loaded by a steered engine. vLLM's AOT cache key hashes the env and
    ``vllm_config.compute_hash()``, which includes ``additional_config``; the classic
    cache also hashes ``traced_files``. Both get the hash of every traced file. Only this
    worker's copy of the config changes.
    """
    import hashlib

    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    key = h.hexdigest()[:16]
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[COMPILE_KEY] = key
    else:
        logger.warning("vllm-steer: additional_config is not a dict; the compile cache key "
                       "cannot include the steering hook")
    traced = getattr(vllm_config.compilation_config, "traced_files", None)
    if isinstance(traced, set):
        traced.update(files)


def _wrap_load_model(orig):
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        _add_to_compile_key(self.vllm_config, traced_files())
        model = self.get_model()
        self._vllm_steer = RunnerSteering(self, model)
        return out

    return _mark(load_model)


def _wrap_update_states(orig):
    def _update_states(self, scheduler_output):
        steer: RunnerSteering | None = getattr(self, "_vllm_steer", None)
        if steer is not None:
            steer.remove_requests(scheduler_output.finished_req_ids)
        out = orig(self, scheduler_output)
        if steer is not None:
            for new in scheduler_output.scheduled_new_reqs:
                steer.add_request(new.req_id, new.sampling_params)
        return out

    return _mark(_update_states)


def _wrap_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        steer: RunnerSteering | None = getattr(self, "_vllm_steer", None)
        if steer is not None:
            batch = self.input_batch
            n = batch.num_reqs
            steer.fill_rows(batch.req_ids[:n], num_scheduled_tokens[:n],
                            batch.num_computed_tokens_cpu[:n], batch.token_ids_cpu)
        return orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    return _mark(_prepare_inputs)

"""The worker side: steering tables inside vLLM's (V1) model runner.

``install`` patches three runner methods, all outside the compiled model:

- ``load_model``: after the model loads, check the live runner against the symbol table,
  add the hook to vLLM's compile-cache key, and wrap each decoder layer's ``forward``
  (``steering.layers``) so that it adds ``table_i[rows[:num_tokens]]`` to the residual
  stream. The wrapper is traced by torch.compile like the rest of the model; the tables
  and ``rows`` are preallocated and only ever updated in place, so the compiled graph
  (and a CUDA graph) reads fresh values without any Python branch on tensor data.
- ``_update_states``: acquire/release slot references as requests arrive and finish.
- ``_prepare_inputs``: fill ``rows`` (one slot index per scheduled token) and the
  condition targets in place;
- ``_dummy_run``: clear them first (a dummy forward steers and accumulates nothing).

vLLM's V2 model runner (``vllm/v1/worker/gpu/model_runner.py``) is not hooked: the plugin
sets ``VLLM_USE_V2_MODEL_RUNNER=0`` and the frontend refuses steered requests when V2 is
active anyway (``frontend.steer_request``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vllm_steer.steering.condition_table import ConditionTable, CondReq
from vllm_steer.steering.intake import Intake
from vllm_steer.steering.layers import attach, plan_layers
from vllm_steer.steering.options import EngineOptions
from vllm_steer.steering.slots import SlotTable
from vllm_steer.steering.spec import WIRE_KEY
from vllm_steer.steering.think_tracker import ANSWER, THINK, ThinkTracker
from vllm_steer.steering.wire import NO_END, WireError, WireSteering
from vllm_steer.vllm_adapter import sampler as sampler_patch
from vllm_steer.vllm_adapter.capture import RunnerCapture
from vllm_steer.vllm_adapter.check import VLLMDriftError, check_instance

logger = logging.getLogger("vllm_steer")
_MODE_STATE = {"thinking": THINK, "answer": ANSWER}
COMPILE_KEY = "vllm_steer_hook"
_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


@dataclass
class _Gate:
    """A gated request's other programs and its decision (``steering.condition``)."""

    split: int
    else_digest: str | None
    prompt_digest: str | None
    decision: bool | None          # a replay's fixed decision; None: read by ``cond``
    cond: CondReq | None


@dataclass
class _ReqSteer:
    digest: str
    mode: str
    start: int
    end: int
    tracker: ThinkTracker | None = field(default=None)
    gate: _Gate | None = None

    @property
    def digests(self) -> list[str]:
        g = self.gate
        extra = [] if g is None else [d for d in (g.else_digest, g.prompt_digest) if d]
        return [self.digest, *extra]


class RunnerSteering:
    """Steering state attached to one model runner (one per worker process)."""

    def __init__(self, runner: Any, model: nn.Module) -> None:
        hf = runner.model_config.hf_text_config
        self.num_layers = int(hf.num_hidden_layers)
        self.hidden = int(hf.hidden_size)
        self.device = runner.device
        self.runner = runner
        num_slots = int(runner.max_num_reqs) + 1
        self.options = EngineOptions.from_vllm_config(runner.vllm_config)
        self.max_projections = self.options.max_projections
        self.slots = SlotTable(self.num_layers, num_slots, self.hidden,
                               runner.model_config.dtype, self.device, self.max_projections)
        self.intake = Intake(self.num_layers, self.hidden, self.max_projections)
        n_rows = int(runner.max_num_tokens) + int(runner.max_num_reqs) + 256
        self.rows = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self._rows_host = (self.rows if self.device.type == "cpu"
                           else torch.zeros(n_rows, dtype=torch.long, pin_memory=True))
        self._rows_np = self._rows_host.numpy()
        self._filled = 0            # rows[:_filled] may be non-zero
        self.reqs: dict[str, _ReqSteer] = {}
        # Conditional steering: per gated token its request's condition slot and its row
        # when the rule does not hold (``steering.condition_table``).
        self.conditions = (ConditionTable(self.num_layers, num_slots, self.hidden, self.device,
                                          n_rows, host_planned=not cuda_graphs(runner))
                           if self.options.conditions else None)
        self._tok_req = np.zeros(n_rows, dtype=np.int64)
        self._rows_else = np.zeros(n_rows, dtype=np.int64)
        self._gated = 0             # _tok_req[:_gated] may be non-zero

        # Hidden-state capture (vllm_adapter/capture.py): the layers end with the capture op.
        self.capture = (RunnerCapture(self.device, self.num_layers, self.hidden, self.options)
                        if self.options.capture else None)
        plan = plan_layers(model, self.num_layers, self.options.layer_adapter)
        cond = self.conditions
        for i, layer in enumerate(plan.layers):
            if layer is not None:
                attach(layer, plan.kind, self.slots.layer(i), self.rows,
                       *((i, self.capture.sink) if self.capture is not None else ()),
                       **({} if cond is None else
                          {"cond_acc": cond.acc, "cond_planned": True, "cond_layer": i}
                          if cond.host_planned else
                          {"cond_acc": cond.acc, "cond_targets": cond.targets[i]}))
        self.adapter = plan.kind
        if plan.forced:
            logger.warning("vllm-steer: layers of %s matched no adapter; steering them as %r "
                           "because additional_config forces it", type(model).__name__,
                           plan.kind.value)
        logger.info("vllm-steer: steering %d layers of %s (%s adapter), %d slots, %d "
                    "ablate/clamp per layer (%.1f MiB of tables)", self.num_layers,
                    type(model).__name__, plan.kind.value, num_slots, self.max_projections,
                    self.slots.stats()["table_bytes"] / 2**20)
        if cond is not None:
            logger.info("vllm-steer: conditions accumulate through %s",
                        "planned spans (op)" if cond.host_planned
                        else "device targets (CUDA graphs)")

    # -- request lifetime ----------------------------------------------------------
    def add_request(self, req_id: str, sampling_params: Any) -> None:
        """Take a new request's wire steering (``extra_args[WIRE_KEY]``), if any.

        A malformed wire raises ``WireError`` (the engine stops with it) rather than
        steering wrongly; it can only come from a frontend of another plugin version.
        """
        extra = getattr(sampling_params, "extra_args", None) or {}
        raw = extra.get(WIRE_KEY)
        if raw is None:
            return
        w = WireSteering.from_extra_arg(raw)
        w.check_model(self.num_layers, self.hidden)
        if req_id in self.reqs:      # resubmitted id: the old one was finished first
            self.remove_request(req_id)
        gate = self._gate(req_id, w) if w.gate is not None else None
        # A live digest is already in the tables; a new one is composed from its program
        # (vectors inline, in memory or in the store, each checked against its id).
        composed = None if self.slots.is_live(w.digest) else self.intake.composed(w)
        self.slots.acquire(w.digest, composed)
        if gate is not None:
            for which, digest in (("else", gate.else_digest), ("prompt", gate.prompt_digest)):
                if digest:
                    self.slots.acquire(digest, None if self.slots.is_live(digest)
                                       else self.intake.composed(w, which))
        tracker = (ThinkTracker(w.think_start_ids, w.think_end_ids)
                   if w.mode in _MODE_STATE else None)
        self.reqs[req_id] = _ReqSteer(w.digest, w.mode, w.start,
                                      w.end if w.end != NO_END else 1 << 62, tracker, gate)

    def _gate(self, req_id: str, w: WireSteering) -> _Gate:
        g = w.gate
        assert g is not None
        cond = None
        if g.decision == -1:
            if self.conditions is None:
                raise WireError("gate", "this engine runs without conditions "
                                        "(additional_config conditions: false)")
            dirs = [self.intake.directions(w, c.content, c.layer) for c in g.conditions]
            cond = self.conditions.add(req_id, g, dirs)
        return _Gate(g.split, g.else_digest or None, g.prompt_digest or None,
                     None if g.decision == -1 else bool(g.decision), cond)

    def remove_request(self, req_id: str) -> None:
        st = self.reqs.pop(req_id, None)
        if st is None:
            return
        for digest in st.digests:
            self.slots.release(digest)
        if st.gate is not None and st.gate.cond is not None and self.conditions is not None:
            self.conditions.remove(req_id)

    def remove_requests(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.remove_request(rid)

    # -- per step ------------------------------------------------------------------
    def fill_rows(self, req_ids: list[str], num_scheduled: np.ndarray,
                  num_computed: np.ndarray, token_ids: np.ndarray) -> None:
        """Write one slot index per scheduled token into ``rows`` (in place), and the
        condition accumulation targets (``steering.condition_table``).

        ``num_scheduled``/``num_computed``: ``[num_reqs]`` in batch order;
        ``token_ids``: the batch's ``[max_reqs, max_len]`` token table (prompt + output).
        """
        rows = self._rows_np
        total = int(num_scheduled.sum())
        clear_to = max(self._filled, total)
        rows[:clear_to] = 0
        self._filled = 0
        cond = self.conditions
        if cond is not None:
            cond.begin_step()     # scores the prompts the previous forward completed
        if self._gated:
            self._tok_req[:self._gated] = 0
            self._gated = 0
        gated = 0
        if self.reqs:
            pinned = {d for r in req_ids if r in self.reqs for d in self.reqs[r].digests}
            offset = 0
            for i, rid in enumerate(req_ids):
                n = int(num_scheduled[i])
                st = self.reqs.get(rid)
                if st is not None and n:
                    first = int(num_computed[i])
                    g = st.gate
                    if g is not None:
                        gated = max(gated, self._fill_gated(st, g, i, offset, first, n,
                                                            token_ids, pinned))
                    else:
                        sel = self._selected(st, i, first, n, token_ids)
                        if sel is not None:
                            rows[offset:offset + n][sel] = self.slots.slot_for(st.digest, pinned)
                            self._filled = offset + n
                offset += n
        if self.device.type != "cpu" and clear_to:
            self.rows[:clear_to].copy_(self._rows_host[:clear_to], non_blocking=True)
        if gated:
            # each gated token keeps its "then" row where its request's rule holds, else
            # takes its "else" row: tensor ops, the gate never leaves the device
            assert cond is not None
            dev = self.device
            req = torch.from_numpy(self._tok_req[:gated]).to(dev, non_blocking=True)
            other = torch.from_numpy(self._rows_else[:gated]).to(dev, non_blocking=True)
            picked = torch.where(cond.gate[req] > 0, self.rows[:gated], other)
            self.rows[:gated].copy_(picked)
            self._gated = gated
        if cond is not None:
            cond.end_step()

    def quiesce(self) -> None:
        """Before a forward that no scheduler step planned (vLLM's dummy runs: warm-up,
        profiling, CUDA-graph capture, an idle data-parallel rank): it steers, accumulates
        and captures nothing, so the last step's rows and targets cannot leak into it."""
        self._rows_np[:] = 0
        if self.device.type != "cpu":
            self.rows.zero_()
        self._filled = 0
        if self._gated:
            self._tok_req[:self._gated] = 0
            self._gated = 0
        if self.conditions is not None:
            self.conditions.clear_targets()
        if self.capture is not None:
            empty = np.zeros(0, dtype=np.int64)
            self.capture.plan([], empty, empty)

    def _selected(self, st: _ReqSteer, i: int, first: int, n: int, token_ids: np.ndarray
                  ) -> slice | np.ndarray | None:
        """The chunk's tokens (indices into its ``n``) that ``st``'s rule steers, or None."""
        lo, hi = max(st.start, first), min(st.end, first + n)
        if lo >= hi:
            return None
        if st.tracker is None:
            return slice(lo - first, hi - first)
        mask = st.tracker.flags(token_ids[i], first, n, _MODE_STATE[st.mode])
        sel = np.zeros(n, dtype=bool)
        sel[lo - first:hi - first] = True
        return mask & sel

    def _fill_gated(self, st: _ReqSteer, g: _Gate, i: int, offset: int, first: int, n: int,
                    token_ids: np.ndarray, pinned: set[str]) -> int:
        """Rows of a gated request's chunk: prompt positions (below the split) get the
        prompt program; the selected generated ones the "then" row, with the "else" row and
        the condition slot beside it when the decision is read on the device. Returns how
        far ``_tok_req`` was written (0: not at all)."""
        rows = self._rows_np
        if g.prompt_digest is not None and first < g.split:
            hi = min(first + n, g.split)
            rows[offset:offset + hi - first] = self.slots.slot_for(g.prompt_digest, pinned)
            self._filled = offset + n
        if g.cond is not None:
            assert self.conditions is not None
            self.conditions.plan(g.cond, offset, first, n)
        sel = self._selected(st, i, first, n, token_ids)
        if sel is None:
            return 0
        then = self.slots.slot_for(st.digest, pinned)
        other = self.slots.slot_for(g.else_digest, pinned) if g.else_digest else 0
        seg = rows[offset:offset + n]
        self._filled = offset + n
        if g.decision is not None:
            seg[sel] = then if g.decision else other
            return 0
        assert g.cond is not None
        seg[sel] = then
        self._rows_else[offset:offset + n][sel] = other
        self._tok_req[offset:offset + n][sel] = g.cond.slot
        return offset + n


def cuda_graphs(runner: Any) -> bool:
    """True when this runner's forwards may replay CUDA graphs (where an op's Python body
    does not run: conditions then accumulate through device targets)."""
    if runner.device.type != "cuda":
        return False
    mode = runner.vllm_config.compilation_config.cudagraph_mode
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def runner_classes() -> list[type]:
    """The V1 runner classes whose ``load_model`` is wrapped (GPU, and the CPU one, which
    overrides ``load_model``)."""
    from vllm.v1.worker import gpu_model_runner

    classes: list[type] = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner
    except ImportError:  # a build without the CPU runner; the symbol check says if needed
        return classes
    classes.append(cpu_model_runner.CPUModelRunner)
    return classes


def install() -> None:
    """Patch vLLM's V1 model runner classes and ``WorkerBase`` (idempotent)."""
    from vllm.v1.worker.worker_base import WorkerBase

    classes = runner_classes()
    for cls in classes:
        if "load_model" in cls.__dict__ and not _is_ours(cls.load_model):
            cls.load_model = _wrap_load_model(cls.load_model)
    # Reachable with LLM.collective_rpc("vllm_steer_stats"): slot usage per worker.
    WorkerBase.vllm_steer_stats = _worker_stats
    base = classes[0]
    if not _is_ours(base._update_states):
        base._update_states = _wrap_update_states(base._update_states)
    if not _is_ours(base._prepare_inputs):
        base._prepare_inputs = _wrap_prepare_inputs(base._prepare_inputs)
    if not _is_ours(base._dummy_run):
        base._dummy_run = _wrap_dummy_run(base._dummy_run)


def check_runner(runner: Any) -> None:
    """Engine-start checks on the live runner: the table's instance attributes, that the
    runner's class still reaches the patched ``_update_states``/``_prepare_inputs``, and
    that its sampler runs the per-row log-prob merge (``sampler.py``)."""
    check_instance("runner", runner)
    if not sampler_patch.is_installed(runner.sampler):
        raise VLLMDriftError(f"{type(runner).__module__}:{type(runner).__qualname__}.sampler",
                             f"is a {type(runner.sampler).__qualname__} whose forward is not "
                             "the patched Sampler.forward: a probe fork would overwrite other "
                             "requests' top-k log-probs in a mixed batch")
    for name in ("_update_states", "_prepare_inputs", "_dummy_run"):
        if not _is_ours(getattr(type(runner), name, None)):
            raise VLLMDriftError(f"{type(runner).__module__}:{type(runner).__qualname__}.{name}",
                                 "is not the patched GPUModelRunner method (overridden by "
                                 "this runner class): steering would be silently absent")


def _worker_stats(worker: Any) -> dict[str, Any] | None:
    steer: RunnerSteering | None = getattr(worker.model_runner, "_vllm_steer", None)
    if steer is None:
        return None
    book = steer.capture.book if steer.capture is not None else None
    return {**steer.slots.stats(), **steer.intake.stats, "live_requests": len(steer.reqs),
            "adapter": steer.adapter.value,
            **(book.summary() if book is not None else {}),
            "mixed_logprob_batches": sampler_patch.mixed_batches(worker.model_runner.sampler)}


# -- the compile-cache key ---------------------------------------------------------------------
def code_files(roots: Iterable[Any], package: str = "vllm_steer") -> list[str]:
    """Source files of ``roots`` (functions, classes) and, transitively, of every function,
    class or module of ``package`` their code names (globals, closures, containers)."""
    def ours(obj: Any) -> bool:
        mod = getattr(obj, "__module__", None) if not inspect.ismodule(obj) else obj.__name__
        return isinstance(mod, str) and (mod == package or mod.startswith(package + "."))

    files: set[str] = set()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, staticmethod | classmethod | types.MethodType):
            stack.append(obj.__func__)
        elif isinstance(obj, property):
            stack.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif inspect.ismodule(obj):
            if ours(obj) and getattr(obj, "__file__", None):
                files.add(obj.__file__)
        elif inspect.isclass(obj):
            if ours(obj):
                files.add(inspect.getsourcefile(obj) or "")
                stack.extend(vars(obj).values())
        elif inspect.isfunction(obj) and ours(obj):
            # Only code written in its module's file: generated functions ("<string>") and
            # wrappers made elsewhere (dataclasses' repr) merely carry our __module__.
            module = sys.modules.get(obj.__module__)
            if obj.__code__.co_filename != getattr(module, "__file__", None):
                continue
            files.add(obj.__code__.co_filename)
            codes = [obj.__code__]
            while codes:
                code = codes.pop()
                stack.extend(obj.__globals__[n] for n in code.co_names if n in obj.__globals__)
                codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
            for cell in obj.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # empty cell
                    pass
    return sorted(f for f in files if os.path.isfile(f))


def traced_files() -> list[str]:
    """Files whose code torch.compile traces inside the model (the layer forwards and all
    they call), picks which forward a layer gets (``plan_layers``, ``attach``), or builds
    the tensors those forwards read (``RunnerSteering.__init__``)."""
    return code_files([attach, plan_layers, RunnerSteering.__init__])


def _add_to_compile_key(vllm_config: Any, files: list[str]) -> None:
    """Make the steering hook part of vLLM's torch.compile cache key.

    A graph compiled without the steering wrapper (plugin absent, disabled or older) must
    never be loaded by a steered engine. vLLM's AOT cache key hashes the env and
    ``vllm_config.compute_hash()``, which includes ``additional_config``; the classic
    cache also hashes ``traced_files``. Both get the hash of every traced file. Only this
    worker's copy of the config changes.
    """
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
    vllm_config.compilation_config.traced_files.update(files)


# -- the wrappers ------------------------------------------------------------------------------
def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, "_vllm_steer", False))


def _mark(fn):
    fn._vllm_steer = True
    return fn


def _wrap_load_model(orig):
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        check_runner(self)   # before loading: a drifted runner fails fast
        out = orig(self, *args, **kwargs)
        _add_to_compile_key(self.vllm_config, traced_files())
        self._vllm_steer = RunnerSteering(self, self.get_model())
        return out

    return _mark(load_model)


def _wrap_update_states(orig):
    @functools.wraps(orig)
    def _update_states(self, scheduler_output):
        steer: RunnerSteering | None = getattr(self, "_vllm_steer", None)
        if steer is not None:
            steer.remove_requests(scheduler_output.finished_req_ids)
            if steer.capture is not None:
                steer.capture.finish_requests(scheduler_output.finished_req_ids)
        out = orig(self, scheduler_output)
        new = scheduler_output.scheduled_new_reqs
        if steer is not None:
            for req in new:
                steer.add_request(req.req_id, req.sampling_params)
                if steer.capture is not None:
                    steer.capture.add_request(req.req_id, req.sampling_params)
        elif any(WIRE_KEY in (getattr(r.sampling_params, "extra_args", None) or {})
                 for r in new):
            raise VLLMDriftError(
                f"{type(self).__module__}:{type(self).__qualname__}.load_model",
                "was not hooked (this runner class overrides load_model), so a steered "
                "request would run unsteered")
        return out

    return _mark(_update_states)


def _wrap_dummy_run(orig):
    @functools.wraps(orig)
    def _dummy_run(self, *args, **kwargs):
        steer: RunnerSteering | None = getattr(self, "_vllm_steer", None)
        if steer is not None:
            steer.quiesce()
        return orig(self, *args, **kwargs)

    return _mark(_dummy_run)


def _wrap_prepare_inputs(orig):
    @functools.wraps(orig)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        steer: RunnerSteering | None = getattr(self, "_vllm_steer", None)
        if steer is not None:
            batch = self.input_batch
            n = batch.num_reqs
            steer.fill_rows(batch.req_ids[:n], num_scheduled_tokens[:n],
                            batch.num_computed_tokens_cpu[:n], batch.token_ids_cpu)
            if steer.capture is not None:
                steer.capture.plan(batch.req_ids[:n], num_scheduled_tokens[:n],
                                   batch.num_computed_tokens_cpu[:n])
        return orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    return _mark(_prepare_inputs)

"""Hidden-state capture: the vLLM side (admission, scheduler cache cap, worker book, return).

How a captured value travels (vLLM 0.32's V1 ``RequestOutput`` has no per-request side
channel, so captures do not ride on outputs):

1. **Admission** (``capture_request``, from the wrapped ``InputProcessor.process_inputs``):
   ``extra_args["capture"]`` is parsed and checked against the model and the prompt
   (``steering.capture_spec``; ``VLLMValidationError`` naming ``capture.<field>``) and its
   resolved wire form is put in ``extra_args[WIRE_CAPTURE_KEY]``.
2. **Scheduler** (engine core; wrapped ``KVCacheManager.get_computed_blocks``): the
   request's prefix-cache hit is capped at its first captured position, so every
   captured position is computed, never served from the cache. Other requests keep their
   full hits, and the capture request still reuses cached blocks before that position.
3. **Worker** (``RunnerCapture``, created with the steering state in ``load_model``): on
   tensor-parallel rank 0 (the residual stream is the same on every rank) a
   ``CaptureBook`` records each captured position's block outputs through the layer
   adapters' capture op, in eager and compiled mode, while the request is batched with
   any others.
4. **Return**: the caller collects by capture id with vLLM's ``collective_rpc``
   (``WorkerBase.vllm_steer_take_captures``; ``take_captures`` / ``take_captures_async``),
   which reaches every worker of the engine through the executor (``mp`` under TP, Ray
   across machines). All captured positions are prompt positions, computed before the
   first output token, so a capture is complete once its request returned any output.
   Uncollected captures are dropped (oldest first) beyond a bound.

Limits: refused (at admission, naming the reason) with CUDA graphs (the op's Python body
does not run inside a replayed graph; use ``enforce_eager`` or cudagraph mode NONE), a
KV connector (external prefix hits cannot be capped), the V2 model runner, or an engine
started with ``additional_config={"vllm_steer": {"capture": false}}`` (which leaves the
op out of the layers entirely). Under data parallelism, submit capture requests to one
engine (``data_parallel_rank``): vLLM returns only the first engine's RPC result.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from vllm_steer.steering.capture import CaptureBook
from vllm_steer.steering.capture_spec import (
    EXTRA_ARGS_KEY,
    WIRE_CAPTURE_KEY,
    CaptureSpec,
    WireCapture,
    check_reserved,
    first_captured_position,
)
from vllm_steer.steering.options import EngineOptions
from vllm_steer.steering.spec import WIRE_KEY
from vllm_steer.steering.values import SpecError
from vllm_steer.steering.wire import first_read_position
from vllm_steer.vllm_adapter.drift import VLLMDriftError
from vllm_steer.vllm_adapter.engine import engine_options, input_processor

logger = logging.getLogger("vllm_steer")
TAKE_METHOD = "vllm_steer_take_captures"
_KV_MANAGER = "vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks"


class CaptureError(RuntimeError):
    """A capture could not be collected (dropped, incomplete, or failed on the worker)."""


# -- 1. admission (frontend) ------------------------------------------------------------------
def refusal(vllm_config: Any, options: EngineOptions) -> str | None:
    """Why this engine cannot capture, or None."""
    if not options.capture:
        return ("this engine was started with capture disabled "
                "(additional_config {\"vllm_steer\": {\"capture\": false}})")
    if vllm_config.use_v2_model_runner:
        return "vLLM's V2 model runner is active and vllm-steer hooks only the V1 runner"
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and getattr(mode, "name", str(mode)) != "NONE":
        return (f"CUDA graphs are on (cudagraph_mode {mode.name}): the capture op does not run "
                "inside a replayed graph; start the engine with enforce_eager=True or "
                "cudagraph_mode NONE")
    if vllm_config.kv_transfer_config is not None:
        return "a KV connector is configured: its external prefix hits cannot be capped"
    return None


def capture_refusal(engine_client: Any) -> str | None:
    """Why the engine behind ``engine_client`` cannot capture, or None (server routes)."""
    processor = input_processor(engine_client)
    return refusal(processor.vllm_config, engine_options(processor))


def capture_request(processor: Any, request: Any, options: EngineOptions) -> None:
    """Validate ``request``'s capture option and attach its wire form (in place)."""
    from vllm.exceptions import VLLMValidationError

    sp = request.sampling_params
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    if not extra:
        return
    try:
        check_reserved(extra)
        raw = extra.get(EXTRA_ARGS_KEY)
        if raw is None:
            return
        spec = CaptureSpec.parse(raw)
        cfg = processor.vllm_config
        why = refusal(cfg, options)
        if why is not None:
            raise SpecError(EXTRA_ARGS_KEY, why)
        prompt = request.prompt_token_ids
        if prompt is None:
            raise SpecError(EXTRA_ARGS_KEY, "needs a token prompt (not prompt embeddings)")
        hf = cfg.model_config.hf_text_config
        wire = spec.resolve(len(prompt), int(hf.num_hidden_layers), options.capture_max_bytes,
                            int(hf.hidden_size))
    except SpecError as e:
        raise VLLMValidationError(str(e), parameter=e.field) from e
    extra[WIRE_CAPTURE_KEY] = wire.to_extra_arg()


def refuse_in_openai_body(extra_args: dict[str, Any] | None) -> None:
    """The OpenAI endpoints cannot return captured values: refuse the option there."""
    if extra_args and (EXTRA_ARGS_KEY in extra_args or WIRE_CAPTURE_KEY in extra_args):
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(
            "hidden-state capture is not available through the OpenAI endpoints (their "
            "responses have no place for it); use the Python API (vllm_steer.capture_hidden, "
            "or extra_args['capture'] with vllm_steer.take_captures) or train through "
            "POST /v1/steering/vectors/train", parameter=EXTRA_ARGS_KEY)


# -- 2. scheduler: cap the prefix-cache hit ----------------------------------------------------
class _CappedRequest:
    """A view of a ``Request`` that reports fewer tokens: ``get_computed_blocks`` caps its
    cache hit at ``num_tokens - 1``, so this caps it at the first captured position."""

    __slots__ = ("_request", "num_tokens")

    def __init__(self, request: Any, num_tokens: int) -> None:
        self._request, self.num_tokens = request, num_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _wrap_get_computed_blocks(orig):
    @functools.wraps(orig)
    def get_computed_blocks(self, request, *args, **kwargs):
        sp = request.sampling_params
        extra = sp.extra_args if sp is not None else None
        # capture's first captured position, or 0 for a mean condition (vllm_adapter/conditions)
        firsts = [p for p in (first_captured_position(extra),
                              first_read_position(extra, WIRE_KEY)) if p is not None]
        first = min(firsts) if firsts else None
        if first is None or first >= request.num_tokens - 1:
            return orig(self, request, *args, **kwargs)
        out = orig(self, _CappedRequest(request, first + 1), *args, **kwargs)
        if out[1] > first:
            raise VLLMDriftError(_KV_MANAGER, f"returned a cache hit of {out[1]} tokens for a "
                                 f"request whose capture starts at position {first}: it no "
                                 "longer caps the hit at num_tokens - 1")
        return out

    get_computed_blocks._vllm_steer = True  # type: ignore[attr-defined]
    return get_computed_blocks


# -- 3. worker --------------------------------------------------------------------------------
def _tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


class RunnerCapture:
    """Capture state of one model runner: the op's sink and, on the recording rank, the
    book. Created by ``RunnerSteering`` when the engine option ``capture`` is on."""

    def __init__(self, device: torch.device, num_layers: int, hidden: int,
                 options: EngineOptions) -> None:
        self.sink = torch.zeros(1, device=device)
        self.book = (CaptureBook(num_layers, hidden, options.capture_pending_bytes)
                     if _tp_rank() == 0 else None)

    def add_request(self, req_id: str, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None)
        if not extra or self.book is None:
            return
        raw = extra.get(WIRE_CAPTURE_KEY)
        if raw is not None:
            self.book.add_request(req_id, WireCapture.from_extra_arg(raw))

    def finish_requests(self, req_ids: Iterable[str]) -> None:
        if self.book is not None and self.book.by_req:
            self.book.finish_requests(req_ids)

    def plan(self, req_ids: Sequence[str], num_scheduled: np.ndarray,
             num_computed: np.ndarray) -> None:
        if self.book is not None:
            self.book.plan(req_ids, num_scheduled, num_computed)


def _worker_take(worker: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    steer = getattr(worker.model_runner, "_vllm_steer", None)
    cap = getattr(steer, "capture", None)
    if cap is None or cap.book is None:
        return {}
    return cap.book.take(list(ids))


def install() -> None:
    """Patch ``KVCacheManager.get_computed_blocks`` and give workers the take RPC."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.worker_base import WorkerBase

    if not getattr(KVCacheManager.get_computed_blocks, "_vllm_steer", False):
        KVCacheManager.get_computed_blocks = _wrap_get_computed_blocks(
            KVCacheManager.get_computed_blocks)
    WorkerBase.vllm_steer_take_captures = _worker_take


# -- 4. collection (caller) ---------------------------------------------------------------------
def _merge(ids: Sequence[str], per_worker: Sequence[dict[str, dict[str, Any]] | None]
           ) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for part in per_worker:
        for cid, rec in (part or {}).items():
            merged.setdefault(cid, rec)
    for cid in ids:
        rec = merged.get(cid)
        if rec is None:
            raise CaptureError(f"capture {cid!r} is not held by any worker (never submitted, "
                               "already collected, or dropped uncollected)")
        if rec["error"]:
            raise CaptureError(f"capture {cid!r} failed on the worker: {rec['error']}")
        if not rec["complete"] or rec["values"] is None:
            raise CaptureError(f"capture {cid!r} is incomplete (collect it after its request "
                               "returned output)")
        rec["values"] = np.frombuffer(rec["values"], dtype=np.float32).reshape(rec["shape"]).copy()
    return merged


def take_captures(llm: Any, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Collect captures ``ids`` from the workers of a ``vllm.LLM``: ``{id: record}`` as
    ``CaptureBook.take`` describes, with ``values`` a float32 numpy array (``[layers,
    positions, hidden]``, or ``[layers, hidden]`` for a mean). Raises ``CaptureError`` for
    a missing, failed or incomplete capture."""
    return _merge(ids, llm.collective_rpc(TAKE_METHOD, args=(list(ids),)))


async def take_captures_async(engine_client: Any, ids: Sequence[str]
                              ) -> dict[str, dict[str, Any]]:
    """``take_captures`` for an ``EngineClient`` (the OpenAI server's ``AsyncLLM``)."""
    return _merge(ids, await engine_client.collective_rpc(TAKE_METHOD, args=(list(ids),)))

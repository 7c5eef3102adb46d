"""Conditional steering: the vLLM side (scheduler cache cap, the workers' reports, return).

- **Scheduler**: a request with a ``mean`` condition reads every prompt token's state at
  its condition layer, so its prefix-cache hit is capped at position 0 (the whole prompt
  is computed; the blocks it writes are still cached for others). ``last`` conditions
  need no cap: vLLM always computes a prompt's last token. The cap shares the wrapped
  ``KVCacheManager.get_computed_blocks`` with capture (``vllm_adapter.capture``).
- **Workers** (``RunnerSteering.conditions``, ``steering.condition_table``): accumulate
  in the traced forwards, decide between steps on the device, keep each finished
  request's report until it is collected.
- **Return**: reports are collected by the request id the caller gave (``RequestOutput.
  request_id``; the OpenAI server's ``chatcmpl-...``/``cmpl-...`` id) with vLLM's
  ``collective_rpc`` (``WorkerBase.vllm_steer_take_conditions``): ``take_conditions`` /
  ``take_conditions_async``. A request's decision exists once it returned any output
  (its prompt was computed). Every tensor-parallel rank decides identically; the first
  answer is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TAKE_METHOD = "vllm_steer_take_conditions"


def _worker_take(worker: Any, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    steer = getattr(worker.model_runner, "_vllm_steer", None)
    table = getattr(steer, "conditions", None)
    if table is None:
        return {}
    return table.take(list(keys))


def install() -> None:
    """Give workers the take RPC (the cache cap is installed with capture's)."""
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.vllm_steer_take_conditions = _worker_take


def _merge(keys: Sequence[str], per_worker: Sequence[dict[str, Any] | None]
           ) -> dict[str, list[dict[str, Any]]]:
    merged: dict[str, list[dict[str, Any]]] = {}
    for part in per_worker:
        for key, reports in (part or {}).items():
            merged.setdefault(key, reports)
    out = {}
    for key in keys:
        reports = merged.get(key)
        if reports is None:
            continue
        out[key] = sorted(reports, key=lambda r: -1 if r["index"] is None else r["index"])
    return out


def take_conditions(llm: Any, request_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The condition reports of finished (or running) requests of a ``vllm.LLM``, by
    ``RequestOutput.request_id``: ``{id: [report per choice]}``; each report is
    ``{"index" (choice, n > 1), "holds", "mode", "conditions": [{"label", "layer",
    "aggregate", "threshold", "compare", "score", "holds"}], "error"}``. A finished
    request's reports are handed out once; ids without a condition are left out."""
    return _merge(request_ids, llm.collective_rpc(TAKE_METHOD, args=(list(request_ids),)))


async def take_conditions_async(engine_client: Any, request_ids: Sequence[str]
                                ) -> dict[str, list[dict[str, Any]]]:
    """``take_conditions`` for an ``EngineClient`` (the OpenAI server's ``AsyncLLM``)."""
    return _merge(request_ids,
                  await engine_client.collective_rpc(TAKE_METHOD, args=(list(request_ids),)))

"""What the package reads from a running engine: ``vllm.LLM`` (offline) or an
``EngineClient`` (the OpenAI server's ``AsyncLLM``). Each accessor names its symbol when
the attribute is gone (``VLLMDriftError``) instead of guessing."""

from __future__ import annotations

import gc
from typing import Any

from vllm_steer.steering.options import EngineOptions
from vllm_steer.vllm_adapter.drift import VLLMDriftError


def _attr(obj: Any, name: str, symbol: str) -> Any:
    value = getattr(obj, name, None)
    if value is None:
        raise VLLMDriftError(symbol, f"is missing on this {type(obj).__name__}")
    return value


def input_processor(engine_client: Any) -> Any:
    """The engine client's ``InputProcessor`` (whose resolver the routes share)."""
    return _attr(engine_client, "input_processor",
                 "vllm.engine.protocol:EngineClient.input_processor")


def engine_options(processor: Any) -> EngineOptions:
    """The engine options of the engine behind this ``InputProcessor``, read once."""
    opts = getattr(processor, "_vllm_steer_options", None)
    if opts is None:
        opts = EngineOptions.from_vllm_config(processor.vllm_config)
        processor._vllm_steer_options = opts
    return opts


def max_model_len(engine: Any) -> int:
    """``max_model_len`` of a ``vllm.LLM`` or an ``EngineClient`` (both hold model_config)."""
    cfg = _attr(engine, "model_config", "vllm.engine.protocol:EngineClient.model_config"
                if not hasattr(engine, "llm_engine") else "vllm.entrypoints.llm:LLM.model_config")
    return int(cfg.max_model_len)


def block_size(engine: Any) -> int:
    """The KV-cache block size (tokens) of a ``vllm.LLM`` or an ``EngineClient``: only
    full blocks are shared through the prefix cache, which is where probe forks go when
    they are aligned."""
    if hasattr(engine, "llm_engine"):
        cfg = _attr(_attr(engine, "llm_engine", "vllm.entrypoints.llm:LLM.llm_engine"),
                    "vllm_config", "vllm.v1.engine.llm_engine:LLMEngine.vllm_config")
    else:
        cfg = _attr(engine, "vllm_config", "vllm.engine.protocol:EngineClient.vllm_config")
    cache = _attr(cfg, "cache_config", "vllm.config.vllm:VllmConfig.cache_config")
    return int(_attr(cache, "block_size", "vllm.config.cache:CacheConfig.block_size"))


def data_parallel_size(engine_client: Any) -> int:
    """Data-parallel engines behind an ``EngineClient`` (its ``vllm_config``)."""
    cfg = _attr(engine_client, "vllm_config", "vllm.engine.protocol:EngineClient.vllm_config")
    return int(cfg.parallel_config.data_parallel_size)


def llm_engine(llm: Any) -> Any:
    """The ``LLMEngine`` of a ``vllm.LLM`` (live probes step it themselves)."""
    return _attr(llm, "llm_engine", "vllm.entrypoints.llm:LLM.llm_engine")


def vllm_config(llm: Any) -> Any:
    """The ``VllmConfig`` a ``vllm.LLM`` runs with (benchmark records, tests)."""
    engine = _attr(llm, "llm_engine", "vllm.entrypoints.llm:LLM.llm_engine")
    return _attr(engine, "vllm_config", "vllm.v1.engine.llm_engine:LLMEngine.vllm_config")


def shutdown(llm: Any) -> None:
    """Stop ``llm``'s engine-core process now (rather than at interpreter exit)."""
    engine = _attr(llm, "llm_engine", "vllm.entrypoints.llm:LLM.llm_engine")
    core = _attr(engine, "engine_core", "vllm.v1.engine.llm_engine:LLMEngine.engine_core")
    core.shutdown()
    del core, engine
    gc.collect()


def run_modes(llm: Any) -> dict[str, Any]:
    """How a ``vllm.LLM`` really runs: ``compiled`` (vLLM's compilation mode is not
    NONE), ``cudagraphs`` (its CUDA-graph mode, ``NONE`` when off) and
    ``async_scheduling``. What ``vllm-steer doctor --verify`` records per engine."""
    cfg = vllm_config(llm)
    comp = _attr(cfg, "compilation_config", "vllm.config.vllm:VllmConfig.compilation_config")
    sched = _attr(cfg, "scheduler_config", "vllm.config.vllm:VllmConfig.scheduler_config")
    mode = getattr(comp, "mode", None)
    graphs = getattr(comp, "cudagraph_mode", None)
    return {"compiled": mode is not None and int(mode) != 0,
            "compilation_mode": getattr(mode, "name", str(mode)),
            "cudagraphs": getattr(graphs, "name", str(graphs)),
            "async_scheduling": bool(getattr(sched, "async_scheduling", False))}

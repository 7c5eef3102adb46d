"""Build a ``vllm.LLM`` with the settings this project's commands share."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vllm_steer import envvars, locations
from vllm_steer.default_model import resolve_model

logger = logging.getLogger("vllm_steer")

#: ``config.json`` dtype names -> vLLM ``dtype`` values.
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "float16": "float16", "half": "float16"}


def steering_environ(registry: str | os.PathLike[str] | None = None) -> Path:
    """Set this process's environment for a steered engine (its workers inherit it):
    ``$VLLMSTEER_REGISTRY`` (``registry``, else the variable's value, else the shipped
    registry) and, on the CPU backend, 2 GiB of KV cache unless set. Returns the registry."""
    path = locations.registry_path(registry)
    os.environ[envvars.REGISTRY] = str(path)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return path


def checkpoint_dtype(model_dir: str | os.PathLike[str]) -> str | None:
    """The dtype a local HF checkpoint stores (``config.json``), as a vLLM ``dtype``; None
    when it names none we know."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    raw = (cfg.get("torch_dtype") or cfg.get("dtype")) if isinstance(cfg, dict) else None
    return _DTYPES.get(str(raw).removeprefix("torch.")) if raw else None


def make_llm(model: str | None = None, registry: str | os.PathLike[str] | None = None,
             **engine_options: Any) -> Any:
    """``vllm.LLM`` on a local model (default: the embedded one) with steering enabled.

    ``registry`` (else ``$VLLMSTEER_REGISTRY``, else the shipped registry) names the
    vectors. The model runs in its checkpoint's own dtype unless ``dtype`` is given:
    vLLM's ``auto`` silently runs a float32 checkpoint (such as the default model, whose
    shipped vectors were trained and measured in float32) in bfloat16 on the CPU. On the
    CPU backend the defaults that start on these machines (``gpu_memory_utilization=0.5``,
    2 GiB KV cache) apply unless overridden. Call it under ``if __name__ == "__main__":``:
    the engine spawns processes.
    """
    steering_environ(registry)
    from vllm import LLM

    model_dir = resolve_model(model)
    opts: dict[str, Any] = {"gpu_memory_utilization": 0.5, "seed": 0}
    opts.update(engine_options)
    if "dtype" not in opts:
        opts["dtype"] = checkpoint_dtype(model_dir) or "auto"
        logger.info("vllm-steer: dtype %s (the checkpoint's)", opts["dtype"])
    return LLM(model=model_dir, **opts)


def shutdown(llm: Any) -> None:
    """Stop ``llm``'s engine processes now (rather than at interpreter exit)."""
    from vllm_steer.vllm_adapter.engine import shutdown as stop_engine

    stop_engine(llm)

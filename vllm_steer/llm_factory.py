"""Build a ``vllm.LLM`` with the settings this project's commands share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_steer.default_model import resolve_model
from vllm_steer.steering.registry import REGISTRY_ENV

#: The registry shipped in the repository (source checkout / editable install).
SHIPPED_REGISTRY = Path(__file__).resolve().parent.parent / "configs" / "registry.yaml"


def make_llm(model: str | None = None, registry: str | os.PathLike[str] | None = None,
             **engine_options: Any) -> Any:
    """``vllm.LLM`` on a local model (default: the embedded one) with steering enabled.

    ``registry`` (else ``$VLLM_STEER_REGISTRY``, else the shipped ``configs/registry.yaml``)
    names the vectors. On the CPU backend the defaults that start on these machines
    (``gpu_memory_utilization=0.5``, 2 GiB KV cache) apply unless overridden. Call it
    under ``if __name__ == "__main__":``: the engine spawns processes.
    """
    if registry is not None:
        os.environ[REGISTRY_ENV] = str(Path(registry).expanduser().resolve())
    elif not os.environ.get(REGISTRY_ENV) and SHIPPED_REGISTRY.is_file():
        os.environ[REGISTRY_ENV] = str(SHIPPED_REGISTRY)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    opts: dict[str, Any] = {"gpu_memory_utilization": 0.5, "seed": 0}
    opts.update(engine_options)
    return LLM(model=resolve_model(model), **opts)


def shutdown(llm: Any) -> None:
    """Stop ``llm``'s engine processes now (rather than at interpreter exit)."""
    from vllm_steer.vllm_adapter.engine import shutdown as stop_engine

    stop_engine(llm)

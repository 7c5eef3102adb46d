"""vLLM engines with the settings the tests and benchmarks share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from vllm_steer.llm_factory import make_llm, shutdown

#: Deterministic, small, eager: what the engine tests compare against HF.
TEST_ENGINE_OPTIONS: dict[str, Any] = dict(
    dtype="float32", gpu_memory_utilization=0.5, seed=0, enforce_eager=True, block_size=32,
    max_num_batched_tokens=256, max_model_len=2048)


def make_test_llm(model_dir: str, registry: str | os.PathLike[str] | None = None,
             **overrides: Any) -> Any:
    """``vllm_steer.llm_factory.make_llm`` with ``TEST_ENGINE_OPTIONS`` (``overrides`` win)."""
    return make_llm(model_dir, registry=registry, **{**TEST_ENGINE_OPTIONS, **overrides})


@contextlib.contextmanager
def inproc_engine(enable: bool = True) -> Iterator[None]:
    """Engines built inside run their core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
    a third of the start-up time. vLLM's Transformers backend then decorates HF classes in
    this process, which breaks HF models used here as references: pass ``enable=False``."""
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if enable else "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


__all__ = ["TEST_ENGINE_OPTIONS", "inproc_engine", "make_test_llm", "shutdown"]

"""The benchmarks: the one list of their modules, in the order ``vllm-steer bench all``
runs them (cheapest first) and the report shows them."""

from __future__ import annotations

import importlib

from vllm_steer.bench.harness import Benchmark

#: Modules of ``vllm_steer.bench`` that define a ``BENCHMARK`` (each has a thin caller,
#: ``benchmarks/MODULE.py``, in the repository).
MODULES = ("overhead", "probe_forks", "reading_cost", "memory", "vs_hf", "extract", "serving",
           "live_probe", "early_exit", "goodput", "wire", "train_route", "profile_steer",
           "conditions")


def benchmarks() -> dict[str, Benchmark]:
    """``{name: benchmark}`` in registry order."""
    out = {}
    for module in MODULES:
        b: Benchmark = importlib.import_module(f"vllm_steer.bench.{module}").BENCHMARK
        out[b.name] = b
    return out

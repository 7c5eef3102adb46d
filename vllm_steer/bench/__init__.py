"""Benchmarks, shipped with the package so that an installed wheel runs them too.

Each benchmark module declares a ``harness.Benchmark`` (its options, run, report
sections); ``registry.MODULES`` lists them. ``vllm-steer bench NAME`` (``cli``) runs one
in a fresh interpreter; the scripts in the repository's ``benchmarks/`` are thin callers
of the same modules, and that directory keeps the results (``results/*.json``,
``RESULTS.md``). ``launch.Server`` starts a steered ``vllm serve`` (benchmarks, tests).
"""

from vllm_steer.bench.cli import add_parser, run, run_script

__all__ = ["add_parser", "run", "run_script"]

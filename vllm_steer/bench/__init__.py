"""Benchmarks, shipped with the package so that an installed wheel runs them too.

``vllm-steer bench NAME`` (``cli``) runs ``vllm_steer.bench.<module>`` in a fresh
interpreter; the scripts in the repository's ``benchmarks/`` are thin callers of the same
modules, and that directory keeps the results (``results/*.json``, ``RESULTS.md``).
"""

from vllm_steer.bench.cli import ALL, MODULES, add_parser, run, run_script

__all__ = ["ALL", "MODULES", "add_parser", "run", "run_script"]

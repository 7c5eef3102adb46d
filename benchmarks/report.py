"""Runs ``vllm_steer.bench.report`` (the benchmark ships in the package; see its docstring)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("vllm_steer.bench.report", run_name="__main__", alter_sys=True)

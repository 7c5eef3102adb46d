"""Runs ``vllm_steer.bench.profile_steer`` (shipped in the package; see its docstring)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("vllm_steer.bench.profile_steer", run_name="__main__", alter_sys=True)

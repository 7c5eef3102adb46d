"""Runs ``vllm_steer.bench.train_route`` (the benchmark ships in the package; see its docstring)."""

import runpy
import sys
from pathlib import Path

# a source checkout works without installing it (the package is one directory up)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    runpy.run_module("vllm_steer.bench.train_route", run_name="__main__", alter_sys=True)

"""Runs ``vllm_steer.bench.<this file's name>`` (shipped in the package; see its docstring)."""

import runpy
import sys
from pathlib import Path

# a source checkout works without installing it (the package is one directory up)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    runpy.run_module(f"vllm_steer.bench.{Path(__file__).stem}", run_name="__main__",
                     alter_sys=True)

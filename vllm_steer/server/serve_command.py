"""How ``vllm-steer serve`` (and the benchmarks' launcher) start vLLM's OpenAI server:
its command line and its environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vllm_steer import envvars, locations
from vllm_steer.server import ENDPOINT_PLUGIN, GENERAL_PLUGIN, METRICS_PLUGIN


def vllm_cli_argv() -> list[str]:
    """How ``serve`` and ``vllm`` run vLLM's CLI: ``python -P -m vllm_steer.server.vllm_cli``.

    ``-m`` alone would put the working directory first on ``sys.path``: started in a
    directory holding another ``vllm_steer/`` (a second checkout, an older version), the
    server would run that code. Safe-path mode (``-P``, and ``PYTHONSAFEPATH`` from
    ``safe_path_env`` for the processes vLLM starts) drops only that implicit entry;
    ``PYTHONPATH`` still selects code deliberately.
    """
    return [sys.executable, "-P", "-m", "vllm_steer.server.vllm_cli"]


def _implicit_path_entry() -> Path | None:
    """The entry Python put first on ``sys.path`` for this process (the script's directory,
    or the working directory for ``-m``/``-c``); None in safe-path mode."""
    if sys.flags.safe_path or not sys.path:
        return None
    return Path(sys.path[0] or os.getcwd()).resolve()


def safe_path_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child that must import the ``vllm_steer`` this process runs, in
    safe-path mode (``PYTHONSAFEPATH=1``, inherited by every process vLLM starts). When
    this process found the package only through its own implicit ``sys.path`` entry
    (``python -m vllm_steer.cli`` in a source checkout), that directory is put on the
    child's ``PYTHONPATH`` explicitly."""
    env = dict(env)
    env["PYTHONSAFEPATH"] = "1"
    root = Path(__file__).resolve().parent.parent.parent
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _implicit_path_entry() == root and root not in {Path(p).resolve() for p in parts}:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *parts])
    return env


def serve_env(registry: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a steered ``vllm serve``: the plugins allow-listed in
    ``VLLM_PLUGINS``, ``VLLMSTEER_REGISTRY`` set (``registry``, else an existing value,
    else the registry shipped in the package), and Python's safe-path mode
    (``safe_path_env``)."""
    env = safe_path_env(dict(os.environ if base is None else base))
    plugins = [p.strip() for p in env.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    for name in (GENERAL_PLUGIN, ENDPOINT_PLUGIN, METRICS_PLUGIN):
        if name not in plugins:
            plugins.append(name)
    env["VLLM_PLUGINS"] = ",".join(plugins)
    env[envvars.REGISTRY] = str(locations.registry_path(registry, env))
    return env

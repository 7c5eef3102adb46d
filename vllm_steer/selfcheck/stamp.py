"""The self-check's stamp: proof, in the data home, that ``vllm-steer doctor --verify``
passed on this installation.

One JSON file per key (``locations.selfcheck_dir()/<digest>.json``): the vLLM version,
the torch version, the device (``vllm_adapter.platform.device_key``) and the vllm-steer
version that ran the check. The version policy's gate (``vllm_steer.selfcheck.gate``) accepts a vLLM
newer than the tested range only when a stamp for exactly this key says ``passed`` for a
complete run. Failed and partial runs are recorded too (``doctor`` shows them) but never
accepted.

While a run is in progress its engines must load the plugin before any stamp exists:
``verification_run`` writes a token file and sets ``$VLLMSTEER_SELFCHECK_RUN`` to its id
(inherited by the engine processes); ``verifying()`` is true only while both exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_steer import envvars, locations
from vllm_steer.atomic_files import write_atomic
from vllm_steer.compat import installed_vllm_version
from vllm_steer.version import __version__
from vllm_steer.vllm_adapter.platform import device_key

logger = logging.getLogger("vllm_steer")

#: Token files of runs older than this are left over from a crash and removed.
STALE_RUN_SECONDS = 6 * 3600
#: Version of the stamp file layout.
STAMP_FORMAT = 1


@dataclass(frozen=True)
class StampKey:
    """What a stamp vouches for: ``vllm``/``torch``/``plugin`` version strings as installed
    (local suffixes included: ``2.14.0+cu128`` and ``2.14.0+cpu`` differ) and ``device``
    (``"cuda:NVIDIA H100 80GB HBM3"``, ``"cpu:x86_64"``)."""

    vllm: str
    torch: str
    device: str
    plugin: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def __str__(self) -> str:
        return (f"vLLM {self.vllm}, torch {self.torch}, device {self.device}, "
                f"vllm-steer {self.plugin}")


def current_key(vllm_version: str | None = None) -> StampKey:
    """The key of this installation (``vllm_version`` overrides the installed vLLM's)."""
    import torch

    return StampKey(vllm=vllm_version or installed_vllm_version() or "none",
                    torch=str(torch.__version__), device=device_key(),
                    plugin=__version__)


def stamp_path(key: StampKey) -> Path:
    return locations.selfcheck_dir() / f"{key.digest()[:24]}.json"


def write_stamp(key: StampKey, *, passed: bool, complete: bool,
                details: dict[str, Any] | None = None) -> Path:
    """Record a run's verdict for ``key`` (atomically; replaces an earlier stamp)."""
    path = stamp_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": STAMP_FORMAT, "key": asdict(key), "passed": bool(passed),
            "complete": bool(complete),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(details or {})}
    write_atomic(path, json.dumps(body, indent=2, default=str))
    return path


def read_stamp(key: StampKey) -> dict[str, Any] | None:
    """The stamp recorded for exactly ``key``, or None (absent, unreadable, or written for
    another key)."""
    path = stamp_path(key)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("vllm-steer: ignoring unreadable self-check stamp %s (%s)", path, e)
        return None
    if not isinstance(body, dict) or body.get("key") != asdict(key):
        return None
    return body


def find_passed(key: StampKey) -> dict[str, Any] | None:
    """The stamp for ``key`` when it records a complete run that passed, else None."""
    body = read_stamp(key)
    if body is None or body.get("passed") is not True or body.get("complete") is not True:
        return None
    return body


def _runs_dir() -> Path:
    return locations.selfcheck_dir() / "running"


def verifying(environ: dict[str, str] | None = None) -> bool:
    """True in the processes of a ``doctor --verify`` run in progress: the run id in
    ``$VLLMSTEER_SELFCHECK_RUN`` names a token file that still exists."""
    # Read directly: a new variable has no deprecated VLLM_STEER_* spelling to honour.
    run = (os.environ if environ is None else environ).get(envvars.SELFCHECK_RUN)
    if not run or not run.isalnum():
        return False
    return (_runs_dir() / run).is_file()


@contextlib.contextmanager
def verification_run() -> Iterator[str]:
    """Mark this process (and the engine processes it starts) as a self-check run."""
    runs = _runs_dir()
    runs.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in runs.iterdir():
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > STALE_RUN_SECONDS:
                old.unlink()
    run = secrets.token_hex(16)
    token = runs / run
    token.write_text(json.dumps({"pid": os.getpid(), "started": now}))
    old_env = os.environ.get(envvars.SELFCHECK_RUN)
    os.environ[envvars.SELFCHECK_RUN] = run
    try:
        yield run
    finally:
        with contextlib.suppress(OSError):
            token.unlink()
        if old_env is None:
            os.environ.pop(envvars.SELFCHECK_RUN, None)
        else:
            os.environ[envvars.SELFCHECK_RUN] = old_env

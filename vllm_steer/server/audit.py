"""The audit trail: one structured line per admin action (``server.auth.ADMIN`` routes).

Each line is a JSON object on this module's logger (the server's log), and
also appended to ``$VLLMSTEER_AUDIT_LOG`` when set::

    {"audit":"vllm-steer","time":"2026-12-07T10:00:00.123Z","action":"replace",
     "vector":"calm","digest":"sha256:...","key_id":"ops","role":"admin","status":201,
     "pid":1234}

``action``: ``upload``, ``replace``, ``register`` (a file from an allowed directory),
``delete``, ``train``, ``collect``; ``digest``: the sha256 of the vector file the action
stored or removed; ``status``: the HTTP status answered (401/403 for a refused caller,
who is named by ``key_id`` when the key is known). A key is never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vllm_steer import envvars
from vllm_steer.server.auth import Caller

logger = logging.getLogger(__name__)
_lock = threading.Lock()


def _ensure_handler() -> None:
    """The audit lines reach the server's stderr whatever logging vLLM configured (the
    package logger has no handler of its own, and Python's last resort drops INFO)."""
    if logger.handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def file_digest(path: str | os.PathLike[str] | None) -> str | None:
    """``sha256:<hex>`` of a file's bytes (None if unreadable)."""
    if path is None:
        return None
    try:
        return bytes_digest(Path(path).read_bytes())
    except OSError:
        return None


def bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def record(action: str, caller: Caller, status: int, *, vector: str | None = None,
           digest: str | None = None, **extra: Any) -> dict[str, Any]:
    """Write one audit line; returns it (as a dict)."""
    line = {"audit": "vllm-steer",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "action": action, "vector": vector, "digest": digest, "key_id": caller.key_id,
            "role": caller.role, "status": int(status), "pid": os.getpid(), **extra}
    text = json.dumps(line, separators=(",", ":"))
    _ensure_handler()
    logger.info("%s", text)
    path = envvars.get(envvars.AUDIT_LOG)
    if path:
        with _lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (text + "\n").encode())
            finally:
                os.close(fd)
    return line

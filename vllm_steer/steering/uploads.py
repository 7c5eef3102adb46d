"""The server's upload directory as the registry sees it: how stored files are named,
which entries' files it stored, how the overlay names them (relative to the directory),
and when a file no entry uses any more may be deleted (retirement)."""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from vllm_steer.atomic_files import TMP_SUFFIX
from vllm_steer.steering.registry_file import RegistryEntry

#: A stored upload: ``<vector name>-<12 hex>.<format>`` (``stored_name``).
STORED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}-[0-9a-f]{12}\.(?:safetensors|gguf)$")
#: An upload being written: ``.upload-<32 hex>.tmp`` (``upload_temp_name``).
UPLOAD_TEMP_PREFIX = ".upload-"


def stored_name(name: str, fmt: str) -> str:
    """A fresh file name for an upload of vector ``name`` in format ``fmt``."""
    return f"{name}-{uuid.uuid4().hex[:12]}.{fmt}"


def upload_temp_name() -> str:
    return f"{UPLOAD_TEMP_PREFIX}{uuid.uuid4().hex}{TMP_SUFFIX}"


def temporary_upload_dir() -> Path:
    """An upload dir for a registry without a file (removed at exit)."""
    tmp = Path(tempfile.mkdtemp(prefix="vllm-steer-uploads-"))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp


def is_upload(entry: RegistryEntry, upload_dir: Path | None) -> bool:
    """A file the server stored (never a config or allowed-dir file)."""
    return (entry.origin == "registered" and upload_dir is not None
            and upload_dir in entry.path.parents)


def relative(p: Path, upload_dir: Path | None) -> str:
    """How the overlay names ``p``: relative to the upload dir when inside it."""
    if upload_dir is not None and upload_dir in p.parents:
        return str(p.relative_to(upload_dir))
    return str(p)


def absolute(rel: str, upload_dir: Path) -> Path:
    return (upload_dir / rel).resolve()


def retire(before: Iterable[RegistryEntry], after: Mapping[str, RegistryEntry],
           retired: Mapping[str, float], upload_dir: Path | None, now: float,
           retire_after_s: float) -> tuple[dict[str, float], set[str]]:
    """The retired upload files after a change from ``before`` to ``after`` (name -> the
    time it stopped being used: earlier ones, minus those used again, plus uploads that
    left the mapping now), and those retired at least ``retire_after_s`` ago (to delete).
    """
    used = {e.path for e in after.values()}
    kept = ({k: t for k, t in retired.items() if absolute(k, upload_dir) not in used}
            if upload_dir is not None else dict(retired))
    for e in before:
        if e.path not in used and is_upload(e, upload_dir):
            kept.setdefault(relative(e.path, upload_dir), now)
    expired = {k for k, t in kept.items() if now - t >= retire_after_s}
    return {k: t for k, t in kept.items() if k not in expired}, expired

"""The vector registry: named vectors, their files and default scales/layers, and the
directories path-based specs may read (file format: ``registry_file``).

Located by ``$VLLMSTEER_REGISTRY`` or the engine option
``additional_config={"vllm_steer": {"registry": PATH}}``; loaded once per process.

Vectors registered at run time (``register``/``unregister``, used by the server's
``/v1/steering/vectors`` routes) are persisted in an overlay file
``<upload_dir>/registry.overlay.yaml`` applied on top of the base file, so a restart keeps
them. ``upload_dir`` defaults to ``uploads`` next to the registry file, except for a
registry inside a ``vllm_steer`` package (the shipped one, whatever path names it), whose
uploads go to the user's data home (``vllm_steer.locations``): nothing is ever written
into the installed package.

Several processes may serve one registry (vLLM's ``--api-server-count``, data parallel):
the overlay is their shared state (``shared_file``). A mutation takes the overlay's lock
file, re-reads the overlay, and replaces it atomically with a version whose file identity
differs from every earlier one; every lookup of ``entries`` compares the file's identity
with the one it was read from (one ``stat``) and re-reads it when it changed. So a
registration, replacement or deletion is seen by every process's next lookup once
``register``/``unregister`` returned. Readers never see a half-updated mapping (it is
swapped as one reference). Upload files that left the mapping are deleted only
``retire_after_s`` later (``uploads.retire``: a request in another process may have
looked up the old entry a moment before).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vllm_steer import envvars
from vllm_steer.atomic_files import SWEEP_MIN_AGE_S, sweep_temporaries
from vllm_steer.steering import shared_file, uploads
from vllm_steer.steering.allowed_paths import allowed_path
from vllm_steer.steering.registry_file import (
    DEFAULT_MAX_UPLOAD_BYTES,
    NAME_RE,
    RegistryEntry,
    RegistryError,
    entry_json,
    max_upload_bytes,
    overlay_text,
    parse_overlay,
    read_registry_file,
)
from vllm_steer.steering.values import SpecError, parse_layers, parse_op_fields, parse_scale

__all__ = ["NAME_RE", "OVERLAY_NAME", "Registry", "RegistryEntry", "RegistryError",
           "load_registry"]

REGISTRY_ENV = envvars.REGISTRY
OVERLAY_NAME = "registry.overlay.yaml"
#: Lock file next to the overlay: serializes read-modify-writes of processes sharing it.
LOCK_NAME = ".registry.overlay.lock"


class Registry:
    """Named vectors plus the directories that path-based specs may read from.

    ``entries`` is the current mapping: the base file's entries, minus the names removed
    at run time, plus the registered ones. With a persistent overlay it is re-read
    whenever the overlay file changed (one ``stat`` per lookup), so every process that
    serves the same registry sees another process's registration by its next lookup.
    """

    #: Seconds an upload file no entry uses any more is kept before it is deleted, so a
    #: request that looked up the old entry just before a replace (in any process) can
    #: still read it. Deleted at a later registration, once this has passed.
    retire_after_s: float = 60.0

    def __init__(self, entries: dict[str, RegistryEntry] | None = None,
                 allowed_dirs: tuple[Path, ...] = (),
                 think_markers: tuple[str, str] | None = None, source: Path | None = None,
                 upload_dir: Path | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        #: The base file's entries (never changed at run time).
        self._base: dict[str, RegistryEntry] = dict(entries or {})
        self._entries: dict[str, RegistryEntry] = dict(self._base)
        self.allowed_dirs = tuple(allowed_dirs)
        #: ``(start, end)`` from the file; None: the served model's own
        #: (``vllm_steer.thinking``).
        self.think_markers = think_markers
        self.source = source
        #: Where registered uploads and the overlay live; None: a temporary dir (not
        #: persisted).
        self.upload_dir = upload_dir
        self.max_upload_bytes = max_upload_bytes
        #: Base-file names removed at run time (persisted in the overlay).
        self.removed: frozenset[str] = frozenset()
        #: Upload files no entry uses, with the time they stopped being used (relative
        #: to ``upload_dir``; persisted in the overlay, deleted after ``retire_after_s``).
        self._retired: dict[str, float] = {}
        #: ``_identity`` of the overlay file the current mapping was read from.
        self._overlay_id: tuple[int, ...] | None = None
        self._lock = threading.RLock()
        self._listeners: list[Callable[[set[Path]], None]] = []

    def __repr__(self) -> str:
        return (f"Registry(source={self.source}, entries={sorted(self._entries)}, "
                f"upload_dir={self.upload_dir})")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Registry:
        f = read_registry_file(path)
        reg = cls(f.entries, f.allowed_dirs, f.think_markers, f.path, f.upload_dir,
                  f.max_upload_bytes)
        reg._refresh()
        return reg

    # -- the current mapping (re-read when another process changed the overlay) ----------
    @property
    def entries(self) -> dict[str, RegistryEntry]:
        """name -> entry, current as of this call (treat as read-only)."""
        self._refresh()
        return self._entries

    def add_listener(self, fn: Callable[[set[Path]], None]) -> None:
        """Call ``fn(paths)`` with the vector files no entry uses any more after a change
        (made here or read from another process's overlay), e.g. to drop cached vectors."""
        with self._lock:
            self._listeners.append(fn)

    def _refresh(self) -> None:
        """Re-read the overlay if its file changed since the mapping was built."""
        overlay = self.overlay_path
        if overlay is None or shared_file.identity(overlay) == self._overlay_id:
            return
        with self._lock:
            if shared_file.identity(overlay) != self._overlay_id:
                self._load_overlay(overlay)

    def _load_overlay(self, overlay: Path) -> None:
        """Build the mapping from the base entries and the overlay file (under ``_lock``).

        The identity recorded is that of the open file the text was read from, so a
        replace between the check and the read is seen as a change at the next lookup.
        """
        try:
            with open(overlay, "rb") as f:
                ident = shared_file.identity(f.fileno())
                text = f.read().decode()
        except FileNotFoundError:
            ident, text = None, ""
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"{overlay}: cannot read overlay ({e})") from e
        assert self.upload_dir is not None
        doc = parse_overlay(text, self.upload_dir, str(overlay))
        entries = {k: v for k, v in self._base.items() if k not in doc.removed}
        entries.update(doc.entries)
        self._publish(entries, doc.removed, doc.retired)
        self._overlay_id = ident

    def _publish(self, entries: dict[str, RegistryEntry], removed: frozenset[str],
                 retired: dict[str, float]) -> None:
        """Swap in a new mapping (one reference assignment: readers never see a half one)
        and tell the listeners which files left it."""
        before = {e.path for e in self._entries.values()}
        self._entries, self.removed, self._retired = entries, removed, retired
        gone = before - {e.path for e in entries.values()}
        for fn in list(self._listeners) if gone else ():
            fn(gone)

    # -- run-time registration (thread- and process-safe, persisted in the overlay) -----
    @property
    def persistent(self) -> bool:
        """True when registrations survive a restart (the registry came from a file)."""
        return self.source is not None

    @property
    def overlay_path(self) -> Path | None:
        return self.upload_dir / OVERLAY_NAME if self.persistent and self.upload_dir else None

    def ensure_upload_dir(self) -> Path:
        """The upload dir, created on first use (a temporary one without a registry file)."""
        with self._lock:
            if self.upload_dir is None:
                self.upload_dir = uploads.temporary_upload_dir()
            self.upload_dir.mkdir(parents=True, exist_ok=True)
            return self.upload_dir

    def register(self, name: str, path: str | os.PathLike[str], *, scale: float | None = None,
                 layers: tuple[int, ...] | None = None, op: str = "add",
                 strength: float | None = None, value: float | None = None,
                 replace: bool = False,
                 before_commit: Callable[[], None] | None = None) -> RegistryEntry:
        """Add (or with ``replace`` overwrite) ``name``. When this returns, the next lookup
        in any process serving this registry sees it, and a crash cannot lose it.

        Raises ``KeyError`` if ``name`` exists and not ``replace``, ``ValueError`` for a
        bad name. A replaced upload's file is retired (deleted ``retire_after_s`` later):
        requests already admitted carry the vector's content, not its path.
        ``before_commit()`` runs under the writers' lock just before the overlay names
        ``path`` (an upload is published there, so that ``collect_uploads``, holding the
        same lock, can tell a killed writer's orphan from a live writer's file).
        """
        if not NAME_RE.match(name):
            raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '.', "
                             "'-' (at most 128, starting with a letter or digit)")
        try:
            ops = parse_op_fields({"op": op, "scale": scale, "strength": strength, "value": value})
            scale = parse_scale(1.0 if scale is None else scale, "scale")
            layers = parse_layers(list(layers), "layers") if layers else None
        except SpecError as e:
            raise RegistryError(f"vector {name!r}: {e}") from e
        entry = RegistryEntry(name, Path(path).resolve(), scale, layers, "registered", **ops)
        with self._mutating():
            if name in self._entries and not replace:
                raise KeyError(name)
            if before_commit is not None:
                before_commit()
            entries = dict(self._entries)
            entries[name] = entry
            self._commit(entries, self.removed - {name})
        return entry

    def unregister(self, name: str) -> RegistryEntry:
        """Remove ``name`` (raises ``KeyError`` if unknown); persisted across restarts."""
        with self._mutating():
            entries = dict(self._entries)
            old = entries.pop(name)
            # The tombstone keeps a base-file entry of this name from coming back on restart.
            self._commit(entries, self.removed | {name})
        return old

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive access to the mapping for a read-modify-write: this process's lock,
        the overlay's lock file (other processes), and the overlay re-read under both."""
        with self._lock:
            overlay = self.overlay_path
            if overlay is None:
                yield
                return
            with shared_file.exclusive(overlay.with_name(LOCK_NAME)):
                if shared_file.identity(overlay) != self._overlay_id:
                    self._load_overlay(overlay)
                yield

    def _commit(self, entries: dict[str, RegistryEntry], removed: frozenset[str]) -> None:
        """Write the overlay (when persistent), then publish the new mapping (under
        ``_mutating``). Upload files that left the mapping are retired, and retired files
        older than ``retire_after_s`` deleted."""
        keep, expired = uploads.retire(self._entries.values(), entries, self._retired,
                                       self.upload_dir, time.time(), self.retire_after_s)
        overlay = self.overlay_path
        if overlay is not None:
            vectors = {e.name: entry_json(e, uploads.relative(e.path, self.upload_dir))
                       for e in entries.values() if e.origin == "registered"}
            text = overlay_text(vectors, removed, keep)
            self._overlay_id = shared_file.replace(overlay, text.encode(), self._overlay_id)
        self._publish(entries, removed, keep)
        for k in expired:
            assert self.upload_dir is not None
            uploads.absolute(k, self.upload_dir).unlink(missing_ok=True)

    def collect_uploads(self, min_age_s: float = SWEEP_MIN_AGE_S) -> tuple[int, int]:
        """Delete what killed writers left in the upload dir: temporary files no live
        writer holds (uploads being written, overlay versions), and stored uploads that no
        entry names and that are not retired (a writer died after publishing the file and
        before the overlay named it: uploads are published only under the writers' lock,
        held here too). Returns ``(files deleted, bytes freed)``."""
        upload_dir = self.upload_dir
        if upload_dir is None or not upload_dir.is_dir():
            return 0, 0
        with self._mutating():
            deleted, freed = sweep_temporaries(upload_dir, lambda n: n.startswith("."),
                                               min_age_s)
            keep = {e.path for e in self._entries.values()}
            keep |= {uploads.absolute(k, upload_dir) for k in self._retired}
            for p in list(upload_dir.iterdir()):
                if not uploads.STORED_RE.match(p.name) or p.resolve() in keep:
                    continue
                try:
                    size = p.stat().st_size
                    p.unlink()
                except FileNotFoundError:
                    continue
                deleted, freed = deleted + 1, freed + size
        return deleted, freed

    def is_allowed(self, path: str | os.PathLike[str]) -> Path | None:
        """``allowed_paths.allowed_path`` for this registry's allowed dirs, relative paths
        also read from the registry file's directory."""
        return allowed_path(path, self.allowed_dirs,
                            self.source.parent if self.source is not None else None)


_lock = threading.Lock()
_cache: dict[str, Registry] = {}


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """The process-wide registry for ``path`` (default ``$VLLMSTEER_REGISTRY``; empty if unset)."""
    path = path or envvars.get(REGISTRY_ENV)
    key = str(Path(path).expanduser().resolve()) if path else ""
    with _lock:
        if key not in _cache:
            if key:
                _cache[key] = Registry.from_yaml(key)
            else:
                _cache[key] = Registry(max_upload_bytes=max_upload_bytes(None, "environment"))
        return _cache[key]

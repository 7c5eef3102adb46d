"""The vector registry: a YAML file naming vectors, their files and default scales/layers.

Located by ``$VLLMSTEER_REGISTRY`` or the engine option
``additional_config={"vllm_steer": {"registry": PATH}}``; loaded once per process.
Example::

    allowed_dirs: [vectors]          # relative to this file; specs may name files here by path
    think_markers: {start: "<think>", end: "</think>"}   # default: the model's own, else these
    upload_dir: uploads              # where the server stores registered vectors
    max_upload_bytes: 67108864       # vector upload limit of the server (default 64 MiB)
    vectors:
      happy: {path: vectors/happy.safetensors, scale: 1.0, layers: [10, 11, 12]}

Vectors registered at run time (``register``/``unregister``, used by the server's
``/v1/steering/vectors`` routes) are persisted in an overlay file
``<upload_dir>/registry.overlay.yaml`` (written as JSON, which is YAML) applied on top of
the base file, so a restart keeps them. ``upload_dir`` defaults to ``uploads`` next to the
registry file, except for a registry inside a ``vllm_steer`` package (the shipped one,
whatever path names it), whose uploads go to the user's data home
(``vllm_steer.locations``): nothing is ever written into the installed package.

Several processes may serve one registry (vLLM's ``--api-server-count``, data parallel):
the overlay is their shared state. A mutation takes the overlay's lock file (``flock``),
re-reads the overlay, and replaces it atomically with a version whose file identity
(inode, size, mtime/ctime in ns) differs from every earlier one; every lookup of
``entries`` compares the file's identity with the one it was read from (one ``stat``) and
re-reads it when it changed. So a registration, replacement or deletion is seen by every
process's next lookup once ``register``/``unregister`` returned. Readers never see a
half-updated mapping (it is swapped as one reference). Upload files that left the mapping
are deleted only ``retire_after_s`` later (a request in another process may have looked
up the old entry a moment before).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vllm_steer import envvars, locations
from vllm_steer.steering.values import SpecError, parse_layers, parse_op_fields, parse_scale

REGISTRY_ENV = envvars.REGISTRY
#: Override the registry's ``upload_dir`` / ``max_upload_bytes``.
UPLOAD_DIR_ENV = envvars.UPLOAD_DIR
MAX_UPLOAD_ENV = envvars.MAX_UPLOAD_BYTES
DEFAULT_UPLOAD_DIR = "uploads"
DEFAULT_MAX_UPLOAD_BYTES = 64 << 20
OVERLAY_NAME = "registry.overlay.yaml"
#: Lock file next to the overlay: serializes read-modify-writes of processes sharing it.
LOCK_NAME = ".registry.overlay.lock"
#: Vector names: no commas (the flat ``steer`` shorthand splits on them), no slashes.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class RegistryError(ValueError):
    """The registry file is malformed; the message names the file and entry."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    path: Path
    scale: float = 1.0
    layers: tuple[int, ...] | None = None
    #: ``config`` (the base YAML) or ``registered`` (added at run time, in the overlay).
    origin: str = "config"
    #: Default op (``add``, ``ablate``, ``clamp``) and its parameters for requests naming it.
    op: str = "add"
    strength: float = 1.0
    value: float = 0.0


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
        path = Path(path).expanduser().resolve()
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RegistryError(f"{path}: cannot read registry ({e})") from e
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: top level must be a mapping")
        unknown = set(raw) - {"vectors", "allowed_dirs", "think_markers", "upload_dir",
                              "max_upload_bytes"}
        if unknown:
            raise RegistryError(f"{path}: unknown keys {sorted(unknown)}")
        base = path.parent

        def rel(p: str, root: Path = base) -> Path:
            q = Path(os.path.expandvars(str(p))).expanduser()
            return (q if q.is_absolute() else root / q).resolve()

        dirs = tuple(rel(d) for d in raw.get("allowed_dirs") or [])
        entries = _parse_entries(raw.get("vectors"), rel, f"{path}: vectors", "config")
        tm = raw.get("think_markers")
        markers = None
        if tm is not None:
            if not isinstance(tm, dict) or set(tm) - {"start", "end"} or not all(
                    isinstance(tm.get(k), str) and tm.get(k) for k in ("start", "end")):
                raise RegistryError(f"{path}: think_markers must be {{start: STR, end: STR}}")
            markers = (tm["start"], tm["end"])
        upload = envvars.get(UPLOAD_DIR_ENV) or raw.get("upload_dir")
        if upload:
            upload_dir = rel(upload)
        elif locations.in_a_package(path):  # the shipped registry, however spelled
            upload_dir = locations.shipped_upload_dir()
        else:
            upload_dir = rel(DEFAULT_UPLOAD_DIR)
        limit = envvars.get(MAX_UPLOAD_ENV) or raw.get("max_upload_bytes")
        try:
            max_upload = int(limit) if limit is not None else DEFAULT_MAX_UPLOAD_BYTES
        except (TypeError, ValueError) as e:
            raise RegistryError(f"{path}: max_upload_bytes must be an integer") from e
        if max_upload <= 0:
            raise RegistryError(f"{path}: max_upload_bytes must be positive")
        reg = cls(entries, dirs, markers, path, upload_dir, max_upload)
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
        if overlay is None or _identity(overlay) == self._overlay_id:
            return
        with self._lock:
            if _identity(overlay) != self._overlay_id:
                self._load_overlay(overlay)

    def _load_overlay(self, overlay: Path) -> None:
        """Build the mapping from the base entries and the overlay file (under ``_lock``).

        The identity recorded is that of the open file the text was read from, so a
        replace between the check and the read is seen as a change at the next lookup.
        """
        try:
            with open(overlay, "rb") as f:
                ident = _identity(f.fileno())
                text = f.read().decode()
        except FileNotFoundError:
            ident, text = None, ""
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"{overlay}: cannot read overlay ({e})") from e
        try:
            raw = _parse_overlay(text)
        except yaml.YAMLError as e:
            raise RegistryError(f"{overlay}: cannot read overlay ({e})") from e
        if not isinstance(raw, dict) or set(raw) - {"vectors", "removed", "retired"}:
            raise RegistryError(f"{overlay}: expected only 'vectors', 'removed' and "
                                "'retired'")
        upload_dir = self.upload_dir
        assert upload_dir is not None

        def rel(p: str) -> Path:
            q = Path(p)
            return (q if q.is_absolute() else upload_dir / q).resolve()

        removed = frozenset(str(n) for n in raw.get("removed") or [])
        retired = raw.get("retired") or {}
        if not isinstance(retired, dict) or not all(
                isinstance(v, int | float) for v in retired.values()):
            raise RegistryError(f"{overlay}: 'retired' must map file -> time")
        entries = {k: v for k, v in self._base.items() if k not in removed}
        entries.update(_parse_entries(raw.get("vectors"), rel, f"{overlay}: vectors",
                                      "registered"))
        self._publish(entries, removed, {str(k): float(v) for k, v in retired.items()})
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
                tmp = Path(tempfile.mkdtemp(prefix="vllm-steer-uploads-"))
                atexit.register(shutil.rmtree, tmp, True)
                self.upload_dir = tmp
            self.upload_dir.mkdir(parents=True, exist_ok=True)
            return self.upload_dir

    def register(self, name: str, path: str | os.PathLike[str], *, scale: float | None = None,
                 layers: tuple[int, ...] | None = None, op: str = "add",
                 strength: float | None = None, value: float | None = None,
                 replace: bool = False) -> RegistryEntry:
        """Add (or with ``replace`` overwrite) ``name``. When this returns, the next lookup
        in any process serving this registry sees it.

        Raises ``KeyError`` if ``name`` exists and not ``replace``, ``ValueError`` for a
        bad name. A replaced upload's file is retired (deleted ``retire_after_s`` later):
        requests already admitted carry the vector's content, not its path.
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
            overlay.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(overlay.with_name(LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _identity(overlay) != self._overlay_id:
                    self._load_overlay(overlay)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _commit(self, entries: dict[str, RegistryEntry], removed: frozenset[str]) -> None:
        """Write the overlay (when persistent), then publish the new mapping (under
        ``_mutating``). Upload files that left the mapping are retired, and retired files
        older than ``retire_after_s`` deleted."""
        now = time.time()
        used = {e.path for e in entries.values()}
        retired = {k: t for k, t in self._retired.items() if self._upload_file(k) not in used}
        for e in self._entries.values():
            if e.path not in used and self._is_upload(e):
                retired.setdefault(self._rel_to_uploads(e.path), now)
        expired = {k for k, t in retired.items() if now - t >= self.retire_after_s}
        keep = {k: t for k, t in retired.items() if k not in expired}
        overlay = self.overlay_path
        if overlay is not None:
            vectors = {e.name: _entry_yaml(e, self._rel_to_uploads(e.path))
                       for e in entries.values() if e.origin == "registered"}
            # JSON (which is YAML): every process re-reads it after each change; a file of
            # 1000 entries parses in ~2 ms as JSON, ~0.8 s with PyYAML's SafeLoader here
            text = json.dumps({"vectors": vectors, "removed": sorted(removed),
                               "retired": keep}, sort_keys=True, indent=1) + "\n"
            self._overlay_id = _replace_file(overlay, text.encode(), self._overlay_id)
        self._publish(entries, removed, keep)
        for k in expired:
            self._upload_file(k).unlink(missing_ok=True)

    def _is_upload(self, entry: RegistryEntry) -> bool:
        """A file the server stored (never a config or allowed-dir file)."""
        return (entry.origin == "registered" and self.upload_dir is not None
                and self.upload_dir in entry.path.parents)

    def _upload_file(self, rel: str) -> Path:
        assert self.upload_dir is not None
        return (self.upload_dir / rel).resolve()

    def _rel_to_uploads(self, p: Path) -> str:
        if self.upload_dir is not None and self.upload_dir in p.parents:
            return str(p.relative_to(self.upload_dir))
        return str(p)

    def is_allowed(self, path: str | os.PathLike[str]) -> Path | None:
        """The resolved path when it lies inside an allowed dir (symlinks resolved), else None.

        A relative path is read relative to each allowed dir (``happy.safetensors``) and
        to the registry file's directory, the form the file itself uses
        (``vectors/happy.safetensors``); the first of these that exists wins, else the
        first inside an allowed dir (so a missing file is reported as missing). Paths
        the OS cannot even look up (NUL bytes, lone surrogates, ``~nouser``) are None.
        """
        try:
            p = Path(path).expanduser()
            if p.is_absolute():
                candidates = [p]
            else:
                candidates = [d / p for d in self.allowed_dirs]
                if self.source is not None:
                    candidates.append(self.source.parent / p)
            inside = []
            for c in candidates:
                real = c.resolve()
                if any(real == d or d in real.parents for d in self.allowed_dirs):
                    os.fsencode(real)  # raises for names the OS cannot encode
                    if real.exists():
                        return real
                    inside.append(real)
        except (OSError, ValueError, RuntimeError):
            return None
        return inside[0] if inside else None


def _parse_entries(raw: Any, rel: Any, where: str, origin: str) -> dict[str, RegistryEntry]:
    entries: dict[str, RegistryEntry] = {}
    if raw is not None and not isinstance(raw, dict):
        raise RegistryError(f"{where} must be a mapping of name -> entry")
    for name, spec in (raw or {}).items():
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict) or "path" not in spec:
            raise RegistryError(f"{where}.{name} needs a 'path'")
        layers = spec.get("layers")
        try:
            entries[str(name)] = RegistryEntry(
                name=str(name),
                path=rel(spec["path"]),
                scale=parse_scale(spec.get("scale", 1.0), "scale"),
                layers=parse_layers(layers, "layers") if layers is not None else None,
                origin=origin,
                **parse_op_fields(spec),
            )
        except (TypeError, ValueError) as e:
            raise RegistryError(f"{where}.{name}.{e}" if isinstance(e, SpecError)
                                else f"{where}.{name}: {e}") from e
    return entries


def _parse_overlay(text: str) -> Any:
    """The overlay's content: JSON as ``_commit`` writes it (fast), else YAML (overlays
    of earlier versions, hand edits)."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _entry_yaml(e: RegistryEntry, path: str) -> dict[str, Any]:
    """One registered entry as the overlay writes it (``_parse_entries`` reads it back)."""
    d: dict[str, Any] = {"path": path}
    if e.op == "add":  # ablate/clamp entries take no scale (``_op_defaults`` refuses one)
        d["scale"] = e.scale
    if e.layers:
        d["layers"] = list(e.layers)
    if e.op != "add":
        d["op"] = e.op
        if e.op == "ablate":
            d["strength"] = e.strength
        else:
            d["value"] = e.value
    return d


def _identity(f: str | os.PathLike[str] | int) -> tuple[int, ...] | None:
    """What tells one version of the overlay file from another: device, inode, size,
    mtime and ctime in ns (None if it does not exist). Never equal for two versions
    written by ``_replace_file``."""
    try:
        st = os.stat(f)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _replace_file(path: Path, data: bytes, previous: tuple[int, ...] | None
                  ) -> tuple[int, ...]:
    """Atomically replace ``path`` with ``data``; returns the new file's ``_identity``.

    Readers compare identities, not contents, so the new version must differ from every
    earlier one even when it has the same size, its inode number is reused and the
    clock has not ticked (file times advance in jiffies): its mtime is set strictly
    above the previous version's (the caller holds the overlay lock).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None:
            prev_mtime = previous[3]
            # ns, then coarser steps for file systems that store coarser times
            for step in (1, 1_000, 1_000_000, 1_000_000_000, 2_000_000_000):
                st = os.stat(tmp)
                if st.st_mtime_ns > prev_mtime:
                    break
                os.utime(tmp, ns=(st.st_atime_ns, prev_mtime + step))
            else:
                raise OSError(f"cannot give {path} a modification time after the "
                              "previous version's")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    ident = _identity(path)
    assert ident is not None
    return ident


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
                limit = envvars.get(MAX_UPLOAD_ENV)
                _cache[key] = Registry(max_upload_bytes=int(limit) if limit
                                       else DEFAULT_MAX_UPLOAD_BYTES)
        return _cache[key]

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
``<upload_dir>/registry.overlay.yaml`` that ``from_yaml`` applies on top of the base
file, so a restart keeps them. ``upload_dir`` defaults to ``uploads`` next to the registry
file, except for the registry shipped inside the package, whose uploads go to the user's
data home (``vllm_steer.locations``): nothing is ever written into the installed package.
Mutations swap ``entries`` for a new dict under a lock, so readers (the resolver, on every
request) never see a half-updated mapping.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vllm_steer import envvars, locations
from vllm_steer.steering.values import (
    SpecError,
    check_op_fields,
    parse_clamp_value,
    parse_layers,
    parse_op,
    parse_scale,
    parse_strength,
)

REGISTRY_ENV = envvars.REGISTRY
#: Override the registry's ``upload_dir`` / ``max_upload_bytes``.
UPLOAD_DIR_ENV = envvars.UPLOAD_DIR
MAX_UPLOAD_ENV = envvars.MAX_UPLOAD_BYTES
DEFAULT_UPLOAD_DIR = "uploads"
DEFAULT_MAX_UPLOAD_BYTES = 64 << 20
OVERLAY_NAME = "registry.overlay.yaml"
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


@dataclass
class Registry:
    """Named vectors plus the directories that path-based specs may read from."""

    entries: dict[str, RegistryEntry] = field(default_factory=dict)
    allowed_dirs: tuple[Path, ...] = ()
    #: ``(start, end)`` from the file; None: the served model's own (``vllm_steer.thinking``).
    think_markers: tuple[str, str] | None = None
    source: Path | None = None
    #: Where registered uploads and the overlay live; None: a temporary dir (not persisted).
    upload_dir: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    #: Base-file names removed at run time (persisted in the overlay).
    removed: frozenset[str] = frozenset()
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

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
        elif locations.is_shipped_registry(path):
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
        reg._apply_overlay()
        return reg

    # -- run-time registration (thread-safe, persisted in the overlay) -------------------
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

    def register(self, name: str, path: str | os.PathLike[str], *, scale: float = 1.0,
                 layers: tuple[int, ...] | None = None, replace: bool = False
                 ) -> RegistryEntry:
        """Add (or with ``replace`` overwrite) ``name``; visible to the next request.

        Raises ``KeyError`` if ``name`` exists and not ``replace``, ``ValueError`` for a
        bad name. A replaced upload's file is deleted: requests already admitted carry
        the vector's content, not its path.
        """
        if not NAME_RE.match(name):
            raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '.', "
                             "'-' (at most 128, starting with a letter or digit)")
        try:
            scale = parse_scale(scale, "scale")
            layers = parse_layers(list(layers), "layers") if layers else None
        except SpecError as e:
            raise RegistryError(f"vector {name!r}: {e}") from e
        entry = RegistryEntry(name, Path(path).resolve(), scale, layers, "registered")
        with self._lock:
            old = self.entries.get(name)
            if old is not None and not replace:
                raise KeyError(name)
            entries = dict(self.entries)
            entries[name] = entry
            self._commit(entries, self.removed - {name})
            if old is not None:
                self._drop_file(old)
        return entry

    def unregister(self, name: str) -> RegistryEntry:
        """Remove ``name`` (raises ``KeyError`` if unknown); persisted across restarts."""
        with self._lock:
            entries = dict(self.entries)
            old = entries.pop(name)
            # The tombstone keeps a base-file entry of this name from coming back on restart.
            self._commit(entries, self.removed | {name})
            self._drop_file(old)
        return old

    def _commit(self, entries: dict[str, RegistryEntry], removed: frozenset[str]) -> None:
        """Write the overlay (when persistent), then publish the new mapping."""
        overlay = self.overlay_path
        if overlay is not None:
            vectors: dict[str, Any] = {}
            for e in entries.values():
                if e.origin != "registered":
                    continue
                d: dict[str, Any] = {"path": self._rel_to_uploads(e.path), "scale": e.scale}
                if e.layers:
                    d["layers"] = list(e.layers)
                vectors[e.name] = d
            text = ("# Written by the vllm-steer server: vectors registered at run time.\n"
                    + yaml.safe_dump({"vectors": vectors, "removed": sorted(removed)},
                                     sort_keys=True))
            overlay.parent.mkdir(parents=True, exist_ok=True)
            tmp = overlay.with_name(f".{overlay.name}.tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, overlay)
        self.entries = entries
        self.removed = removed

    def _rel_to_uploads(self, p: Path) -> str:
        if self.upload_dir is not None and self.upload_dir in p.parents:
            return str(p.relative_to(self.upload_dir))
        return str(p)

    def _drop_file(self, entry: RegistryEntry) -> None:
        """Delete an uploaded file that no entry uses any more (never a config file)."""
        if (entry.origin == "registered" and self.upload_dir is not None
                and self.upload_dir in entry.path.parents
                and all(e.path != entry.path for e in self.entries.values())):
            entry.path.unlink(missing_ok=True)

    def _apply_overlay(self) -> None:
        overlay = self.overlay_path
        if overlay is None or not overlay.is_file():
            return
        try:
            raw = yaml.safe_load(overlay.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RegistryError(f"{overlay}: cannot read overlay ({e})") from e
        if not isinstance(raw, dict) or set(raw) - {"vectors", "removed"}:
            raise RegistryError(f"{overlay}: expected only 'vectors' and 'removed'")
        upload_dir = self.upload_dir
        assert upload_dir is not None

        def rel(p: str) -> Path:
            q = Path(p)
            return (q if q.is_absolute() else upload_dir / q).resolve()

        removed = frozenset(str(n) for n in raw.get("removed") or [])
        entries = {k: v for k, v in self.entries.items() if k not in removed}
        entries.update(_parse_entries(raw.get("vectors"), rel, f"{overlay}: vectors",
                                      "registered"))
        self.entries, self.removed = entries, removed

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
                **_op_defaults(spec),
            )
        except (TypeError, ValueError) as e:
            raise RegistryError(f"{where}.{name}.{e}" if isinstance(e, SpecError)
                                else f"{where}.{name}: {e}") from e
    return entries


def _op_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """``op``/``strength``/``value`` of a registry entry (validated like a spec's)."""
    op = parse_op(spec.get("op", "add"), "op")
    check_op_fields(op, scale=spec.get("scale"), strength=spec.get("strength"),
                    value=spec.get("value"), where="entry")
    out: dict[str, Any] = {"op": op}
    if spec.get("strength") is not None:
        out["strength"] = parse_strength(spec["strength"], "strength")
    if spec.get("value") is not None:
        out["value"] = parse_clamp_value(spec["value"], "value")
    return out


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

"""The vector registry: a YAML file naming vectors, their files and default scales/layers.

Located by ``$VLLM_STEER_REGISTRY`` or the engine option
``additional_config={"vllm_steer": {"registry": PATH}}``; loaded once per process.
Example::

    allowed_dirs: [vectors]          # relative to this file; specs may name files here by path
    think_markers: {start: "<think>", end: "</think>"}
    vectors:
      happy: {path: vectors/happy.safetensors, scale: 1.0, layers: [10, 11, 12]}
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REGISTRY_ENV = "VLLM_STEER_REGISTRY"
DEFAULT_THINK_MARKERS = ("<think>", "</think>")


class RegistryError(ValueError):
    """The registry file is malformed; the message names the file and entry."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    path: Path
    scale: float = 1.0
    layers: tuple[int, ...] | None = None


@dataclass
class Registry:
    """Named vectors plus the directories that path-based specs may read from."""

    entries: dict[str, RegistryEntry] = field(default_factory=dict)
    allowed_dirs: tuple[Path, ...] = ()
    think_markers: tuple[str, str] = DEFAULT_THINK_MARKERS
    source: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Registry:
        path = Path(path).expanduser().resolve()
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RegistryError(f"{path}: cannot read registry ({e})") from e
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: top level must be a mapping")
        unknown = set(raw) - {"vectors", "allowed_dirs", "think_markers"}
        if unknown:
            raise RegistryError(f"{path}: unknown keys {sorted(unknown)}")
        base = path.parent

        def rel(p: str) -> Path:
            q = Path(os.path.expandvars(str(p))).expanduser()
            return (q if q.is_absolute() else base / q).resolve()

        dirs = tuple(rel(d) for d in raw.get("allowed_dirs") or [])
        entries: dict[str, RegistryEntry] = {}
        for name, spec in (raw.get("vectors") or {}).items():
            if isinstance(spec, str):
                spec = {"path": spec}
            if not isinstance(spec, dict) or "path" not in spec:
                raise RegistryError(f"{path}: vectors.{name} needs a 'path'")
            layers = spec.get("layers")
            entries[str(name)] = RegistryEntry(
                name=str(name),
                path=rel(spec["path"]),
                scale=float(spec.get("scale", 1.0)),
                layers=tuple(int(x) for x in layers) if layers else None,
            )
        tm = raw.get("think_markers") or {}
        markers = (str(tm.get("start", DEFAULT_THINK_MARKERS[0])),
                   str(tm.get("end", DEFAULT_THINK_MARKERS[1])))
        return cls(entries, dirs, markers, path)

    def is_allowed(self, path: str | os.PathLike[str]) -> Path | None:
        """The resolved path when it lies inside an allowed dir (symlinks resolved), else None."""
        p = Path(path).expanduser()
        candidates = [p] if p.is_absolute() else [d / p for d in self.allowed_dirs]
        for c in candidates:
            real = c.resolve()
            for d in self.allowed_dirs:
                if real == d or d in real.parents:
                    return real
        return None


_lock = threading.Lock()
_cache: dict[str, Registry] = {}


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """The process-wide registry for ``path`` (default ``$VLLM_STEER_REGISTRY``; empty if unset)."""
    path = path or os.environ.get(REGISTRY_ENV)
    key = str(Path(path).expanduser().resolve()) if path else ""
    with _lock:
        if key not in _cache:
            _cache[key] = Registry.from_yaml(key) if key else Registry()
        return _cache[key]

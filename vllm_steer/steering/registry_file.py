"""The registry's file formats: the YAML file an operator writes, and the overlay document
the server writes for vectors registered at run time.

Example registry file::

    allowed_dirs: [vectors]          # relative to this file; specs may name files here by path
    think_markers: {start: "<think>", end: "</think>"}   # default: the model's own, else these
    upload_dir: uploads              # where the server stores registered vectors
    max_upload_bytes: 67108864       # vector upload limit of the server (default 64 MiB)
    vectors:
      happy: {path: vectors/happy.safetensors, scale: 1.0, layers: [10, 11, 12]}

The overlay (``<upload_dir>/registry.overlay.yaml``) is JSON, which is YAML:
``{"vectors": {name: entry}, "removed": [name], "retired": {file: time}}``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vllm_steer import envvars, locations
from vllm_steer.steering.values import SpecError, parse_layers, parse_op_fields, parse_scale

#: Override the registry's ``upload_dir`` / ``max_upload_bytes``.
UPLOAD_DIR_ENV = envvars.UPLOAD_DIR
MAX_UPLOAD_ENV = envvars.MAX_UPLOAD_BYTES
DEFAULT_UPLOAD_DIR = "uploads"
DEFAULT_MAX_UPLOAD_BYTES = 64 << 20
#: Vector names: no commas (the flat ``steer`` shorthand splits on them), no slashes.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_FILE_KEYS = {"vectors", "allowed_dirs", "think_markers", "upload_dir", "max_upload_bytes"}
_OVERLAY_KEYS = {"vectors", "removed", "retired"}


class RegistryError(ValueError):
    """The registry file is malformed; the message names the file and entry."""


@dataclass(frozen=True)
class RegistryEntry:
    """One named vector: its file, and the defaults of requests that name it."""

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


@dataclass(frozen=True)
class RegistryFile:
    """What a registry file says (``read_registry_file``)."""

    path: Path
    entries: dict[str, RegistryEntry]
    allowed_dirs: tuple[Path, ...]
    think_markers: tuple[str, str] | None
    upload_dir: Path
    max_upload_bytes: int


@dataclass(frozen=True)
class Overlay:
    """What an overlay document says (``parse_overlay``)."""

    entries: dict[str, RegistryEntry]
    removed: frozenset[str]
    retired: dict[str, float]


def max_upload_bytes(raw: Any, where: str) -> int:
    """``$VLLMSTEER_MAX_UPLOAD_BYTES``, else ``raw``, else the default; positive."""
    limit = envvars.get(MAX_UPLOAD_ENV) or raw
    try:
        value = int(limit) if limit is not None else DEFAULT_MAX_UPLOAD_BYTES
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{where}: max_upload_bytes must be an integer") from e
    if value <= 0:
        raise RegistryError(f"{where}: max_upload_bytes must be positive")
    return value


def read_registry_file(path: str | os.PathLike[str]) -> RegistryFile:
    """Parse a registry file (paths in it are relative to its directory)."""
    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RegistryError(f"{path}: cannot read registry ({e})") from e
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: top level must be a mapping")
    unknown = set(raw) - _FILE_KEYS
    if unknown:
        raise RegistryError(f"{path}: unknown keys {sorted(unknown)}")
    base = path.parent

    def rel(p: str) -> Path:
        q = Path(os.path.expandvars(str(p))).expanduser()
        return (q if q.is_absolute() else base / q).resolve()

    dirs = tuple(rel(d) for d in raw.get("allowed_dirs") or [])
    entries = parse_entries(raw.get("vectors"), rel, f"{path}: vectors", "config")
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
    return RegistryFile(path, entries, dirs, markers, upload_dir,
                        max_upload_bytes(raw.get("max_upload_bytes"), str(path)))


def parse_entries(raw: Any, rel: Callable[[str], Path], where: str, origin: str
                  ) -> dict[str, RegistryEntry]:
    """``vectors:`` of a registry file or an overlay; ``rel`` resolves their paths."""
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


def parse_overlay(text: str, upload_dir: Path, where: str) -> Overlay:
    """An overlay document: JSON as ``overlay_text`` writes it (fast), else YAML
    (overlays of earlier versions, hand edits). Relative paths are in ``upload_dir``."""
    try:
        try:
            raw = json.loads(text) if text.strip() else {}
        except ValueError:
            raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as e:
        raise RegistryError(f"{where}: cannot read overlay ({e})") from e
    if not isinstance(raw, dict) or set(raw) - _OVERLAY_KEYS:
        raise RegistryError(f"{where}: expected only 'vectors', 'removed' and 'retired'")

    def rel(p: str) -> Path:
        q = Path(p)
        return (q if q.is_absolute() else upload_dir / q).resolve()

    retired = raw.get("retired") or {}
    if not isinstance(retired, dict) or not all(
            isinstance(v, int | float) for v in retired.values()):
        raise RegistryError(f"{where}: 'retired' must map file -> time")
    return Overlay(parse_entries(raw.get("vectors"), rel, f"{where}: vectors", "registered"),
                   frozenset(str(n) for n in raw.get("removed") or []),
                   {str(k): float(v) for k, v in retired.items()})


def entry_json(e: RegistryEntry, path: str) -> dict[str, Any]:
    """One registered entry as the overlay writes it (``parse_entries`` reads it back)."""
    d: dict[str, Any] = {"path": path}
    if e.op == "add":  # ablate/clamp entries take no scale (``parse_op_fields`` refuses one)
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


def overlay_text(vectors: dict[str, dict[str, Any]], removed: frozenset[str],
                 retired: dict[str, float]) -> str:
    """The overlay document. JSON (which is YAML): every process re-reads it after each
    change; a file of 1000 entries parses in ~2 ms as JSON, ~0.8 s with PyYAML's
    SafeLoader here."""
    return json.dumps({"vectors": vectors, "removed": sorted(removed), "retired": retired},
                      sort_keys=True, indent=1) + "\n"

"""Reading and writing ``SteeringVector`` files: safetensors (native) and llama.cpp GGUF.

Neither path unpickles anything. The format is detected from the file's magic bytes,
not its extension.

GGUF control vectors (llama.cpp ``--control-vector``, repeng ``export_gguf``): F32 1-D
tensors ``direction.N``, ``general.architecture = "controlvector"``,
``controlvector.model_hint`` and ``controlvector.layer_count``. llama.cpp adds
``direction.N`` to the output of block N and rejects a whole file that contains
``direction.0`` (its layer 0 has no control slot), so exporting a vector that steers
layer 0 is refused unless ``drop_layer0=True``; importing accepts ``direction.0`` because
this project can steer it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from vllm_steer.atomic_files import atomic_path
from vllm_steer.vector_errors import VectorFileError


class RawVector(NamedTuple):
    """What a file holds: ``directions`` ``{layer: float tensor [hidden]}`` and ``metadata``
    ``{key: str}`` (``vllm_steer.vector.VectorMetadata.from_dict`` reads it)."""

    directions: dict[int, torch.Tensor]
    metadata: dict[str, str]


FORMAT_NAME = "vllm-steer-vector"
FORMAT_VERSION = "1"
_TENSOR_RE = re.compile(r"^direction\.(\d+)$")
GGUF_ARCH = "controlvector"
#: ``created_by`` of a file that does not say who made it.
UNKNOWN_ORIGIN = "unknown"


class VectorLike(Protocol):
    """What the writers need of a vector (``SteeringVector`` has it)."""

    directions: Mapping[int, torch.Tensor]
    hidden_size: int
    layers: list[int]
    metadata: Any


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"safetensors"`` or ``"gguf"`` from the first bytes; raise ``VectorFileError`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise VectorFileError(p, "not a regular file" if p.exists() else "no such file")
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9:
        (hlen,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < hlen <= p.stat().st_size - 8:
            return "safetensors"
        if head[8:9] == b"{":
            raise VectorFileError(p, "truncated safetensors file (header longer than the file)")
    raise VectorFileError(p, "unknown format: neither safetensors nor GGUF")


# -- safetensors -------------------------------------------------------------------------
def save_safetensors(vector: VectorLike, path: str | os.PathLike[str]) -> None:
    from safetensors.torch import save_file

    meta = vector.metadata.to_dict()
    meta["hidden_size"] = str(vector.hidden_size)
    meta["format"] = FORMAT_NAME
    meta["format_version"] = FORMAT_VERSION
    meta["layers"] = json.dumps(vector.layers)
    tensors = {f"direction.{k}": v.contiguous() for k, v in vector.directions.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_safetensors(path: str | os.PathLike[str]) -> RawVector:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys())
            raw = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise VectorFileError(path, f"cannot read safetensors file ({e})") from e
    directions: dict[int, torch.Tensor] = {}
    for name, t in raw.items():
        layer = _layer_of(path, name, directions)
        if not t.dtype.is_floating_point:
            raise VectorFileError(path, f"tensor {name} has dtype {t.dtype}, expected float")
        directions[layer] = t
    return _build(path, directions, meta)


def _layer_of(path, name: str, seen: dict[int, torch.Tensor]) -> int:
    m = _TENSOR_RE.match(name)
    if not m:
        raise VectorFileError(path, f"unexpected tensor {name!r} (expected direction.N)")
    layer = int(m.group(1))
    if layer in seen:
        raise VectorFileError(path, f"tensor {name!r} repeats layer {layer}")
    return layer


# -- GGUF --------------------------------------------------------------------------------
def save_gguf(
    vector: VectorLike, path: str | os.PathLike[str], *, drop_layer0: bool = False
) -> None:
    """Write a llama.cpp control vector; see the module docstring for layer 0."""
    import gguf

    dirs = dict(vector.directions)
    if 0 in dirs:
        if not drop_layer0:
            raise VectorFileError(
                path,
                "vector steers layer 0, which llama.cpp control vectors cannot hold "
                "(llama.cpp rejects a file containing direction.0); pass drop_layer0=True "
                "(CLI --drop-layer0) to export without it",
            )
        warnings.warn(
            f"{path}: layer 0 dropped from GGUF export (llama.cpp cannot steer it)", stacklevel=2
        )
        del dirs[0]
    if not dirs:
        raise VectorFileError(path, "nothing to export: the vector only steers layer 0")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", vector.metadata.architecture or "unknown")
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(dirs))
        meta = vector.metadata.to_dict()
        meta["hidden_size"] = str(vector.hidden_size)  # as in save_safetensors
        for key, value in meta.items():
            if value:
                writer.add_string(f"vllm_steer.{key}", value)
        for layer, t in dirs.items():
            writer.add_tensor(f"direction.{layer}", t.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    with atomic_path(path) as tmp:
        write(str(tmp))


def read_gguf(path: str | os.PathLike[str]) -> RawVector:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on bad bytes
        raise VectorFileError(
            path, f"cannot read GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e

    def field_str(name: str) -> str | None:
        f = reader.get_field(name)
        if f is None:
            return None
        try:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        except Exception:
            return str(f.parts[-1].tolist())

    arch = field_str("general.architecture")
    if arch is not None and arch != GGUF_ARCH:
        raise VectorFileError(path, f"GGUF architecture is {arch!r}, not {GGUF_ARCH!r}")
    meta = {}
    prefix = "vllm_steer."
    for name in reader.fields:  # every key save_gguf wrote, extra.* included
        if name.startswith(prefix):
            value = field_str(name)
            if value is not None:
                meta[name[len(prefix):]] = value
    hint = field_str(f"{GGUF_ARCH}.model_hint")
    if hint and not meta.get("architecture"):
        meta["architecture"] = hint
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        layer = _layer_of(path, t.name, directions)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorFileError(path, f"tensor {t.name} is {t.tensor_type.name}, expected F32")
        data = np.asarray(t.data, dtype=np.float32)
        if data.ndim != 1:
            raise VectorFileError(path, f"tensor {t.name} has shape {data.shape}, expected 1-D")
        directions[layer] = torch.from_numpy(data.copy())
    return _build(path, directions, meta)


# -- dispatch ----------------------------------------------------------------------------
def read(path: str | os.PathLike[str]) -> RawVector:
    """``(directions, metadata)`` of a vector file of either format (detected from content),
    checked: 1-D finite float tensors of one hidden size; ``created_by`` "unknown" and the
    hidden size from the tensors when the file does not say (repeng, llama.cpp files)."""
    fmt = detect_format(path)
    return read_gguf(path) if fmt == "gguf" else read_safetensors(path)


def write(vector: VectorLike, path: str | os.PathLike[str], *, drop_layer0: bool = False
          ) -> None:
    """Save as GGUF when ``path`` ends with ``.gguf``, otherwise as safetensors."""
    if str(path).lower().endswith(".gguf"):
        save_gguf(vector, path, drop_layer0=drop_layer0)
    else:
        save_safetensors(vector, path)


def _build(path, directions: dict[int, torch.Tensor], meta: dict[str, str]) -> RawVector:
    if not directions:
        raise VectorFileError(path, "file holds no direction.N tensors")
    for layer, t in directions.items():
        if t.ndim != 1:
            raise VectorFileError(
                path, f"direction.{layer} has shape {tuple(t.shape)}, expected [hidden]"
            )
        if not bool(torch.isfinite(t.float()).all()):
            raise VectorFileError(path, f"direction.{layer} contains NaN or inf")
    sizes = {int(t.shape[0]) for t in directions.values()}
    if len(sizes) != 1:
        raise VectorFileError(path, f"directions have different hidden sizes {sorted(sizes)}")
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "layers")}
    # A file without vllm-steer metadata (repeng, llama.cpp's cvector-generator) says
    # neither who made it nor its sizes; the tensors give the hidden size, the origin is
    # unknown (SteeringVector would otherwise stamp it as made by this vllm-steer).
    if not meta.get("created_by"):
        meta["created_by"] = UNKNOWN_ORIGIN
    if meta.get("hidden_size", "0") in ("", "0"):
        meta["hidden_size"] = str(sizes.pop())
    return RawVector(directions, meta)

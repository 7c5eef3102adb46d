"""``SteeringVector``: per-layer control-vector directions plus metadata.

Layer convention (whole project): layer ``i`` is the output of decoder block ``i``
(0-based), i.e. HF ``hidden_states[i + 1]``. Steering at layer ``i`` adds the
direction to that block's output, the residual stream after block ``i``. This is
repeng's and llama.cpp's convention too.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vllm_steer import vector_io
from vllm_steer.vector_errors import SteeringVectorError, VectorFileError
from vllm_steer.version import __version__


@dataclass(frozen=True)
class VectorMetadata:
    """Where a vector came from. Every field is optional except what validation needs."""

    model_name: str = ""
    architecture: str = ""
    hidden_size: int = 0
    num_layers: int = 0
    method: str = ""
    dataset_fingerprint: str = ""
    created_by: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, str]:
        """Flat str->str mapping (safetensors headers only hold strings)."""
        out = {
            "model_name": self.model_name,
            "architecture": self.architecture,
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "method": self.method,
            "dataset_fingerprint": self.dataset_fingerprint,
            "created_by": self.created_by,
        }
        out.update({f"extra.{k}": str(v) for k, v in self.extra.items()})
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> VectorMetadata:
        """Metadata from a file's string-valued metadata table (the inverse of ``to_dict``)."""
        def as_int(key: str) -> int:
            raw = d.get(key, "0") or "0"
            try:
                return int(raw)
            except ValueError as e:
                raise SteeringVectorError(
                    f"metadata field {key!r} is not an integer: {raw!r}"
                ) from e

        return cls(
            model_name=d.get("model_name", ""),
            architecture=d.get("architecture", ""),
            hidden_size=as_int("hidden_size"),
            num_layers=as_int("num_layers"),
            method=d.get("method", ""),
            dataset_fingerprint=d.get("dataset_fingerprint", ""),
            created_by=d.get("created_by", ""),
            extra={k[len("extra."):]: v for k, v in d.items() if k.startswith("extra.")},
        )


def _created_by() -> str:
    return f"vllm-steer {__version__}"


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Per-layer directions: ``directions[i]`` is a float32 tensor ``[hidden]`` for layer ``i``.

    Arithmetic works layer-wise: ``a + b`` sums directions on the union of layers
    (a layer missing from one side counts as zero), ``s * v`` scales every layer.
    The directions are copied on construction (never aliased with the caller's tensors).
    ``==`` is identity; compare contents with ``allclose``.
    """

    directions: dict[int, torch.Tensor]
    metadata: VectorMetadata = field(default_factory=VectorMetadata)

    def __post_init__(self) -> None:
        dirs: dict[int, torch.Tensor] = {}
        for layer, vec in self.directions.items():
            try:
                if isinstance(layer, bool):
                    raise TypeError
                index = operator.index(layer)  # int, numpy/torch integer scalars
            except TypeError:
                raise SteeringVectorError(f"layer index must be an int, got {layer!r}") from None
            t = torch.as_tensor(vec).detach().to(device="cpu", dtype=torch.float32)
            if index in dirs:
                raise SteeringVectorError(f"layer {index} given twice")
            dirs[index] = t.clone(memory_format=torch.contiguous_format)
        object.__setattr__(self, "directions", dict(sorted(dirs.items())))
        if not self.metadata.created_by:
            object.__setattr__(self, "metadata", replace(self.metadata, created_by=_created_by()))
        self.validate()

    # -- properties -------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """The layers this vector has a direction for, in ascending order."""
        return list(self.directions)

    @property
    def hidden_size(self) -> int:
        """The length of each direction (the model's hidden size)."""
        if self.directions:
            return int(next(iter(self.directions.values())).shape[0])
        return self.metadata.hidden_size

    def validate(
        self, *, hidden_size: int | None = None, num_layers: int | None = None, where: str = ""
    ) -> None:
        """Raise ``SteeringVectorError`` unless every direction is finite, 1-D and equally sized.

        ``hidden_size``/``num_layers`` additionally check the vector against a model.
        """
        prefix = f"{where}: " if where else ""
        if not self.directions:
            raise SteeringVectorError(f"{prefix}vector has no layers")
        sizes = set()
        for layer, t in self.directions.items():
            if layer < 0:
                raise SteeringVectorError(f"{prefix}layer {layer} is negative")
            if t.ndim != 1:
                raise SteeringVectorError(
                    f"{prefix}layer {layer} has shape {tuple(t.shape)}, expected [hidden]"
                )
            if not bool(torch.isfinite(t).all()):
                raise SteeringVectorError(f"{prefix}layer {layer} contains NaN or inf")
            sizes.add(int(t.shape[0]))
        if len(sizes) != 1:
            raise SteeringVectorError(f"{prefix}layers have different hidden sizes {sorted(sizes)}")
        size = sizes.pop()
        if self.metadata.hidden_size and self.metadata.hidden_size != size:
            raise SteeringVectorError(
                f"{prefix}metadata hidden_size={self.metadata.hidden_size} "
                f"but directions have {size}"
            )
        if hidden_size is not None and size != hidden_size:
            raise SteeringVectorError(
                f"{prefix}hidden size {size} does not match the model's hidden size {hidden_size}"
            )
        if num_layers is not None:
            bad = [i for i in self.directions if i >= num_layers]
            if bad:
                raise SteeringVectorError(
                    f"{prefix}layers {bad} out of range for a model with {num_layers} layers "
                    f"(valid: 0..{num_layers - 1})"
                )

    # -- arithmetic -------------------------------------------------------------------
    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.hidden_size != self.hidden_size:
            raise SteeringVectorError(
                f"cannot combine vectors of hidden size {self.hidden_size} and {other.hidden_size}"
            )
        out = {k: v.clone() for k, v in self.directions.items()}
        for layer, v in other.directions.items():
            out[layer] = out[layer] + sign * v if layer in out else sign * v
        return SteeringVector(out, replace(self.metadata, method="combined", created_by=""))

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> SteeringVector:
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            return NotImplemented
        if not math.isfinite(scale):
            raise SteeringVectorError(f"scale must be finite, got {scale}")
        return SteeringVector(
            {k: v * float(scale) for k, v in self.directions.items()}, self.metadata
        )

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    # -- helpers ----------------------------------------------------------------------
    def select_layers(self, layers: Iterable[int]) -> SteeringVector:
        """Keep only ``layers`` (those the vector has); raise if none remain."""
        wanted = set(layers)
        kept = {k: v for k, v in self.directions.items() if k in wanted}
        if not kept:
            raise SteeringVectorError(
                f"none of layers {sorted(wanted)} are in this vector (has {self.layers})"
            )
        return SteeringVector(kept, self.metadata)

    def to_dense(self, num_layers: int) -> torch.Tensor:
        """float32 ``[num_layers, hidden]`` with zeros on layers the vector does not steer."""
        self.validate(num_layers=num_layers)
        dense = torch.zeros(num_layers, self.hidden_size, dtype=torch.float32)
        for layer, v in self.directions.items():
            dense[layer] = v
        return dense

    def allclose(self, other: SteeringVector, atol: float = 1e-6) -> bool:
        """Same layers and every direction equal to ``other``'s within ``atol``."""
        return self.layers == other.layers and all(
            torch.allclose(self.directions[k], other.directions[k], atol=atol) for k in self.layers
        )

    def save(self, path: str | os.PathLike[str], *, drop_layer0: bool = False) -> None:
        """Write safetensors, or GGUF when ``path`` ends with ``.gguf`` (see ``vector_io``)."""
        vector_io.write(self, path, drop_layer0=drop_layer0)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVector:
        """Read a vector file of either format (detected from its content)."""
        raw = vector_io.read(path)
        try:
            return cls(raw.directions, VectorMetadata.from_dict(raw.metadata))
        except VectorFileError:
            raise
        except SteeringVectorError as e:
            raise VectorFileError(path, str(e)) from e


def load(path: str | os.PathLike[str]) -> SteeringVector:
    """``SteeringVector.load(path)``."""
    return SteeringVector.load(path)


def save(vector: SteeringVector, path: str | os.PathLike[str], *, drop_layer0: bool = False
         ) -> None:
    """``vector.save(path, drop_layer0=...)``."""
    vector.save(path, drop_layer0=drop_layer0)


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``vllm-steer vector info`` prints: format, layers, per-layer norms and the
    metadata, with sizes as numbers and fields the file does not record as None."""
    v = load(path)
    meta: dict[str, Any] = {}
    for key, value in v.metadata.to_dict().items():
        if key in ("hidden_size", "num_layers"):
            meta[key] = int(value) or None
        else:
            meta[key] = value or None
    return {"path": str(path), "format": vector_io.detect_format(path),
            "hidden_size": v.hidden_size, "layers": v.layers,
            "norms": {str(k): round(float(t.norm()), 6) for k, t in v.directions.items()},
            "metadata": meta}

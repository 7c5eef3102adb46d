"""Random steering vectors plus a registry naming them, for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from vllm_steer.vector import SteeringVector

#: The default model's test vectors: ``v1`` on every layer, ``v2`` (default scale 2.0 in the
#: registry) on 5..19, ``v3`` on every third layer, and ``wide`` with the wrong hidden size.
SMOLLM2_TEST_VECTORS: dict[str, Iterable[int]] = {
    "v1": range(30), "v2": range(5, 20), "v3": range(0, 30, 3)}


def write_vectors(root: str | Path, specs: Mapping[str, Iterable[int]], *, hidden: int,
                  norm_scale: float = 0.15, seed: int = 1234,
                  scales: Mapping[str, float] | None = None,
                  extra: Mapping[str, SteeringVector] | None = None) -> Path:
    """Write ``{name: layers}`` random vectors (``norm_scale * N(0, 1)`` per element, seeded,
    in ``specs`` order) under ``root/vectors`` and a registry naming them (with default
    ``scales``) plus any ``extra`` vectors; return the registry's path."""
    root = Path(root)
    vdir = root / "vectors"
    vdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lines = ["allowed_dirs: [vectors]", "vectors:"]
    vectors = {name: SteeringVector({i: norm_scale * torch.randn(hidden, generator=g)
                                     for i in layers}) for name, layers in specs.items()}
    vectors.update(extra or {})
    for name, vec in vectors.items():
        vec.save(vdir / f"{name}.safetensors")
        scale = (scales or {}).get(name)
        opt = f", scale: {scale}" if scale is not None else ""
        lines.append(f"  {name}: {{path: vectors/{name}.safetensors{opt}}}")
    reg = root / "registry.yaml"
    reg.write_text("\n".join(lines) + "\n")
    return reg


def write_test_vectors(root: str | Path, hidden: int = 576, num_layers: int = 30) -> Path:
    """The engine tests' vectors for the default model (``SMOLLM2_TEST_VECTORS`` and
    ``wide``, whose hidden size is wrong on purpose); returns the registry path."""
    g = torch.Generator().manual_seed(99)
    wide = SteeringVector({0: torch.randn(hidden + 8, generator=g)})
    specs = {k: [i for i in v if i < num_layers] for k, v in SMOLLM2_TEST_VECTORS.items()}
    return write_vectors(root, specs, hidden=hidden, scales={"v2": 2.0}, extra={"wide": wide})

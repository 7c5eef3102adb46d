"""Shared fixtures. Environment defaults are set at import, before vLLM is imported."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU backend
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Writable state (uploads, the vector store) of this test session, never the user's home.
os.environ.setdefault("VLLMSTEER_HOME", __import__("tempfile").mkdtemp(prefix="vllmsteer-home-"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The converted fp32 SmolLM2-135M-Instruct directory (converted once, then cached)."""
    from vllm_steer.default_model import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture()
def reg_file(tmp_path):
    """A registry file naming two tiny vectors (hidden 4): ``a`` (layer 1) and ``b``
    (scale 2), with ``vectors/`` as its allowed directory. No engine."""
    import torch

    from vllm_steer import SteeringVector

    vdir = tmp_path / "vectors"
    vdir.mkdir()
    for name in ("a", "b"):
        SteeringVector({1: torch.ones(4)}).save(str(vdir / f"{name}.safetensors"))
    path = tmp_path / "reg.yaml"
    path.write_text("allowed_dirs: [vectors]\nvectors:\n  a: vectors/a.safetensors\n"
                    "  b: {path: vectors/b.safetensors, scale: 2.0}\n")
    return path

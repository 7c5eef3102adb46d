"""Helpers shared by the engine tests: test vectors, a registry, the engine, and the HF
reference (full recompute with forward hooks, independent of the plugin's code)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vllm_steer import SteeringVector
from vllm_steer.hf_steering import steer_hf
from vllm_steer.llm_factory import shutdown  # noqa: F401  (re-exported for the tests)

THINK_START, THINK_END = "<think>", "</think>"


def write_test_vectors(root: Path, hidden: int = 576, num_layers: int = 30) -> Path:
    """Random vectors big enough to change greedy output, plus a registry; returns its path."""
    vdir = root / "vectors"
    vdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    for name, layers in (("v1", range(num_layers)), ("v2", range(5, 20)),
                         ("v3", range(0, num_layers, 3))):
        SteeringVector({i: 0.15 * torch.randn(hidden, generator=g) for i in layers}).save(
            vdir / f"{name}.safetensors")
    SteeringVector({0: torch.randn(hidden + 8, generator=g)}).save(vdir / "wide.safetensors")
    reg = root / "registry.yaml"
    reg.write_text(
        "allowed_dirs: [vectors]\n"
        "vectors:\n"
        "  v1: {path: vectors/v1.safetensors}\n"
        "  v2: {path: vectors/v2.safetensors, scale: 2.0}\n"
        "  v3: {path: vectors/v3.safetensors}\n"
        "  wide: {path: vectors/wide.safetensors}\n"
    )
    return reg


def make_llm(model_dir: str, **kw):
    from vllm import LLM

    opts = dict(model=model_dir, dtype="float32", gpu_memory_utilization=0.5, seed=0,
                enforce_eager=True, block_size=32, max_num_batched_tokens=256,
                max_model_len=2048)
    opts.update(kw)
    return LLM(**opts)


def composed_dense(registry_path: Path, vectors: list[tuple[str, float]],
                   num_layers: int = 30, hidden: int = 576) -> torch.Tensor:
    """``sum scale * v`` as float32 ``[num_layers, hidden]``, read straight from the files."""
    dense = torch.zeros(num_layers, hidden)
    for name, scale in vectors:
        v = SteeringVector.load(registry_path.parent / "vectors" / f"{name}.safetensors")
        for layer, d in v.directions.items():
            dense[layer] += scale * d
    return dense


def think_states(ids: list[int], start: list[int], end: list[int]) -> list[int]:
    """0/1/2 = none/think/answer after each token; markers matched on token ids."""
    out, s = [], 0
    for p in range(len(ids)):
        if ids[max(0, p + 1 - len(end)):p + 1] == end:
            s = 2
        elif ids[max(0, p + 1 - len(start)):p + 1] == start:
            s = 1
        out.append(s)
    return out


def position_mask(ids: list[int], mode: str, prompt_len: int, start: int = 0,
                  markers: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
    """bool ``[1, len(ids)]``: which positions the reference steers for ``mode``."""
    n = len(ids)
    pos = torch.arange(n)
    if mode == "all":
        m = torch.ones(n, dtype=torch.bool)
    elif mode == "prompt":
        m = pos < prompt_len
    elif mode == "generated":
        m = pos >= prompt_len
    else:
        states = think_states(ids, *markers)
        want = 1 if mode == "thinking" else 2
        m = torch.tensor([states[p] == want and p > 0 and states[p - 1] == want
                          for p in range(n)])
    return (m & (pos >= start))[None]


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], dense: torch.Tensor | None, mode: str,
              max_new: int, start: int = 0, markers=None) -> tuple[list[int], list[float]]:
    """Greedy continuation by full recompute each step; returns (tokens, their logprobs)."""
    ids = list(prompt_ids)
    out, lps = [], []
    for _ in range(max_new):
        x = torch.tensor([ids])
        if dense is None:
            logits = model(x).logits
        else:
            mask = position_mask(ids, mode, len(prompt_ids), start, markers)
            with steer_hf(model, dense, position_mask=mask):
                logits = model(x).logits
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        out.append(tok)
        lps.append(float(logp[tok]))
        ids.append(tok)
    return out, lps


def env_registry(path: Path) -> None:
    os.environ["VLLMSTEER_REGISTRY"] = str(path)

"""Helpers shared by the engine tests: test vectors, a registry, the engine, and the HF
reference (full recompute with forward hooks, independent of the plugin's code: the hooks
and the file reader are in tests/hf_reference.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests import hf_reference
from vllm_steer import SteeringVector
from vllm_steer.llm_factory import shutdown  # noqa: F401  (re-exported for the tests)

THINK_START, THINK_END = "<think>", "</think>"


def composed_dense(registry_path: Path, vectors: list[tuple[str, float]],
                   num_layers: int = 30, hidden: int = 576) -> torch.Tensor:
    """``sum scale * v`` as float32 ``[num_layers, hidden]``, read straight from the files
    (with ``safetensors``) in the registry's ``vectors/`` directory."""
    return hf_reference.composed_dense(registry_path.parent / "vectors", vectors, num_layers,
                                       hidden)


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
    """Greedy continuation; returns (tokens, their logprobs). Steered as a full recompute
    of every step would be (``hf_greedy_full``), computed with HF's KV cache: the prompt
    once, then one token per step. The same thing because every mask here is causal: a
    position's mask depends on the tokens up to it only, so it never changes when tokens
    are appended (the cached positions were computed with the mask they keep)."""
    ids = list(prompt_ids)
    out, lps = [], []
    feed, past = list(prompt_ids), None
    for _ in range(max_new):
        x = torch.tensor([feed])
        if dense is None:
            res = model(x, past_key_values=past, use_cache=True)
        else:
            mask = position_mask(ids, mode, len(prompt_ids), start, markers)[:, -len(feed):]
            with hf_reference.add_dense(model, dense, mask):
                res = model(x, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logp = torch.log_softmax(res.logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        out.append(tok)
        lps.append(float(logp[tok]))
        ids.append(tok)
        feed = [tok]
    return out, lps


@torch.no_grad()
def hf_greedy_full(model, prompt_ids: list[int], dense: torch.Tensor | None, mode: str,
                   max_new: int, start: int = 0, markers=None) -> tuple[list[int], list[float]]:
    """``hf_greedy`` by full recompute each step (no KV cache)."""
    ids = list(prompt_ids)
    out, lps = [], []
    for _ in range(max_new):
        x = torch.tensor([ids])
        if dense is None:
            logits = model(x).logits
        else:
            mask = position_mask(ids, mode, len(prompt_ids), start, markers)
            with hf_reference.add_dense(model, dense, mask):
                logits = model(x).logits
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        out.append(tok)
        lps.append(float(logp[tok]))
        ids.append(tok)
    return out, lps


def env_registry(path: Path) -> None:
    os.environ["VLLMSTEER_REGISTRY"] = str(path)


def upload_tiny(reg, name: str) -> Path:
    """A hidden-4 vector file in ``reg``'s upload dir (what an upload route would write)."""
    target = reg.ensure_upload_dir() / f"{name}.safetensors"
    SteeringVector({0: torch.zeros(4)}).save(str(target))
    return target

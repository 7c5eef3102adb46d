"""The self-check's HF reference: steering written from the README's formulas.

Deliberately independent of the code it checks: nothing here imports
``vllm_steer.steering``, ``vllm_steer.hf_steering`` or the vector file code. Directions
come in as tensors (the self-check writes the same tensors to the files the plugin
reads), the decoder blocks are found by their count, and the masks are computed from
token ids here.

For a steered token with residual stream ``h`` after decoder block ``i`` (layer ``i`` =
HF ``hidden_states[i + 1]``), in the README's order:

- ``ablate``: ``h <- h - strength * (h . r) r`` with ``r = v / |v|``;
- ``add``: ``h <- h + scale * v``.

Which tokens are steered (``apply_to``): ``all`` every position; ``thinking`` a token
that has the thinking section open before it and still open after it (single-token
markers here, so the markers themselves are never steered).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Op:
    """One vector of a request: ``kind`` ``add`` (``coef`` = scale) or ``ablate``
    (``coef`` = strength); ``directions``: layer -> float32 ``[hidden]``."""

    kind: str
    directions: dict[int, torch.Tensor]
    coef: float


@dataclass
class Reference:
    """What HF computes for one request: greedy ``tokens``, the log-softmax ``rows``
    (float64 ``[vocab]``) each was chosen from, the unsteered log-prob of each chosen
    token (``plain``), and ``prompt_logprobs[p]`` = log P(prompt[p] | prompt[:p]) for
    ``p >= 1`` (index 0 is None)."""

    tokens: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    steered_positions: int = 0


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the first ``ModuleList`` holding as many modules as the
    config has layers (``model.layers``, ``transformer.h``, ...)."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no list of {n} decoder blocks in {type(model).__name__}")


def steered_mask(ids: Sequence[int], apply_to: str, think: tuple[int, int]) -> torch.Tensor:
    """bool ``[len(ids)]``: the positions a request with ``apply_to`` steers."""
    if apply_to == "all":
        return torch.ones(len(ids), dtype=torch.bool)
    if apply_to != "thinking":
        raise ValueError(f"the self-check's reference knows 'all' and 'thinking', not "
                         f"{apply_to!r}")
    start, end = think
    out, open_before = [], False
    for t in ids:
        open_after = True if t == start else False if t == end else open_before
        out.append(open_before and open_after)
        open_before = open_after
    return torch.tensor(out, dtype=torch.bool)


@contextlib.contextmanager
def steered(model: nn.Module, ops: Sequence[Op], mask: torch.Tensor) -> Iterator[None]:
    """Forward hooks that apply ``ops`` to every block output at the positions in ``mask``
    (bool ``[seq]``; batch size 1)."""
    blocks = decoder_blocks(model)
    layers = sorted({i for op in ops for i in op.directions})

    def hook_for(layer: int):
        ablate = [(op.directions[layer].double(), op.coef) for op in ops
                  if op.kind == "ablate" and layer in op.directions]
        add = [(op.directions[layer].double(), op.coef) for op in ops
               if op.kind == "add" and layer in op.directions]

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            x = h[0].double()                                   # [seq, hidden]
            for v, strength in ablate:
                r = v / v.norm()
                x = x - strength * (x @ r)[:, None] * r
            for v, scale in add:
                x = x + scale * v
            m = mask.to(h.device)[:, None]
            new = torch.where(m, x.to(h.dtype), h[0])[None]
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _logsoftmax(model: nn.Module, ids: list[int], ops: Sequence[Op], apply_to: str,
                think: tuple[int, int]) -> tuple[torch.Tensor, int]:
    x = torch.tensor([ids])
    if not ops:
        return torch.log_softmax(model(x).logits[0].double(), -1), 0
    mask = steered_mask(ids, apply_to, think)
    with steered(model, ops, mask):
        logits = model(x).logits
    return torch.log_softmax(logits[0].double(), -1), int(mask.sum())


def reference(model: nn.Module, prompt: list[int], ops: Sequence[Op], apply_to: str,
              think: tuple[int, int], max_new: int) -> Reference:
    """Greedy continuation of ``prompt`` under ``ops`` by full recompute at every step
    (masks from the ids so far, so a marker the model writes takes effect causally)."""
    ref = Reference()
    logp, _ = _logsoftmax(model, prompt, ops, apply_to, think)
    ref.prompt_logprobs = [None] + [float(logp[p - 1, prompt[p]])
                                    for p in range(1, len(prompt))]
    ids = list(prompt)
    for _ in range(max_new):
        logp, ref.steered_positions = _logsoftmax(model, ids, ops, apply_to, think)
        row = logp[-1]
        tok = int(row.argmax())
        plain = (row if not ops else _logsoftmax(model, ids, (), apply_to, think)[0][-1])
        ref.tokens.append(tok)
        ref.rows.append(row)
        ref.plain.append(float(plain[tok]))
        ids.append(tok)
    return ref

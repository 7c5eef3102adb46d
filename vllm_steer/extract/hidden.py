"""Batched reading of each layer's hidden state at the last real token of each prompt.

Layer ``i`` is read as the output of decoder block ``i`` with a forward hook (the exact
tensor steering adds to; HF ``hidden_states[i + 1]``). Batches are padded on either
side; the last real token is found from the attention mask and the model is given
pad-aware ``position_ids`` (``cumsum(mask) - 1``), so left and right padding give the
same states up to float rounding. The forward stops after the deepest requested block,
so the LM head and later blocks are never run.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_steer.hf_steering import decoder_layers


class HiddenStateError(ValueError):
    """The model produced hidden states that cannot be used (e.g. NaN/inf)."""


class _StopForward(Exception):
    """Raised from the deepest hook to skip the rest of the forward."""


def _base_model(model: nn.Module) -> nn.Module:
    """The model without its LM head when HF exposes one (``model.base_model``)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def tokenize_prompts(
    tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each prompt (no padding, no truncation)."""
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} tokenizes to nothing: {prompts[i]!r}")
    return ids


def pad_batch(
    rows: Sequence[Sequence[int]], *, pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token rows to one length.

    Returns ``input_ids [b, t]``, ``attention_mask [b, t]``, ``position_ids [b, t]``
    (index within the row's own tokens, 0 on padding) and ``last [b]`` (column of each
    row's last real token).
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[b, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    last = width - 1 - mask.flip(-1).argmax(-1)  # last column whose mask is 1
    return ids, mask, position_ids, last


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0  # masked out anyway


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``rows``."""
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


def carriers(rows: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Map every row to a "carrier" row that starts with it (itself if none is longer).

    A causal model's state at a row's last token is also computed by any forward over a
    row that extends it, so only carriers need to run. Returns ``(order, carrier)``: the
    rows in lexicographic order (which groups shared prefixes) and ``carrier[k]`` per row.
    """
    order = sorted(range(len(rows)), key=lambda k: rows[k])
    carrier = list(range(len(rows)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:]), strict=True):
        ra, rb = rows[a], rows[b]
        # rows extending ``a`` sit right after it in lexicographic order
        if len(rb) >= len(ra) and rb[: len(ra)] == ra:
            carrier[a] = carrier[b]
    return order, carrier


@torch.inference_mode()
def read_last_token(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    add_special_tokens: bool = True,
    padding_side: str | None = None,
    share_prefix: bool = True,
    min_shared: int = 4,
    progress: bool = True,
    desc: str = "hidden states",
) -> dict[int, torch.Tensor]:
    """``{layer: float32 [len(prompts), hidden]}``: block outputs at each prompt's last token.

    ``padding_side`` defaults to the tokenizer's. With ``share_prefix`` (exact for causal
    models, equal to the plain path up to float rounding):

    * a prompt whose tokens begin another prompt's is read from that prompt's forward
      (expanded suffixes are prefixes of each other), and
    * a batch whose prompts share at least ``min_shared`` leading tokens runs that prefix
      once (batch 1, KV cache) and only the differing tails in the batch.

    Shared-prefix tails are always right-padded; ``padding_side`` applies to batches run
    in full. Without ``share_prefix`` every prompt runs in full, batched by length.
    Raises ``HiddenStateError`` naming the layer if a state is NaN/inf, and ``ValueError``
    for bad arguments.
    """
    if not prompts:
        raise ValueError("no prompts to run")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = decoder_layers(model)
    layers = sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad or not layers:
        raise ValueError(
            f"layers {bad or '[]'} out of range for a model with {len(blocks)} layers "
            f"(valid: 0..{len(blocks) - 1})"
        )
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    rows = tokenize_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    if share_prefix:
        order, carrier = carriers(rows)
    else:
        order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
        carrier = list(range(len(rows)))
    reads: dict[int, list[int]] = {}  # carrier -> prompts read from its forward
    for k in order:
        reads.setdefault(carrier[k], []).append(k)
    runs = [c for c in order if c in reads and carrier[c] == c]  # carriers, sorted

    pad_id = _pad_id(tokenizer)
    base = _base_model(model)
    params = inspect.signature(base.forward).parameters
    accepts_pos, accepts_cache = "position_ids" in params, "past_key_values" in params
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    out: dict[int, torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor | None] = {"b": None, "t": None}
    deepest = layers[-1]

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if state["b"] is not None:  # None during a prefix pass
                h = output[0] if isinstance(output, tuple | list) else output
                captured[layer] = h[state["b"].to(h.device), state["t"].to(h.device)].float().cpu()
            if layer == deepest:
                raise _StopForward

        return hook

    def forward(**kwargs) -> None:
        if not accepts_pos:
            kwargs.pop("position_ids")
        try:
            base(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in kwargs.items()})
        except _StopForward:
            pass

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in layers]
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="prompt")
    try:
        for start in range(0, len(runs), batch_size):
            batch_ids = runs[start : start + batch_size]
            batch = [rows[c] for c in batch_ids]
            read_k = [k for c in batch_ids for k in reads[c]]
            read_b = [b for b, c in enumerate(batch_ids) for _ in reads[c]]
            read_col = [len(rows[k]) - 1 for k in read_k]  # column within the full row
            shared = 0
            if share_prefix and accepts_cache:
                # every read position must lie in the tail that the batch pass computes
                shared = min(_common_prefix_len(batch), min(read_col))
                if shared < min_shared:
                    shared = 0
            captured.clear()
            state["b"] = state["t"] = None
            cache = None
            if shared:
                from transformers import DynamicCache

                cache = DynamicCache(config=getattr(model, "config", None))
                prefix = torch.tensor([batch[0][:shared]], dtype=torch.long)
                forward(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                        position_ids=torch.arange(shared)[None], past_key_values=cache,
                        use_cache=True)
                cache.batch_repeat_interleave(len(batch))
            tails = [r[shared:] for r in batch]
            # After a shared prefix, tails are always right-padded: left padding would put
            # pads between prefix and tail (harmless with the mask, except under sliding-
            # window attention, which counts columns).
            tail_side = "right" if shared else side
            ids, mask, pos, _ = pad_batch(tails, pad_id=pad_id, side=tail_side)
            width = ids.shape[1]
            offset = [width - len(t) if tail_side == "left" else 0 for t in tails]
            state["b"] = torch.tensor(read_b)
            state["t"] = torch.tensor([offset[b] + col - shared
                                       for b, col in zip(read_b, read_col, strict=True)])
            if shared:
                mask = torch.cat([torch.ones(len(batch), shared, dtype=torch.long), mask], 1)
                forward(input_ids=ids, attention_mask=mask, position_ids=pos + shared,
                        past_key_values=cache, use_cache=True)
            else:
                forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            for layer in layers:
                h = captured[layer]
                if not bool(torch.isfinite(h).all()):
                    bad_row = read_k[int((~torch.isfinite(h)).any(-1).nonzero()[0, 0])]
                    raise HiddenStateError(
                        f"layer {layer} produced non-finite hidden states (NaN/inf) for prompt "
                        f"{bad_row}: {prompts[bad_row][:200]!r}; try float32 instead of a "
                        "half-precision dtype"
                    )
                if layer not in out:
                    out[layer] = torch.empty(len(rows), h.shape[-1], dtype=torch.float32)
                out[layer][torch.tensor(read_k)] = h
            bar.update(len(read_k))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    return out

"""Independent HF reference for answer-probe readings: full forwards over the fork's
context + each choice variant's tokens, with forward-hook steering (``tests.hf_reference``).
Nothing here calls ``vllm_steer.probe``: the variant rule and the fork context are
rebuilt from their documented definitions."""

from __future__ import annotations

import functools
import math

import torch

from tests.hf_reference import add_dense
from tests.steer_helpers import think_states

LEADING = " \t\n\r\"'`“”‘’«»*_(["


def _key(text: str) -> str:
    return text.lstrip(LEADING).rstrip().casefold()


@functools.lru_cache(maxsize=4)
def _vocab(tok) -> tuple[str, ...]:
    return tuple(_key(tok.decode([i])) for i in range(len(tok)))


def reference_variants(tok, choice: str) -> list[tuple[int, ...]]:
    """Documented rule: every single token that reads as the choice, plus the multi-token
    spellings: with and without a leading space, as written (choices with single-token
    variants) or as written / lower / upper / each word capitalised (the others)."""
    single = {(i,) for i, k in enumerate(_vocab(tok)) if k == _key(choice)}
    w = choice.strip()
    forms = {w} if single else {w, w.lower(), w.upper(),
                                " ".join(x[:1].upper() + x[1:] for x in w.split(" "))}
    multi = {tuple(tok.encode(p + f, add_special_tokens=False)) for p in ("", " ")
             for f in forms}
    return sorted(single | {s for s in multi if len(s) > 1})


def fork_context(tok, prompt_ids: list[int], generated: list[int], t: int, suffix: str,
                 think=("<think>", "</think>")) -> list[int]:
    """prompt + generated[:t] + the think-end marker if the section is open + suffix."""
    ts, te = (tok.encode(m, add_special_tokens=False) for m in think)
    ids = list(prompt_ids) + list(generated[:t])
    if think_states(ids, ts, te)[-1] == 1:
        ids += te
    return ids + tok.encode(suffix, add_special_tokens=False)


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


@torch.no_grad()
def hf_choice_logprobs(model, ctx: list[int], variants: dict[str, list[tuple[int, ...]]],
                       dense: torch.Tensor | None = None, start: int = 0,
                       end: int | None = None) -> dict[str, float]:
    """``{choice: log P(choice | ctx)}``: for each variant the sum of its tokens'
    conditional log-probs after ``ctx``, then logsumexp over the choice's variants.
    ``dense`` steers positions ``start <= pos < end``.

    One forward over ``ctx`` (its KV cache kept), then one over every variant's tokens
    at once (a right-padded batch reading that cache at positions ``len(ctx)`` on): what
    a full forward over ctx + variant per variant computes, without recomputing the
    shared context for each (``hf_choice_logprobs_full``, the plain form, agrees)."""
    rows = [(c, v) for c, vs in variants.items() for v in vs]
    width = max(len(v) for _, v in rows)
    n = len(ctx) + width
    pos = torch.arange(n)
    steered = (pos >= start) & (pos < (end if end is not None else n))

    def forward(mask: torch.Tensor, **kw):
        if dense is None:
            return model(**kw)
        with add_dense(model, dense, mask):
            return model(**kw)

    ids = torch.tensor([list(ctx)])
    head = forward(steered[None, :len(ctx)], input_ids=ids, attention_mask=torch.ones_like(ids),
                   use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(head.logits[0, -1].float(), -1)  # the first choice token
    per: dict[str, list[float]] = {}
    later = None
    if width > 1:
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(rows))
        tail = torch.zeros(len(rows), width, dtype=torch.long)
        att = torch.zeros(len(rows), n, dtype=torch.long)
        att[:, :len(ctx)] = 1
        for b, (_, v) in enumerate(rows):
            tail[b, :len(v)] = torch.tensor(v)
            att[b, len(ctx):len(ctx) + len(v)] = 1
        out = forward(steered[None, len(ctx):].expand(len(rows), width), input_ids=tail,
                      attention_mask=att, past_key_values=cache,
                      position_ids=pos[None, len(ctx):].expand(len(rows), width))
        later = torch.log_softmax(out.logits.float(), -1)   # [rows, width, vocab]
    for b, (c, v) in enumerate(rows):
        lp = float(first[v[0]]) + sum(float(later[b, j - 1, v[j]]) for j in range(1, len(v)))
        per.setdefault(c, []).append(lp)
    return {c: _lse(xs) for c, xs in per.items()}


@torch.no_grad()
def hf_choice_logprobs_full(model, ctx: list[int], variants: dict[str, list[tuple[int, ...]]],
                            dense: torch.Tensor | None = None, start: int = 0,
                            end: int | None = None) -> dict[str, float]:
    """``hf_choice_logprobs`` the plain way: for each variant one full forward over ctx +
    variant (a right-padded batch), no KV cache."""
    rows = [(c, v) for c, vs in variants.items() for v in vs]
    n = len(ctx) + max(len(v) for _, v in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    att = torch.zeros(len(rows), n, dtype=torch.long)
    for b, (_, v) in enumerate(rows):
        seq = list(ctx) + list(v)
        ids[b, :len(seq)] = torch.tensor(seq)
        att[b, :len(seq)] = 1
    # logits only at positions len(ctx) - 1 .. n - 1 (where the choice tokens are read)
    keep = n - len(ctx) + 1
    if dense is None:
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
    else:
        pos = torch.arange(n)
        mask = (pos >= start) & (pos < (end if end is not None else n))
        with add_dense(model, dense, mask[None].expand(len(rows), n)):
            logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
    assert logits.shape[1] == keep, logits.shape
    logp = torch.log_softmax(logits.float(), -1)    # [rows, keep, vocab]: position - (n - keep)
    per: dict[str, list[float]] = {}
    for b, (c, v) in enumerate(rows):
        lp = sum(float(logp[b, j, t]) for j, t in enumerate(v))
        per.setdefault(c, []).append(lp)
    return {c: _lse(xs) for c, xs in per.items()}


def threshold_between(values) -> float:
    """A threshold halfway across the widest gap between two of ``values`` in their middle
    half: far from every value, so reading noise cannot move what crosses it."""
    v = sorted(set(values))
    lo = max(range(len(v) // 4, max(3 * len(v) // 4, len(v) // 4 + 1)),
             key=lambda i: v[i + 1] - v[i] if i + 1 < len(v) else -1.0)
    return (v[lo] + v[lo + 1]) / 2

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
    """``{choice: log P(choice | ctx)}``: for each variant one full forward over ctx +
    variant (a right-padded batch), the sum of its tokens' conditional log-probs, then
    logsumexp over the choice's variants. ``dense`` steers positions ``start <= pos < end``."""
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

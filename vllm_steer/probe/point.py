"""One probe point: its fork requests, round by round, and the reading folded from them.

A point is a fork of a sequence (``prompt + generated[:t]``, plus the think-end marker
when the thinking section is open, plus the forcing suffix: its *base*). It is read in
up to three rounds, each a list of ``(prompt, SamplingParams)`` requests:

1. ``forks``: the *head* fork (the base, ``max_tokens=1``, ``logprob_token_ids`` = the
   first token of every variant: for single-token choices the whole reading) and, for
   multi-token choices, one fork per *read context*: each distinct variant minus its last
   token (``" 20"`` = ``' ', '2', '0'`` is read on base + ``' 2'``). A read-context fork
   reads every last token that follows its context with ``logprob_token_ids`` (all at
   once) and the tokens of its own context through prompt log-probs (only where it has
   two or more tokens; prompt log-probs turn prefix-cache reads off in vLLM by default,
   forks turn them back on). All forks of a point are submitted together: when the base
   ends on a KV block (``align`` ``"base"``) the first one scheduled computes it and the
   others find it in the cache, in the same engine step (vLLM caches a block when it is
   allocated);
2. ``gaps``: vLLM computes prompt log-probs only for the tokens it computes, so a choice
   token whose row a fork took from the prefix cache has none; if no other fork computed
   that (context, token) it is read at the last position of a request ending with the
   context. Usually empty;
3. ``top``: a low-mass reading is re-asked with ``logprobs=k`` for its top tokens.

``PointReader`` builds and reads the rounds (shared by ``ProbeJob``, which batches a
round over all points of a job, and by live probes, which run each point as its sequence
grows); ``PointRun`` steps one point through its rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.reading import Reading, make_reading
from vllm_steer.thinking import markers_for


def think_marker_ids(tokenizer: Any, start: str | None, end: str | None,
                     field_prefix: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Token ids of the thinking section's start and end markers (``None``: the
    tokenizer's own, ``thinking.markers_for``); a marker that tokenizes to nothing is a
    ``ProbeError`` naming ``<field_prefix>think_start`` / ``think_end``."""
    default_start, default_end = markers_for(tokenizer)
    ts = tuple(tokenizer.encode(start or default_start, add_special_tokens=False))
    te = tuple(tokenizer.encode(end or default_end, add_special_tokens=False))
    if not ts:
        raise ProbeError(f"{field_prefix}think_start", "tokenizes to nothing")
    if not te:
        raise ProbeError(f"{field_prefix}think_end", "tokenizes to nothing")
    return ts, te

ROUNDS = ("forks", "gaps", "top")
Request = tuple[dict[str, Any], Any]


@dataclass
class ProbePoint:
    """One fork point of one trajectory: its base ids, steering, and the conditional
    log-probs read so far (``table[context][token]``, context = choice tokens after the
    base)."""

    traj: int
    token_index: int
    in_thinking: bool
    base: list[int]
    spec: dict[str, Any] | None
    table: dict[tuple[int, ...], dict[int, float]] = field(default_factory=dict)
    requests: int = 0
    computed_tokens: int = 0
    head_cached: int = 0
    reading: Reading | None = None
    trigger: str = "every"
    marker: str | None = None
    trigger_index: int | None = None
    cache_salt: str | None = None


class PointReader:
    """Requests and readings of probe points for one choice set and config.

    ``fork_single_tokens=True`` reads single-token variants on their own forks through
    prompt log-probs too (a fork of base + the token each), to check that both paths
    agree. Each ``*_requests`` method returns ``(requests, tags)``; the matching
    ``take_*`` gets the tags back with the ``RequestOutput``s, in the same order.
    """

    def __init__(self, tokenizer: Any, choices: ChoiceSet, cfg: ProbeConfig,
                 fork_single_tokens: bool = False) -> None:
        self.tok, self.choices, self.cfg = tokenizer, choices, cfg
        needed: dict[tuple[int, ...], set[int]] = {}
        for vs in choices.variants:
            for v in vs:
                if len(v) > 1:
                    needed.setdefault(tuple(v[:-1]), set()).add(v[-1])
        #: ``(context, last tokens read at its end)`` per read-context fork
        self.paths: list[tuple[tuple[int, ...], list[int]]] = [
            (ctx, sorted(ids)) for ctx, ids in sorted(needed.items())]
        if fork_single_tokens:   # base + the token, read at its last prompt position
            self.paths += [((v[0],), []) for vs in choices.variants for v in vs
                           if len(v) == 1]

    @staticmethod
    def _extra(pt: ProbePoint) -> dict[str, Any] | None:
        return {"steering": pt.spec} if pt.spec else None

    @staticmethod
    def _prompt(pt: ProbePoint, ids: list[int]) -> dict[str, Any]:
        p: dict[str, Any] = {"prompt_token_ids": ids}
        if pt.cache_salt is not None:   # the sequence's own salt: forks share its blocks
            p["cache_salt"] = pt.cache_salt
        return p

    @staticmethod
    def _count(pt: ProbePoint, out: Any) -> int:
        cached = int(out.num_cached_tokens or 0)
        pt.requests += 1
        pt.computed_tokens += len(out.prompt_token_ids) - cached
        return cached

    # -- 1. forks --------------------------------------------------------------------
    def fork_requests(self, pt: ProbePoint) -> tuple[list[Request], list[Any]]:
        from vllm import SamplingParams

        extra = self._extra(pt)
        reqs = [(self._prompt(pt, pt.base),
                 SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                logprob_token_ids=self.choices.head_ids, extra_args=extra))]
        tags: list[Any] = [None]
        for ctx, last in self.paths:
            tags.append((ctx, last))
            # prompt log-probs only where the context's own tokens are read (two or more,
            # or a single-token variant read on its own fork); skip_reading_prefix_cache:
            # vLLM's default for prompt log-probs is True, which would recompute the whole
            # prefix for every fork.
            lp = dict(prompt_logprobs=0, skip_reading_prefix_cache=False) \
                if len(ctx) > 1 or not last else {}
            ids = dict(logprob_token_ids=last) if last else {}
            reqs.append((self._prompt(pt, pt.base + list(ctx)),
                         SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                        extra_args=extra, **lp, **ids)))
        return reqs, tags

    def take_forks(self, pt: ProbePoint, tags: Sequence[Any], outputs: Sequence[Any]) -> None:
        pairs = list(zip(tags, outputs, strict=True))
        # Read-context forks first: their rows are the multi-token path's own reading; the
        # head fills first tokens no fork computed (and all of single-token choices).
        n = len(pt.base)
        for tag, out in pairs:
            if tag is None:
                continue
            ctx, last = tag
            cached = self._count(pt, out)
            rows = out.prompt_logprobs
            if rows is not None:
                for j, tid in enumerate(ctx):
                    # prompt_logprobs[n + j] is read from the hidden state at n + j - 1;
                    # positions below ``cached`` came from the prefix cache (not computed).
                    if n + j - 1 >= cached:
                        pt.table.setdefault(tuple(ctx[:j]), {})[tid] = rows[n + j][tid].logprob
            if last:
                lp = out.outputs[0].logprobs[0]
                row = pt.table.setdefault(tuple(ctx), {})
                for tid in last:
                    if tid not in lp:
                        raise RuntimeError(f"engine returned no logprob for token {tid}")
                    row[tid] = lp[tid].logprob
        for tag, out in pairs:
            if tag is not None:
                continue
            pt.head_cached = self._count(pt, out)
            lp = out.outputs[0].logprobs[0]
            row = pt.table.setdefault((), {})
            for tid in self.choices.head_ids:
                if tid not in lp:
                    raise RuntimeError(f"engine returned no logprob for token {tid}")
                row.setdefault(tid, lp[tid].logprob)

    # -- 2. rows no fork computed ----------------------------------------------------
    def missing(self, pt: ProbePoint) -> dict[tuple[int, ...], list[int]]:
        out: dict[tuple[int, ...], set[int]] = {}
        for vs in self.choices.variants:
            for v in vs:
                for j, tid in enumerate(v):
                    ctx = tuple(v[:j])
                    if tid not in pt.table.get(ctx, {}):
                        out.setdefault(ctx, set()).add(tid)
        return {ctx: sorted(ids) for ctx, ids in out.items()}

    def gap_requests(self, pt: ProbePoint) -> tuple[list[Request], list[Any]]:
        from vllm import SamplingParams

        reqs, tags = [], []
        for ctx, ids in self.missing(pt).items():
            tags.append((ctx, ids))
            reqs.append((self._prompt(pt, pt.base + list(ctx)),
                         SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                        logprob_token_ids=ids, extra_args=self._extra(pt))))
        return reqs, tags

    def take_gaps(self, pt: ProbePoint, tags: Sequence[Any], outputs: Sequence[Any]) -> None:
        for (ctx, ids), out in zip(tags, outputs, strict=True):
            self._count(pt, out)
            lp = out.outputs[0].logprobs[0]
            row = pt.table.setdefault(ctx, {})
            for tid in ids:
                row[tid] = lp[tid].logprob

    def finish(self, pt: ProbePoint) -> Reading:
        """Fold the point's table into its reading (every needed row must be there)."""
        if self.missing(pt):
            raise RuntimeError(f"probe point {pt.token_index}: log-probs still missing")
        lps = [[sum(pt.table[tuple(v[:j])][tid] for j, tid in enumerate(v)) for v in vs]
               for vs in self.choices.variants]
        pt.reading = make_reading(
            self.choices.choices, lps, token_index=pt.token_index,
            in_thinking=pt.in_thinking, min_mass=self.cfg.min_mass,
            cached_tokens=pt.head_cached, requests=pt.requests,
            computed_tokens=pt.computed_tokens, trigger=pt.trigger, marker=pt.marker,
            trigger_index=pt.trigger_index)
        return pt.reading

    # -- 3. top tokens of a flagged reading ------------------------------------------
    def flagged(self, pt: ProbePoint) -> bool:
        return self.cfg.top_k_flagged > 0 and pt.reading is not None and pt.reading.low_mass

    def top_requests(self, pt: ProbePoint) -> tuple[list[Request], list[Any]]:
        from vllm import SamplingParams

        if not self.flagged(pt):
            return [], []
        return [(self._prompt(pt, pt.base),
                 SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.top_k_flagged,
                                extra_args=self._extra(pt)))], [None]

    def take_top(self, pt: ProbePoint, tags: Sequence[Any], outputs: Sequence[Any]) -> None:
        for _, out in zip(tags, outputs, strict=True):
            lp = out.outputs[0].logprobs[0]
            best = sorted(lp.items(), key=lambda kv: -kv[1].logprob)[: self.cfg.top_k_flagged]
            pt.reading.top_tokens = [(self.tok.decode([tid]), round(v.logprob, 4))
                                     for tid, v in best]

    # -- by round name ---------------------------------------------------------------
    def requests(self, rnd: str, pt: ProbePoint) -> tuple[list[Request], list[Any]]:
        return {"forks": self.fork_requests, "gaps": self.gap_requests,
                "top": self.top_requests}[rnd](pt)

    def take(self, rnd: str, pt: ProbePoint, tags: Sequence[Any],
             outputs: Sequence[Any]) -> None:
        {"forks": self.take_forks, "gaps": self.take_gaps, "top": self.take_top}[rnd](
            pt, tags, outputs)
        if rnd == "gaps":
            self.finish(pt)


class PointRun:
    """One point stepped through its rounds: ``requests()`` is the next non-empty round's
    requests (``[]`` once the reading is complete); ``take(outputs)`` reads them."""

    def __init__(self, reader: PointReader, pt: ProbePoint) -> None:
        self.reader, self.pt = reader, pt
        self._round = 0
        self._tags: list[Any] = []

    @property
    def done(self) -> bool:
        return self._round >= len(ROUNDS)

    def requests(self) -> list[Request]:
        while not self.done:
            rnd = ROUNDS[self._round]
            reqs, self._tags = self.reader.requests(rnd, self.pt)
            if reqs:
                return reqs
            self.reader.take(rnd, self.pt, [], [])   # an empty round (no gaps, not flagged)
            self._round += 1
        return []

    def take(self, outputs: Sequence[Any]) -> None:
        self.reader.take(ROUNDS[self._round], self.pt, self._tags, outputs)
        self._round += 1

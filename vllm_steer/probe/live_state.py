"""Live probes: readings of a served request, from forks of its sequence as it grows.

Engine-agnostic (no vLLM here): a driver (``live_drivers``: ``vllm.LLM``'s step loop, an
async ``EngineClient``, the OpenAI server) feeds each choice's tokens to a
``LiveSequence``, submits the ``PointRun`` rounds it hands out, and gives readings back in
token order; ``StopRule`` decides early exit.

Fork points are the offline probe's: the candidates of ``triggers.PointPlanner`` (index
0, every ``every`` tokens or each reasoning step, the end), placed by
``forks.place_point`` (moved back out of a marker they would cut; optionally onto a
KV-block boundary). Live, a candidate is decided once the tokens after it cannot change
it (``len(longest thinking marker) - 1`` tokens for the marker rule, and the planner's
own text horizon for steps) or the sequence has ended, so live and offline forks of one
trajectory are the same requests.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.config import ProbeConfig, check_bool, check_int, check_number
from vllm_steer.probe.forks import align_mode, fork_spec, place_point
from vllm_steer.probe.point import PointReader, PointRun, ProbePoint, think_marker_ids
from vllm_steer.probe.reading import Reading
from vllm_steer.probe.triggers import Candidate, PointPlanner
from vllm_steer.steering.think_tracker import THINK, ThinkTracker

#: ``ProbeConfig`` fields a live probe takes; the others shape an offline trajectory and
#: come from the request itself (its max_tokens, temperature, seed, ignore_eos).
LIVE_FIELDS = ("choices", "every", "suffix", "min_mass", "think_start", "think_end",
               "steer_suffix", "top_k_flagged", "trigger", "markers", "min_spacing", "align")
#: Why a request stopped early (``stop_reason`` of the choice, with ``finish_reason`` stop).
SETTLED = "vllm_steer:probe_settled"


@dataclass
class StopWhen:
    """Early exit: stop once ``consecutive`` readings in a row (token order) give
    ``choice`` (None: whichever choice leads) a normalized probability of at least
    ``threshold``, each with ``mass >= min_mass`` (None: the probe's ``min_mass``) and taken
    after at least ``min_thinking_tokens`` generated tokens inside the thinking section.
    ``complete``: append the answer to the output (think-end marker if the section is
    open at the reading, the suffix, then the settled choice's likeliest variant)."""

    threshold: float = 0.9
    consecutive: int = 2
    choice: str | None = None
    min_mass: float | None = None
    min_thinking_tokens: int = 0
    complete: bool = False

    def validate(self, choices: list[str], prefix: str) -> None:
        """Check every field against the probe's ``choices``; errors name ``prefix`` + field."""
        try:
            check_number(self.threshold, "threshold", 0.0, 1.0)
            check_int(self.consecutive, "consecutive", 1, 1000)
            if self.choice is not None and self.choice not in choices:
                raise ProbeError("choice", f"{self.choice!r} is not one of the choices "
                                 f"{choices}")
            if self.min_mass is not None:
                check_number(self.min_mass, "min_mass", 0.0, 1.0)
            check_int(self.min_thinking_tokens, "min_thinking_tokens", 0)
            check_bool(self.complete, "complete")
        except ProbeError as e:
            raise ProbeError(prefix + e.field, str(e).split(": ", 1)[1]) from None


@dataclass
class LiveProbeConfig:
    """A request's ``probe`` field: ``probe`` (the ``LIVE_FIELDS`` of ``ProbeConfig``)
    and an optional ``stop_when``."""

    probe: ProbeConfig
    stop_when: StopWhen | None = None

    @classmethod
    def parse(cls, value: Any, prefix: str = "probe.") -> LiveProbeConfig:
        """From a JSON object (or its string); every error names the field (``prefix`` +
        name). Unknown fields and offline-only fields are errors."""
        name = prefix.rstrip(".")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise ProbeError(name, "malformed JSON") from None
        if not isinstance(value, dict):
            raise ProbeError(name, "must be an object")
        known = (*LIVE_FIELDS, "stop_when")
        for k in value:
            if k in {f.name for f in fields(ProbeConfig)} and k not in LIVE_FIELDS:
                raise ProbeError(prefix + str(k), "not a live-probe field: the request's own "
                                 "max_tokens, temperature, seed and ignore_eos apply")
            if k not in known:
                raise ProbeError(prefix + str(k), f"unknown field (known: {', '.join(known)})")
        cfg = ProbeConfig.from_dict({k: v for k, v in value.items() if k != "stop_when"},
                                    prefix=prefix)
        if cfg.suffix is None:
            raise ProbeError(prefix + "suffix", "a live probe needs a forcing suffix")
        stop = None
        raw = value.get("stop_when")
        if raw is not None:
            if not isinstance(raw, dict):
                raise ProbeError(prefix + "stop_when", "must be an object or null")
            sw = {f.name for f in fields(StopWhen)}
            unknown = sorted(str(k) for k in raw if k not in sw)
            if unknown:
                raise ProbeError(f"{prefix}stop_when.{unknown[0]}",
                                 f"unknown field (known: {', '.join(sorted(sw))})")
            stop = StopWhen(**raw)
            stop.validate(list(cfg.choices), prefix + "stop_when.")
        return cls(cfg, stop)

    def to_json(self) -> dict[str, Any]:
        """The live-probe fields and ``stop_when`` as a JSON-ready dict."""
        d = {k: getattr(self.probe, k) for k in LIVE_FIELDS}
        d["stop_when"] = None if self.stop_when is None else {
            f.name: getattr(self.stop_when, f.name) for f in fields(StopWhen)}
        return d


@functools.lru_cache(maxsize=64)
def _choice_set(tokenizer: Any, choices: tuple[str, ...]) -> ChoiceSet:
    # Building a choice set scans the vocabulary (~50 ms): once per tokenizer and choices.
    return ChoiceSet.build(tokenizer, list(choices))


class LiveProbe:
    """What every sequence probed with one config shares: the reader, suffix and markers.
    Building it checks the config against the tokenizer (choices, suffix, markers).
    ``block_size``: the engine's KV block size (needed when ``align`` is not ``"none"``)."""

    def __init__(self, tokenizer: Any, cfg: LiveProbeConfig,
                 block_size: int | None = None) -> None:
        p = cfg.probe
        self.cfg, self.tok = cfg, tokenizer
        self.choices = _choice_set(tokenizer, tuple(p.choices))
        self.reader = PointReader(tokenizer, self.choices, p)
        self.suffix_ids = tokenizer.encode(p.suffix, add_special_tokens=False)
        if not self.suffix_ids:
            raise ProbeError("probe.suffix", f"{p.suffix!r} tokenizes to nothing")
        self.ts, self.te = think_marker_ids(tokenizer, p.think_start, p.think_end, "probe.")
        self.lookahead = max(len(self.ts), len(self.te)) - 1
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.align = align_mode(p.align, any(self.choices.multi_token))
        if self.align != "none" and not block_size:
            raise ProbeError("probe.align", "needs the engine's KV block size")
        self.block_size = block_size

    def planner(self, prompt_ids: list[int]) -> PointPlanner:
        p = self.cfg.probe
        return PointPlanner(p.trigger, p.every, p.markers, p.min_spacing, self.tok,
                            prompt_ids, lookahead=self.lookahead)

    def extra_tokens(self) -> int:
        """Tokens a fork adds past the sequence, and the one it generates."""
        return len(self.te) + len(self.suffix_ids) + self.choices.max_len + 1

    def sequence(self, prompt_ids: list[int], index: int = 0,
                 steering: dict[str, Any] | str | None = None,
                 cache_salt: str | None = None) -> LiveSequence:
        """A choice's sequence; ``steering``: the request's spec (forks replay it);
        ``cache_salt``: the request's (forks carry it, to share its blocks)."""
        return LiveSequence(self, list(prompt_ids), index, steering, cache_salt)


@dataclass
class LiveSequence:
    """One choice (``index``) of a probed request: its tokens so far, the points decided,
    and the readings delivered (in token order)."""

    probe: LiveProbe
    prompt_ids: list[int]
    index: int = 0
    steering: dict[str, Any] | str | None = None
    cache_salt: str | None = None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    decided: set[int] = field(default_factory=set)
    points: dict[int, ProbePoint] = field(default_factory=dict)
    delivered: int = 0   # readings handed out, in token order
    _order: list[int] = field(default_factory=list)
    _planner: PointPlanner | None = None
    _fed: int = 0   # tokens given to the planner
    _tracker: ThinkTracker | None = None
    _states: list[int] = field(default_factory=list)

    def _state(self, i: int) -> int:
        """Thinking state after ``prompt + tokens[:i]`` (incremental, causal)."""
        if self._tracker is None:
            self._tracker = ThinkTracker(self.probe.ts, self.probe.te)
        if len(self._states) <= i:
            arr = np.asarray(self.prompt_ids + self.tokens, dtype=np.int64)
            n0 = len(self.prompt_ids)
            for j in range(len(self._states), i + 1):
                self._states.append(self._tracker.advance(arr, n0 + j))
        return self._states[i]

    def thinking_tokens(self, upto: int) -> int:
        """Generated tokens before ``upto`` that were inside the thinking section."""
        upto = min(upto, len(self.tokens))
        return sum(1 for i in range(upto) if self._state(i) == THINK and self._state(i + 1)
                   == THINK)

    def extend(self, new_ids: list[int], finished: bool = False) -> list[PointRun]:
        """Add generated tokens; the runs of the points this decides (in token order)."""
        self.tokens += list(new_ids)
        if finished:
            self.finished = True
            if self.tokens and self.tokens[-1] == self.probe.eos:
                self.tokens.pop()   # a fork after the end-of-sequence token means nothing
        return self._decide()

    def _decide(self) -> list[PointRun]:
        if self._planner is None:
            self._planner = self.probe.planner(self.prompt_ids)
        if self._fed < len(self.tokens):
            self._planner.feed(self.tokens[self._fed:])
            self._fed = len(self.tokens)
        if self.finished and not self._planner.finished:
            self._planner.close()
        cands = self._planner.take()
        if not cands:
            return []
        seq = self.prompt_ids + self.tokens
        markers = (self.probe.ts, self.probe.te)
        n0 = len(self.prompt_ids)
        runs = []
        for c in cands:
            p = place_point(seq, n0, c, markers, self.probe.align, self.probe.block_size,
                            self._tail)
            if p in self.decided:
                continue
            self.decided.add(p)
            runs.append(PointRun(self.probe.reader, self._point(p, c)))
        self._order = sorted(self.decided)
        return runs

    def _tail(self, i: int) -> int:
        return (len(self.probe.te) if self._state(i) == THINK else 0) \
            + len(self.probe.suffix_ids)

    def _point(self, p: int, cand: Candidate | None = None) -> ProbePoint:
        thinking = self._state(p) == THINK
        n0 = len(self.prompt_ids)
        base = self.prompt_ids + self.tokens[:p] + (list(self.probe.te) if thinking else []) \
            + self.probe.suffix_ids
        spec = fork_spec(self.steering, n0, p, self.probe.cfg.probe.steer_suffix)
        cand = cand or Candidate(p, "every")
        return ProbePoint(self.index, p, thinking, base, spec, trigger=cand.kind,
                          marker=cand.marker, trigger_index=cand.index,
                          cache_salt=self.cache_salt)

    def add(self, pt: ProbePoint) -> list[ProbePoint]:
        """Record a point whose reading is complete; the points now deliverable in token
        order (every earlier decided point read)."""
        self.points[pt.token_index] = pt
        out = []
        while self.delivered < len(self._order) and \
                self._order[self.delivered] in self.points:
            out.append(self.points[self._order[self.delivered]])
            self.delivered += 1
        return out

    @property
    def complete(self) -> bool:
        """Finished and every decided point delivered."""
        return self.finished and self.delivered == len(self._order)

    def answer_tokens(self, pt: ProbePoint, choice: str) -> list[int]:
        """What ``StopWhen.complete`` appends after the output: the think-end marker when
        the section was open at the point, the suffix, and ``choice``'s likeliest variant
        (by its tokens' log-probs at the point)."""
        k = self.probe.choices.choices.index(choice)
        best = max(self.probe.choices.variants[k], key=lambda v: sum(
            pt.table[tuple(v[:j])][t] for j, t in enumerate(v)))
        head = list(self.probe.te) if pt.in_thinking else []
        return head + self.probe.suffix_ids + list(best)


@dataclass
class StopRule:
    """Evaluates ``StopWhen`` over one sequence's readings, in token order."""

    when: StopWhen
    min_mass: float
    streak: int = 0
    leader: str | None = None

    def settled(self, seq: LiveSequence, reading: Reading) -> str | None:
        """The settled choice after ``reading`` (the next in token order), else None."""
        w = self.when
        mass_floor = self.min_mass if w.min_mass is None else w.min_mass
        choice = w.choice or max(reading.probs, key=lambda c: reading.probs[c])
        p = reading.probs.get(choice, 0.0)
        ok = (reading.mass >= mass_floor and math.isfinite(p) and p >= w.threshold
              and (w.min_thinking_tokens == 0
                   or seq.thinking_tokens(reading.token_index) >= w.min_thinking_tokens))
        # a streak is for one choice: a different leader starts it again
        self.streak = (self.streak + 1 if choice == self.leader else 1) if ok else 0
        self.leader = choice if ok else None
        return choice if self.streak >= w.consecutive else None


def reading_json(reading: Reading, index: int) -> dict[str, Any]:
    """A reading as it appears in responses: the offline probe's JSON plus the choice
    ``index`` it belongs to."""
    return {"index": index, **reading.to_json()}


__all__ = ["LIVE_FIELDS", "SETTLED", "LiveProbe", "LiveProbeConfig", "LiveSequence",
           "StopRule", "StopWhen", "reading_json"]

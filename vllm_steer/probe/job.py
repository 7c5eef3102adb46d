"""Answer probes over reasoning trajectories, as a plan -> submit -> read pipeline.

``ProbeJob`` only builds requests and reads outputs, one stage at a time (``STAGES``);
the drivers (``drivers``) submit each stage to ``vllm.LLM`` (sync) or an
``EngineClient`` (async, for the server), so both paths share every rule:

1. ``trajectories``: one request per prompt (optionally steered, any ``apply_to``); a
   conditioned trajectory's forks are steered by its request's decision (collected by
   the driver between the stages; without trajectories a one-token request per
   conditioned prompt decides it);
2. ``forks``: at each fork point ``t`` (``forks.fork_points``: every N generated tokens
   and the end, never inside a marker) the *base* is ``prompt + generated[:t]`` + the
   think-end marker when the thinking section is open + the forcing suffix. The *head*
   fork is the base with ``max_tokens=1`` and ``logprob_token_ids`` = the first token of
   every variant: for single-token choices that is the whole reading. Each multi-token
   variant gets one fork = base + its tokens, read through prompt log-probs. Forks carry
   the trajectory's steering in absolute positions (``forks.fork_spec``), so they share
   its prefix-cache blocks and each computes its suffix and choice tokens, not the prefix
   (prompt log-probs turn prefix-cache reads off in vLLM by default; forks turn them on);
3. ``gaps``: vLLM computes prompt log-probs only for the tokens it computes, so a choice
   token whose row a fork took from the prefix cache (a block boundary inside the part
   two forks share) has none. If no other fork computed that (context, token), it is read
   at the last position of a request ending with the context. Usually empty;
4. ``top``: low-mass readings are re-asked with ``logprobs=k`` for their top tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.forks import (
    align_mode,
    decided_spec,
    fork_spec,
    place_point,
    replay_spec,
    think_states,
)
from vllm_steer.probe.point import PointReader, ProbePoint, think_marker_ids
from vllm_steer.probe.reading import Reading
from vllm_steer.probe.triggers import Candidate, plan_candidates
from vllm_steer.steering.spec import SpecError, parse_spec
from vllm_steer.steering.think_tracker import ANSWER, THINK

STAGES = ("trajectories", "forks", "gaps", "top")


@dataclass
class Trajectory:
    """A generated trajectory and its readings (JSON-ready via ``to_json``)."""

    label: str
    prompt_ids: list[int]
    steering: dict[str, Any] | str | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    think_end_index: int | None = None
    readings: list[Reading] = field(default_factory=list)
    #: The engine request that generated it (its conditions are collected by this id).
    request_id: str = ""
    #: A conditioned trajectory's report (``vllm_adapter.conditions``): the scores and
    #: the decision its forks were steered by.
    steering_condition: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("readings", "request_id")}
        d["readings"] = [r.to_json() for r in self.readings]
        return d


class ProbeJob:
    """Requests and readings for a set of trajectories (or one-shot prompts).

    ``fork_single_tokens=True`` reads single-token variants on their own forks through
    prompt log-probs too (the multi-token path), to check that both paths agree.
    ``block_size``: the engine's KV block size (``cfg.align`` needs it); ``cache_salt``:
    given to every request (trajectories and forks share blocks only with each other).
    """

    def __init__(self, tokenizer: Any, prompts: list[list[int]],
                 steering: list[dict[str, Any] | str | None], cfg: ProbeConfig, *,
                 labels: list[str] | None = None, generate: bool = True,
                 max_model_len: int | None = None, fork_single_tokens: bool = False,
                 block_size: int | None = None, cache_salt: str | None = None) -> None:
        cfg.validate()
        if not prompts:
            raise ProbeError("prompts", "at least one prompt is needed")
        if any(not p for p in prompts):
            raise ProbeError("prompts", "a prompt is empty")
        if len(steering) != len(prompts):
            raise ProbeError("steering", "give one steering spec (or None) per prompt")
        for i, spec in enumerate(steering):
            try:
                conditioned = spec is not None and parse_spec(spec).condition is not None
                replay_spec(decided_spec(spec, True) if conditioned else spec, 0)
            except SpecError as e:
                raise ProbeError(f"steering[{i}].{e.field}", str(e)) from e
        self.tok, self.cfg, self.generate = tokenizer, cfg, generate
        self.fork_single_tokens = fork_single_tokens
        self.choices = ChoiceSet.build(tokenizer, cfg.choices)
        if cfg.suffix is None:
            if generate:
                raise ProbeError("suffix", "trajectory probes need a forcing suffix")
            self.suffix_ids: list[int] = []
        else:
            self.suffix_ids = tokenizer.encode(cfg.suffix, add_special_tokens=False)
            if not self.suffix_ids:
                raise ProbeError("suffix", f"{cfg.suffix!r} tokenizes to nothing")
        self.ts, self.te = think_marker_ids(tokenizer, cfg.think_start, cfg.think_end)
        self.max_model_len = max_model_len
        self.align = align_mode(cfg.align, any(self.choices.multi_token) or fork_single_tokens)
        if self.align != "none" and generate and not block_size:
            raise ProbeError("align", "needs the engine's KV block size")
        self.block_size = block_size
        self.cache_salt = cache_salt
        if max_model_len is not None:
            self._check_context(prompts, max_model_len)
        labels = labels or [f"trajectory {i}" for i in range(len(prompts))]
        self.trajs = [Trajectory(lbl, list(p), s) for lbl, p, s in
                      zip(labels, prompts, steering, strict=True)]
        self.points: list[ProbePoint] = []
        self._pending: list[tuple[ProbePoint, int, list[Any]]] = []
        self.reader = PointReader(tokenizer, self.choices, cfg, fork_single_tokens)

    def _check_context(self, prompts: list[list[int]], max_model_len: int) -> None:
        # The longest request is a fork at the end of the longest trajectory: prompt +
        # max_tokens + think-end + suffix + the longest forked variant, and vLLM needs room
        # for the one token every request generates (a prompt of max_model_len is refused).
        forked = self.choices.max_len if (self.fork_single_tokens or any(
            self.choices.multi_token)) else 0
        longest = max(len(p) for p in prompts) + (self.cfg.max_tokens if self.generate
                                                  else 0) + len(self.te) + len(self.suffix_ids)
        need = longest + forked + 1
        if need > max_model_len:
            raise ProbeError("prompts", f"prompt + max_tokens + think-end + suffix"
                             f"{' + choice tokens' if forked else ''} + 1 output token can "
                             f"reach {need} tokens, more than the model's context "
                             f"({max_model_len})")

    # -- stages --------------------------------------------------------------------------
    def requests(self, stage: str) -> list[tuple[dict[str, Any], Any]]:
        """``(prompt, SamplingParams)`` pairs of ``stage`` (one of ``STAGES``)."""
        return {"trajectories": self._trajectory_requests, "forks": self._fork_requests,
                "gaps": self._gap_requests, "top": self._top_requests}[stage]()

    def take(self, stage: str, outputs: list[Any]) -> None:
        """Read the ``RequestOutput``s of ``stage``'s requests (same order)."""
        {"trajectories": self._take_trajectories, "forks": self._take_forks,
         "gaps": self._take_gaps, "top": self._take_top}[stage](outputs)

    # -- 1. trajectories ---------------------------------------------------------------
    def _conditioned(self, t: Trajectory) -> bool:
        return t.steering is not None and parse_spec(t.steering).condition is not None

    def _trajectory_requests(self) -> list[tuple[dict[str, Any], Any]]:
        from vllm import SamplingParams

        if not self.generate:
            # no trajectory: a conditioned prompt is decided by a one-token request (its
            # readings are then taken with that decision, as a trajectory's forks are)
            return [({"prompt_token_ids": t.prompt_ids},
                     SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                    extra_args={"steering": t.steering}))
                    for t in self.trajs if self._conditioned(t)]
        reqs = []
        for t in self.trajs:
            sp = SamplingParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                                seed=self.cfg.seed, ignore_eos=self.cfg.ignore_eos,
                                extra_args={"steering": t.steering} if t.steering else None)
            prompt: dict[str, Any] = {"prompt_token_ids": t.prompt_ids}
            if self.cache_salt is not None:
                prompt["cache_salt"] = self.cache_salt
            reqs.append((prompt, sp))
        return reqs

    def undecided(self) -> list[str]:
        """Request ids of the conditioned trajectories whose decision is not known yet
        (the driver collects their reports and hands them to ``decide`` before forking)."""
        return [t.request_id for t in self.trajs if t.steering is not None
                and t.steering_condition is None and parse_spec(t.steering).condition
                is not None]

    def decide(self, reports: dict[str, list[dict[str, Any]]]) -> None:
        """Steer each conditioned trajectory's forks by its request's decision (its first
        choice's report); a trajectory whose decision is missing is an error."""
        waiting = set(self.undecided())
        for t in self.trajs:
            if t.request_id not in waiting:
                continue
            got = reports.get(t.request_id)
            if not got or got[0]["holds"] is None:
                why = got[0].get("error") if got else "no report"
                raise ProbeError("steering.condition", f"{t.label}: the condition was not "
                                                       f"decided ({why})")
            t.steering_condition = got[0]
            t.steering = decided_spec(t.steering, got[0]["holds"])

    def _take_trajectories(self, outputs: list[Any]) -> None:
        if not self.generate:
            for t, out in zip([t for t in self.trajs if self._conditioned(t)], outputs,
                              strict=True):
                t.request_id = str(getattr(out, "request_id", ""))
            return
        eos = getattr(self.tok, "eos_token_id", None)
        for t, out in zip(self.trajs, outputs, strict=True):
            t.request_id = str(getattr(out, "request_id", ""))
            ids = list(out.outputs[0].token_ids)
            if ids and ids[-1] == eos:
                ids = ids[:-1]   # a fork after the end-of-sequence token means nothing
            t.token_ids = ids
            t.text = self.tok.decode(ids)

    # -- 2. forks ----------------------------------------------------------------------
    def plan(self) -> list[ProbePoint]:
        """The fork points of every trajectory (needs the trajectories' tokens)."""
        self.points = []
        for k, t in enumerate(self.trajs):
            seq = t.prompt_ids + t.token_ids
            n_prompt = len(t.prompt_ids)
            states = think_states(seq, n_prompt, self.ts, self.te)
            for i in range(len(t.token_ids)):
                if states[i] == THINK and states[i + 1] == ANSWER:
                    t.think_end_index = i + 1   # where thinking closed, for the plot
                    break
            if self.generate:
                cands = plan_candidates(t.token_ids, self.cfg.trigger, self.cfg.every,
                                        self.cfg.markers, self.cfg.min_spacing, self.tok,
                                        t.prompt_ids)
            else:
                cands = [Candidate(0, "once")]
            seen: set[int] = set()
            for c in cands:
                p = place_point(seq, n_prompt, c, (self.ts, self.te), self.align,
                                self.block_size, lambda q, st=states: self._tail(st[q]))
                if p in seen:
                    continue
                seen.add(p)
                thinking = states[p] == THINK
                base = seq[:n_prompt + p] + (list(self.te) if thinking else []) \
                    + self.suffix_ids
                spec = fork_spec(t.steering, n_prompt, p, self.cfg.steer_suffix)
                self.points.append(ProbePoint(k, p, thinking, base, spec, trigger=c.kind,
                                              marker=c.marker, trigger_index=c.index,
                                              cache_salt=self.cache_salt))
        self.points.sort(key=lambda pt: (pt.traj, pt.token_index))
        return self.points

    def _tail(self, state: int) -> int:
        """Tokens a fork appends after its prefix (think-end when open, the suffix)."""
        return (len(self.te) if state == THINK else 0) + len(self.suffix_ids)

    def _point_requests(self, rnd: str, points: list[ProbePoint]
                        ) -> list[tuple[dict[str, Any], Any]]:
        """Round ``rnd`` of every point in one list (``_pending`` remembers whose is what)."""
        self._pending, reqs = [], []
        for pt in points:
            r, tags = self.reader.requests(rnd, pt)
            self._pending.append((pt, len(r), tags))
            reqs += r
        return reqs

    def _take_points(self, rnd: str, outputs: list[Any]) -> None:
        if len(outputs) != sum(n for _, n, _ in self._pending):
            raise ValueError(f"{rnd}: got {len(outputs)} outputs for "
                             f"{sum(n for _, n, _ in self._pending)} requests")
        at = 0
        for pt, n, tags in self._pending:
            self.reader.take(rnd, pt, tags, outputs[at:at + n])
            at += n
        self._pending = []

    def _fork_requests(self) -> list[tuple[dict[str, Any], Any]]:
        return self._point_requests("forks", self.plan())

    def _take_forks(self, outputs: list[Any]) -> None:
        self._take_points("forks", outputs)

    # -- 3. rows no fork computed ------------------------------------------------------
    def _gap_requests(self) -> list[tuple[dict[str, Any], Any]]:
        return self._point_requests("gaps", self.points)

    def _take_gaps(self, outputs: list[Any]) -> None:
        self._take_points("gaps", outputs)   # each point's reading is folded here
        for t in self.trajs:
            t.readings = []
        for pt in self.points:
            self.trajs[pt.traj].readings.append(pt.reading)

    # -- 4. top tokens of flagged readings ---------------------------------------------
    def _top_requests(self) -> list[tuple[dict[str, Any], Any]]:
        return self._point_requests("top", self.points)

    def _take_top(self, outputs: list[Any]) -> None:
        self._take_points("top", outputs)

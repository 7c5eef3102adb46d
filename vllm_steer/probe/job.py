"""Answer probes over reasoning trajectories, as a plan -> submit -> read pipeline.

``ProbeJob`` only builds requests and reads outputs; the drivers in ``run`` submit
them to ``vllm.LLM`` (sync) or an ``EngineClient`` (async, for the server), so both
paths share every rule:

1. trajectories: one request per prompt (optionally steered, any ``apply_to``);
2. forks: at generated-token index ``t`` in ``0, N, 2N, ..., T`` (and ``T``), the
   prompt is ``prompt + generated[:t]`` + the think-end marker when the thinking
   section is open + the forcing suffix; ``max_tokens=1`` and ``logprob_token_ids``
   = every variant of every choice. Forks carry the trajectory's steering rewritten
   to absolute positions (``replay_spec``), so they steer exactly the tokens the
   trajectory steered and share its prefix-cache blocks;
3. low-mass readings are re-asked with ``logprobs=k`` for their top tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.reading import DEFAULT_MIN_MASS, Reading, make_reading
from vllm_steer.steering.spec import SpecError, parse_spec
from vllm_steer.steering.tokens import ANSWER, THINK, ThinkTracker


@dataclass
class ProbeConfig:
    """How to probe. ``every``: fork spacing in generated tokens. ``suffix=None`` (one-shot
    readings only) reads right after the prompt, e.g. at an open assistant turn."""

    choices: list[str] = field(default_factory=lambda: ["Yes", "No"])
    every: int = 16
    suffix: str | None = "\nThe final answer is"
    max_tokens: int = 256
    min_mass: float = DEFAULT_MIN_MASS
    think_start: str = "<think>"
    think_end: str = "</think>"
    temperature: float = 0.0
    seed: int = 0
    top_k_flagged: int = 5
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.every, int) or self.every <= 0:
            raise ProbeError("every", f"must be a positive integer, got {self.every!r}")
        if self.max_tokens < 0:
            raise ProbeError("max_tokens", f"must be >= 0, got {self.max_tokens}")
        if self.suffix is not None and not self.suffix:
            raise ProbeError("suffix", "must not be empty (use null to read right after a "
                             "one-shot prompt)")


@dataclass
class Trajectory:
    """A generated trajectory and its readings (JSON-ready via ``to_json``)."""

    label: str
    prompt_ids: list[int]
    steering: dict[str, Any] | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    think_end_index: int | None = None
    readings: list[Reading] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "readings"}
        d["readings"] = [r.to_json() for r in self.readings]
        return d


def replay_spec(spec: dict[str, Any] | None, prompt_len: int) -> dict[str, Any] | None:
    """The trajectory's steering in absolute positions, for requests that replay its tokens.

    ``generated`` becomes ``all`` from ``prompt_len``; ``prompt`` becomes ``all`` up to it.
    The plugin canonicalises the same way, so both get the same prefix-cache salt.
    """
    if spec is None:
        return None
    s = parse_spec(spec)
    d = s.to_dict()
    if s.apply_to == "generated":
        d["apply_to"] = "all"
        d["start_position"] = max(s.start_position, prompt_len)
    elif s.apply_to == "prompt":
        d["apply_to"] = "all"
        d["end_position"] = prompt_len if s.end_position is None else min(s.end_position,
                                                                          prompt_len)
    return d


@dataclass
class _Fork:
    traj: int
    token_index: int
    in_thinking: bool
    ids: list[int]


class ProbeJob:
    """Requests and readings for a set of trajectories (or one-shot prompts)."""

    def __init__(self, tokenizer: Any, prompts: list[list[int]], steering: list[dict | None],
                 cfg: ProbeConfig, *, labels: list[str] | None = None, generate: bool = True,
                 max_model_len: int | None = None) -> None:
        cfg.validate()
        if not prompts:
            raise ProbeError("prompts", "at least one prompt is needed")
        if len(steering) != len(prompts):
            raise ProbeError("steering", "give one steering spec (or None) per prompt")
        for i, spec in enumerate(steering):
            try:
                replay_spec(spec, 0)
            except SpecError as e:
                raise ProbeError(f"steering[{i}].{e.field}", str(e)) from e
        self.tok, self.cfg, self.generate = tokenizer, cfg, generate
        self.choices = ChoiceSet.build(tokenizer, cfg.choices)
        if cfg.suffix is None:
            if generate:
                raise ProbeError("suffix", "trajectory probes need a forcing suffix")
            self.suffix_ids: list[int] = []
        else:
            self.suffix_ids = tokenizer.encode(cfg.suffix, add_special_tokens=False)
            if not self.suffix_ids:
                raise ProbeError("suffix", f"{cfg.suffix!r} tokenizes to nothing")
        self.ts = tuple(tokenizer.encode(cfg.think_start, add_special_tokens=False))
        self.te = tuple(tokenizer.encode(cfg.think_end, add_special_tokens=False))
        if not self.ts or not self.te:
            raise ProbeError("think_start/think_end", "markers tokenize to nothing")
        self.max_model_len = max_model_len
        longest = max(len(p) for p in prompts) + (cfg.max_tokens if generate else 0) \
            + len(self.te) + len(self.suffix_ids)
        if max_model_len is not None and longest > max_model_len:
            raise ProbeError("prompts", f"prompt + max_tokens + suffix can reach {longest} "
                             f"tokens, more than the model's context ({max_model_len})")
        labels = labels or [f"trajectory {i}" for i in range(len(prompts))]
        self.trajs = [Trajectory(lbl, list(p), s) for lbl, p, s in
                      zip(labels, prompts, steering, strict=True)]
        self.forks: list[_Fork] = []

    # -- 1. trajectories ---------------------------------------------------------------
    def trajectory_requests(self) -> list[tuple[dict[str, Any], Any]]:
        from vllm import SamplingParams

        if not self.generate:
            return []
        reqs = []
        for t in self.trajs:
            sp = SamplingParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                                seed=self.cfg.seed, ignore_eos=self.cfg.ignore_eos,
                                extra_args={"steering": t.steering} if t.steering else None)
            reqs.append(({"prompt_token_ids": t.prompt_ids}, sp))
        return reqs

    def take_trajectories(self, outputs: list[Any]) -> None:
        eos = getattr(self.tok, "eos_token_id", None)
        for t, out in zip(self.trajs, outputs, strict=True):
            ids = list(out.outputs[0].token_ids)
            if ids and ids[-1] == eos:
                ids = ids[:-1]   # a fork after the end-of-sequence token means nothing
            t.token_ids = ids
            t.text = self.tok.decode(ids)

    # -- 2. forks ----------------------------------------------------------------------
    def fork_requests(self) -> list[tuple[dict[str, Any], Any]]:
        from vllm import SamplingParams

        self.forks = []
        reqs = []
        ids_all = self.choices.all_ids
        for k, t in enumerate(self.trajs):
            seq = np.asarray(t.prompt_ids + t.token_ids, dtype=np.int64)
            tracker = ThinkTracker(self.ts, self.te)
            n = len(t.token_ids)
            points = sorted(set(range(0, n + 1, self.cfg.every)) | {n})
            spec = replay_spec(t.steering, len(t.prompt_ids))
            # states[i]: thinking state after prompt + generated[:i], one causal scan
            states = [tracker.advance(seq, len(t.prompt_ids))]
            for i in range(n):
                states.append(tracker.advance(seq, len(t.prompt_ids) + i + 1))
                if t.think_end_index is None and states[i] == THINK and states[i + 1] == ANSWER:
                    t.think_end_index = i + 1   # where thinking closed, for the plot
            for p in points:
                state = states[p]
                ids = seq[: len(t.prompt_ids) + p].tolist()
                if state == THINK:
                    ids += list(self.te)
                ids += self.suffix_ids
                self.forks.append(_Fork(k, p, state == THINK, ids))
                sp = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids_all,
                                    extra_args={"steering": spec} if spec else None)
                reqs.append(({"prompt_token_ids": ids}, sp))
        return reqs

    def take_forks(self, outputs: list[Any]) -> None:
        for fork, out in zip(self.forks, outputs, strict=True):
            lp = out.outputs[0].logprobs[0]
            reading = make_reading(
                self.choices, {tid: v.logprob for tid, v in lp.items()},
                token_index=fork.token_index, in_thinking=fork.in_thinking,
                min_mass=self.cfg.min_mass, cached_tokens=int(out.num_cached_tokens or 0))
            self.trajs[fork.traj].readings.append(reading)

    # -- 3. top tokens of flagged readings ---------------------------------------------
    def _flagged(self) -> list[tuple[_Fork, Reading]]:
        pairs = []
        for fork in self.forks:
            traj = self.trajs[fork.traj]
            reading = next(r for r in traj.readings if r.token_index == fork.token_index)
            if reading.low_mass:
                pairs.append((fork, reading))
        return pairs

    def top_requests(self) -> list[tuple[dict[str, Any], Any]]:
        from vllm import SamplingParams

        reqs = []
        for fork, _ in self._flagged():
            spec = replay_spec(self.trajs[fork.traj].steering,
                               len(self.trajs[fork.traj].prompt_ids))
            sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.cfg.top_k_flagged,
                                extra_args={"steering": spec} if spec else None)
            reqs.append(({"prompt_token_ids": fork.ids}, sp))
        return reqs

    def take_top(self, outputs: list[Any]) -> list[Trajectory]:
        for (_, reading), out in zip(self._flagged(), outputs, strict=True):
            lp = out.outputs[0].logprobs[0]
            best = sorted(lp.items(), key=lambda kv: -kv[1].logprob)[: self.cfg.top_k_flagged]
            reading.top_tokens = [(self.tok.decode([tid]), round(v.logprob, 4))
                                  for tid, v in best]
        return self.trajs

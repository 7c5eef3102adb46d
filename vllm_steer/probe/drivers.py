"""Drivers: run a ``ProbeJob`` stage by stage on ``vllm.LLM`` (sync) or an
``EngineClient`` (async, what the OpenAI server holds); ``probe`` and ``probe_once``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.job import STAGES, ProbeJob, Trajectory
from vllm_steer.probe.prompts import as_ids
from vllm_steer.probe.reading import Reading
from vllm_steer.vllm_adapter.conditions import take_conditions, take_conditions_async
from vllm_steer.vllm_adapter.engine import block_size, max_model_len

Requests = list[tuple[dict[str, Any], Any]]


def _steering_list(steering: Any, n: int) -> list[Any]:
    if isinstance(steering, list):
        return steering
    return [steering] * n


def generate(llm: Any, reqs: Requests, use_tqdm: bool = False) -> list[Any]:
    """``llm.generate`` on ``(prompt, SamplingParams)`` pairs; [] for no requests."""
    if not reqs:
        return []
    prompts, params = zip(*reqs, strict=True)
    return llm.generate(list(prompts), list(params), use_tqdm=use_tqdm)


def run_job(llm: Any, job: ProbeJob, use_tqdm: bool = True,
            submit: Callable[[Requests], list[Any]] | None = None,
            stages: Sequence[str] = STAGES) -> list[Trajectory]:
    """The ``stages`` of ``job`` (default: all) on ``llm``, with progress bars for
    trajectories and forks. ``submit`` replaces ``generate`` (e.g. to salt requests in
    tests and benchmarks).
    """
    for stage in stages:
        reqs = job.requests(stage)
        job.take(stage, submit(reqs) if submit else
                 generate(llm, reqs, use_tqdm and stage in ("trajectories", "forks")))
        if stage == "trajectories" and job.undecided():
            # conditioned trajectories: their forks are steered by each one's decision
            job.decide(take_conditions(llm, job.undecided()))
    return job.trajs


async def _agenerate(engine: Any, reqs: Requests) -> list[Any]:
    async def one(prompt: dict, params: Any) -> Any:
        final = None
        async for out in engine.generate(prompt, params, f"vllm-steer-probe-{uuid.uuid4().hex}"):
            final = out
        return final

    return list(await asyncio.gather(*(one(p, s) for p, s in reqs)))


async def run_job_async(engine: Any, job: ProbeJob) -> list[Trajectory]:
    """The same stages on an async ``EngineClient``."""
    for stage in STAGES:
        job.take(stage, await _agenerate(engine, job.requests(stage)))
        if stage == "trajectories" and job.undecided():
            job.decide(await take_conditions_async(engine, job.undecided()))
    return job.trajs


def probe(llm: Any, prompts: list[str | list[int]], steering: Any = None,
          cfg: ProbeConfig | None = None, labels: list[str] | None = None,
          use_tqdm: bool = True) -> list[Trajectory]:
    """Generate one trajectory per prompt and read the answer at its triggers (every
    ``cfg.every`` tokens, or reasoning steps: ``cfg.trigger``).

    ``prompts``: token-id lists or raw strings (use ``build_prompt`` for chat models);
    ``steering``: one spec for all, or a list with one spec (or None) per prompt.
    """
    tok = llm.get_tokenizer()
    cfg = cfg or ProbeConfig()
    job = ProbeJob(tok, as_ids(tok, prompts), _steering_list(steering, len(prompts)),
                   cfg, labels=labels, max_model_len=max_model_len(llm),
                   block_size=None if cfg.align == "none" else block_size(llm))
    return run_job(llm, job, use_tqdm)


def probe_once(llm: Any, prompts: list[str | list[int]], steering: Any = None,
               cfg: ProbeConfig | None = None, use_tqdm: bool = False) -> list[Reading]:
    """One reading per prompt (prompt + think-end if open + suffix), no trajectory."""
    tok = llm.get_tokenizer()
    job = ProbeJob(tok, as_ids(tok, prompts), _steering_list(steering, len(prompts)),
                   cfg or ProbeConfig(), generate=False, max_model_len=max_model_len(llm))
    return [t.readings[0] for t in run_job(llm, job, use_tqdm)]

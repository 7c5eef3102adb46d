"""Drivers: run a ``ProbeJob`` on ``vllm.LLM`` (sync) or an ``EngineClient`` (async)."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.job import ProbeConfig, ProbeJob, Trajectory
from vllm_steer.probe.reading import Reading


def build_prompt(tokenizer: Any, question: str, *, system: str | None = None,
                 open_thinking: str | None = None) -> list[int]:
    """Token ids of a chat prompt for ``question`` (the tokenizer's chat template, with the
    generation prompt); ``open_thinking`` (e.g. ``"<think>\\n"``) is appended so that a
    model without a native thinking mode starts inside a thinking section."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        ids = tokenizer.encode(question)
    if open_thinking:
        ids += tokenizer.encode(open_thinking, add_special_tokens=False)
    return ids


def _as_ids(tokenizer: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    return [list(p) if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False)
            for p in prompts]


def _steering_list(steering: Any, n: int) -> list[dict | None]:
    if isinstance(steering, list):
        return steering
    return [steering] * n


def _max_model_len(llm: Any) -> int | None:
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except AttributeError:
        return None


def _generate(llm: Any, reqs: list[tuple[dict, Any]], use_tqdm: bool) -> list[Any]:
    if not reqs:
        return []
    prompts, params = zip(*reqs, strict=True)
    return llm.generate(list(prompts), list(params), use_tqdm=use_tqdm)


def run_job(llm: Any, job: ProbeJob, use_tqdm: bool = True) -> list[Trajectory]:
    job.take_trajectories(_generate(llm, job.trajectory_requests(), use_tqdm)) \
        if job.generate else None
    job.take_forks(_generate(llm, job.fork_requests(), use_tqdm))
    return job.take_top(_generate(llm, job.top_requests(), False))


async def _agenerate(engine: Any, reqs: list[tuple[dict, Any]]) -> list[Any]:
    async def one(prompt: dict, params: Any) -> Any:
        final = None
        async for out in engine.generate(prompt, params, f"vllm-steer-probe-{uuid.uuid4().hex}"):
            final = out
        return final

    return list(await asyncio.gather(*(one(p, s) for p, s in reqs)))


async def run_job_async(engine: Any, job: ProbeJob) -> list[Trajectory]:
    """The same pipeline on an async ``EngineClient`` (what the OpenAI server holds)."""
    if job.generate:
        job.take_trajectories(await _agenerate(engine, job.trajectory_requests()))
    job.take_forks(await _agenerate(engine, job.fork_requests()))
    return job.take_top(await _agenerate(engine, job.top_requests()))


def probe(llm: Any, prompts: list[str | list[int]], steering: Any = None,
          cfg: ProbeConfig | None = None, labels: list[str] | None = None,
          use_tqdm: bool = True) -> list[Trajectory]:
    """Generate one trajectory per prompt and read the answer every ``cfg.every`` tokens.

    ``prompts``: token-id lists or raw strings (use ``build_prompt`` for chat models);
    ``steering``: one spec for all, or a list with one spec (or None) per prompt.
    """
    tok = llm.get_tokenizer()
    job = ProbeJob(tok, _as_ids(tok, prompts), _steering_list(steering, len(prompts)),
                   cfg or ProbeConfig(), labels=labels, max_model_len=_max_model_len(llm))
    return run_job(llm, job, use_tqdm)


def probe_once(llm: Any, prompts: list[str | list[int]], steering: Any = None,
               cfg: ProbeConfig | None = None, use_tqdm: bool = False) -> list[Reading]:
    """One reading per prompt (prompt + think-end if open + suffix), no trajectory."""
    tok = llm.get_tokenizer()
    job = ProbeJob(tok, _as_ids(tok, prompts), _steering_list(steering, len(prompts)),
                   cfg or ProbeConfig(), generate=False, max_model_len=_max_model_len(llm))
    return [t.readings[0] for t in run_job(llm, job, use_tqdm)]


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


@dataclass
class SweepResult:
    """Readings per scale; ``pearson_r`` between scale and the mean log ratio per scale."""

    vector: str
    scales: list[float]
    questions: list[str]
    log_ratios: list[list[float | None]]   # [scale][question]
    mean_log_ratio: list[float | None]
    mean_mass: list[float]
    low_mass_count: list[int]
    pearson_r: float | None
    pearson_r_all_points: float | None
    mean_signed_log_ratio: list[float | None] | None = None
    pearson_r_signed: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sweep(llm: Any, questions: list[str], vector: str, scales: list[float],
          cfg: ProbeConfig | None = None, *, apply_to: str = "all",
          layers: list[int] | None = None, system: str | None = None,
          open_thinking: str | None = None, signs: list[float] | None = None) -> SweepResult:
    """One-shot readings of every question at every scale of ``vector`` (a registry name),
    all submitted together (each request carries its own steering).

    ``signs`` (+1/-1 per question: +1 where the vector's positive persona answers the
    first choice) adds persona-signed means, comparable across mixed questions.
    """
    if not scales:
        raise ProbeError("scales", "at least one scale is needed")
    if not questions:
        raise ProbeError("questions", "at least one question is needed")
    cfg = cfg or ProbeConfig()
    tok = llm.get_tokenizer()
    base = [build_prompt(tok, q, system=system, open_thinking=open_thinking) for q in questions]
    prompts, specs = [], []
    for s in scales:
        entry: dict[str, Any] = {"name": vector, "scale": float(s)}
        if layers:
            entry["layers"] = list(layers)
        spec = None if s == 0 else {"vectors": [entry], "apply_to": apply_to}
        prompts += base
        specs += [spec] * len(base)
    readings = probe_once(llm, prompts, specs, cfg, use_tqdm=True)
    nq = len(questions)
    ratios = [[r.log_ratio for r in readings[i * nq:(i + 1) * nq]] for i in range(len(scales))]
    means = []
    for row in ratios:
        vals = [x for x in row if x is not None]
        means.append(sum(vals) / len(vals) if vals else None)
    ok = [(s, m) for s, m in zip(scales, means, strict=True) if m is not None]
    pts = [(s, x) for s, row in zip(scales, ratios, strict=True) for x in row if x is not None]
    signed = None
    if signs is not None:
        if len(signs) != nq:
            raise ProbeError("signs", f"{len(signs)} signs for {nq} questions")
        signed = []
        for row in ratios:
            vals = [g * x for g, x in zip(signs, row, strict=True) if x is not None]
            signed.append(sum(vals) / len(vals) if vals else None)
    sok = [(s, m) for s, m in zip(scales, signed or [], strict=True) if m is not None]
    return SweepResult(
        vector=vector, scales=list(scales), questions=list(questions), log_ratios=ratios,
        mean_log_ratio=means,
        mean_mass=[sum(r.mass for r in readings[i * nq:(i + 1) * nq]) / nq
                   for i in range(len(scales))],
        low_mass_count=[sum(r.low_mass for r in readings[i * nq:(i + 1) * nq])
                        for i in range(len(scales))],
        pearson_r=pearson([s for s, _ in ok], [m for _, m in ok]),
        pearson_r_all_points=pearson([s for s, _ in pts], [x for _, x in pts]),
        mean_signed_log_ratio=signed,
        pearson_r_signed=pearson([s for s, _ in sok], [m for _, m in sok]) if sok else None,
    )

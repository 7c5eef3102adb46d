"""Coefficient sweeps: one-shot readings of questions at several scales of one vector,
scored as the log-odds of a named target choice (any number of choices)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vllm_steer.probe.choices import ProbeError, normalize
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.drivers import probe_once
from vllm_steer.probe.prompts import build_prompt
from vllm_steer.probe.reading import Reading, logsumexp
from vllm_steer.stats import pearson


def target_log_odds(r: Reading, target: str) -> float | None:
    """log p_target - log(sum of the other choices' p): for two choices with the target
    first this is the reading's ``log_ratio``. None when not finite."""
    others = logsumexp([v for c, v in r.logprobs.items() if c != target])
    x = r.logprobs[target] - others
    return x if math.isfinite(x) else None


def resolve_target(choices: list[str], target: str | None) -> str:
    """``target`` as spelled in ``choices`` (matched like choices are: case and leading
    whitespace ignored); the first choice when None."""
    if target is None:
        return choices[0]
    if not isinstance(target, str):
        raise ProbeError("target", f"must be one of the choices {choices}, got {target!r}")
    for c in choices:
        if normalize(c) == normalize(target):
            return c
    raise ProbeError("target", f"{target!r} is not one of the choices {choices}")


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass
class SweepResult:
    """Readings per scale (``[scale][question]`` lists).

    ``log_odds``: ``target_log_odds`` of each reading; ``mean_log_odds`` its mean per
    scale, ``pearson_r`` between scale and that mean (``pearson_r_all_points``: over every
    reading). With persona ``signs`` (+1 where the vector's positive persona answers the
    target): ``mean_signed_log_odds`` and ``pearson_r_signed``. ``mean_probs[s][c]``: mean
    normalized probability of choice ``c``; ``mean_mass``/``min_mass``: probability mass of
    all choices (low mass: the readings mean little); ``low_mass_count``: readings below
    the config's ``min_mass``.
    """

    vector: str
    scales: list[float]
    questions: list[str]
    choices: list[str]
    target: str
    log_odds: list[list[float | None]]
    mean_log_odds: list[float | None]
    mean_probs: list[dict[str, float]]
    mean_mass: list[float]
    min_mass: list[float]
    low_mass_count: list[int]
    pearson_r: float | None
    pearson_r_all_points: float | None
    mean_signed_log_odds: list[float | None] | None = None
    pearson_r_signed: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sweep(llm: Any, questions: list[str], vector: str, scales: list[float],
          cfg: ProbeConfig | None = None, *, target: str | None = None, apply_to: str = "all",
          layers: list[int] | None = None, system: str | None = None,
          open_thinking: str | None = None, signs: list[float] | None = None) -> SweepResult:
    """One-shot readings of every question at every scale of ``vector`` (a registry name),
    all submitted together (each request carries its own steering).

    ``target``: the choice scored (default: the first); ``signs`` (+1/-1 per question)
    adds persona-signed means, comparable across mixed questions.
    """
    if not scales:
        raise ProbeError("scales", "at least one scale is needed")
    if not questions:
        raise ProbeError("questions", "at least one question is needed")
    cfg = cfg or ProbeConfig()
    if len(cfg.choices) < 2:
        raise ProbeError("choices", "a sweep needs at least two choices")
    target = resolve_target(list(cfg.choices), target)
    nq = len(questions)
    if signs is not None and len(signs) != nq:
        raise ProbeError("signs", f"{len(signs)} signs for {nq} questions")
    tok = llm.get_tokenizer()
    base = [build_prompt(tok, q, system=system, open_thinking=open_thinking) for q in questions]
    prompts, specs = [], []
    for s in scales:
        entry: dict[str, Any] = {"name": vector, "scale": float(s)}
        if layers:
            entry["layers"] = list(layers)
        spec = None if s == 0 else {"vectors": [entry], "apply_to": apply_to}
        prompts += base
        specs += [spec] * nq
    readings = probe_once(llm, prompts, specs, cfg, use_tqdm=True)
    rows = [readings[i * nq:(i + 1) * nq] for i in range(len(scales))]
    odds = [[target_log_odds(r, target) for r in row] for row in rows]
    means = [_mean(row) for row in odds]
    ok = [(s, m) for s, m in zip(scales, means, strict=True) if m is not None]
    pts = [(s, x) for s, row in zip(scales, odds, strict=True) for x in row if x is not None]
    signed = None
    if signs is not None:
        signed = [_mean([None if x is None else g * x for g, x in zip(signs, row, strict=True)])
                  for row in odds]
    sok = [] if signed is None else [(s, m) for s, m in zip(scales, signed, strict=True)
                                     if m is not None]
    return SweepResult(
        vector=vector, scales=list(scales), questions=list(questions),
        choices=list(cfg.choices), target=target, log_odds=odds, mean_log_odds=means,
        mean_probs=[{c: sum(r.probs[c] for r in row) / nq for c in cfg.choices}
                    for row in rows],
        mean_mass=[sum(r.mass for r in row) / nq for row in rows],
        min_mass=[min(r.mass for r in row) for row in rows],
        low_mass_count=[sum(r.low_mass for r in row) for row in rows],
        pearson_r=pearson([s for s, _ in ok], [m for _, m in ok]),
        pearson_r_all_points=pearson([s for s, _ in pts], [x for _, x in pts]),
        mean_signed_log_odds=signed,
        pearson_r_signed=pearson([s for s, _ in sok], [m for _, m in sok]) if sok else None,
    )

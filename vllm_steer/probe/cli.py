"""``vllm-steer probe`` and ``vllm-steer sweep``: YAML experiment in, JSON + PNG out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.questions import QuestionSet, load_questions, read_mapping

_PROBE_KEYS = {"questions", "limit", "open_thinking", "system", "probe", "runs", "engine",
               "model"}
_SWEEP_KEYS = {"questions", "vector", "scales", "apply_to", "layers", "system",
               "open_thinking", "probe", "engine", "model", "target"}


def load_experiment(path: str | Path, known: set[str]) -> tuple[dict[str, Any], Path]:
    from vllm_steer.locations import find_config

    path = find_config(path)  # configs/... also names the shipped experiments
    cfg = read_mapping(path, "config")
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ProbeError(unknown[0], f"{path}: unknown field (known: {', '.join(sorted(known))})")
    if "questions" not in cfg:
        raise ProbeError("questions", f"{path}: name a questions file")
    return cfg, path.parent


def probe_config(d: dict[str, Any] | None, choices: tuple[str, ...] | None = None
                 ) -> ProbeConfig:
    """The experiment's ``probe:`` mapping, validated; ``choices`` from the questions file
    unless the mapping names them."""
    d = dict(d or {})
    if choices is not None:
        d.setdefault("choices", list(choices))
    return ProbeConfig.from_dict(d, prefix="probe.")


def _engine(cfg: dict[str, Any], args: argparse.Namespace) -> Any:
    from vllm_steer.llm_factory import make_llm

    opts = {"block_size": 32, "enforce_eager": True, "max_model_len": 2048}
    opts.update(cfg.get("engine") or {})
    return make_llm(args.model or cfg.get("model"), registry=args.registry, **opts)


def _summary(label: str, r: Any) -> str:
    probs = "  ".join(f"{c}={p:.3f}" for c, p in r.probs.items())
    ratio = "" if r.log_ratio is None else f"  log ratio {r.log_ratio:+.3f}"
    return (f"{label:40s} {probs}{ratio}  mass {r.mass:.3f}"
            f"{'  LOW MASS' if r.low_mass else ''}")


def run_probe(args: argparse.Namespace, llm: Any = None) -> int:
    """Run the experiment in ``args.config``; ``llm``: an engine to use instead of starting
    one (tests)."""
    from vllm_steer.probe.drivers import probe
    from vllm_steer.probe.plot import plot_trajectories
    from vllm_steer.probe.prompts import build_prompt

    cfg, base = load_experiment(args.config, _PROBE_KEYS)
    qs: QuestionSet = load_questions(base / cfg["questions"])
    limit = args.limit if args.limit is not None else cfg.get("limit")
    questions = list(qs.questions[:limit] if limit else qs.questions)
    runs = cfg.get("runs") or [{"label": "unsteered", "steering": None}]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(q.choices, []).append(i)
    pcfgs = {ch: probe_config(cfg.get("probe"), ch) for ch in groups}  # validate all first
    llm = llm or _engine(cfg, args)
    tok = llm.get_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = [{} for _ in questions]
    for choices, idx in groups.items():
        pcfg = pcfgs[choices]
        prompts, specs, labels = [], [], []
        for qi in idx:
            ids = build_prompt(tok, questions[qi].text, system=cfg.get("system"),
                               open_thinking=cfg.get("open_thinking"))
            for run in runs:
                prompts.append(ids)
                specs.append(run.get("steering"))
                labels.append(f"q{qi} {run.get('label', '')}".strip())
        trajs = probe(llm, prompts, specs, pcfg, labels=labels)
        variants = ChoiceSet.build(tok, pcfg.choices).to_json(tok)
        for qi in idx:
            group = [t for t in trajs if t.label.startswith(f"q{qi} ")]
            q = questions[qi]
            results[qi] = {"question": q.text, "expected": q.expected, "probe": pcfg.to_json(),
                           "variants": variants, "trajectories": [t.to_json() for t in group]}
            plot_trajectories(group, out / f"probe_q{qi}.png", title=q.text[:80],
                              min_mass=pcfg.min_mass)
            for t in group:
                print(_summary(t.label + " (final)", t.readings[-1]))
    (out / "probe.json").write_text(json.dumps({"config": str(args.config),
                                                "questions": results}, indent=1))
    print(f"wrote {out / 'probe.json'} and {len(questions)} plot(s) in {out}")
    return 0


def run_sweep(args: argparse.Namespace, llm: Any = None) -> int:
    from vllm_steer.probe.plot import plot_sweep
    from vllm_steer.probe.sweep import resolve_target, sweep

    cfg, base = load_experiment(args.config, _SWEEP_KEYS)
    qs = load_questions(base / cfg["questions"])
    groups = qs.choice_groups()
    if len(groups) != 1:
        raise ProbeError("questions", "a sweep needs one choice set for all questions")
    (choices,) = groups
    pcfg = probe_config(cfg.get("probe"), choices)
    target = resolve_target(list(pcfg.choices), args.target or cfg.get("target") or qs.target)
    vector = args.vector or cfg.get("vector")
    if not vector:
        raise ProbeError("vector", "name the registered vector to sweep (--vector or config)")
    raw_scales = args.scales.split(",") if args.scales else cfg.get("scales")
    try:
        scales = [float(s) for s in raw_scales or []]
    except (TypeError, ValueError) as e:
        raise ProbeError("scales", f"must be numbers ({e})") from e
    llm = llm or _engine(cfg, args)
    res = sweep(llm, qs.texts, vector, scales, pcfg, target=target,
                apply_to=cfg.get("apply_to", "all"), layers=cfg.get("layers"),
                system=cfg.get("system"), open_thinking=cfg.get("open_thinking"),
                signs=qs.signs(target))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(res.to_json(), indent=1))
    plot_sweep(res, out / "sweep.png", min_mass=pcfg.min_mass)
    for i, s in enumerate(res.scales):
        m, sm = res.mean_log_odds[i], (res.mean_signed_log_odds or [None] * len(res.scales))[i]
        probs = "  ".join(f"{c}={p:.3f}" for c, p in res.mean_probs[i].items())
        print(f"scale {s:+6.2f}  mean log-odds({target}) "
              f"{'n/a' if m is None else f'{m:+.3f}'}"
              f"{'' if sm is None else f'  persona-signed {sm:+.3f}'}  {probs}  "
              f"mass {res.mean_mass[i]:.3f}")
    print(f"Pearson r (scale vs mean log-odds of {target!r}) = {res.pearson_r}; "
          f"signed = {res.pearson_r_signed}; wrote {out}")
    return 0


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("config", help="experiment YAML (see configs/experiments/)")
    p.add_argument("--model", default=None, help="local HF model dir (default: embedded)")
    p.add_argument("--registry", default=None, help="vector registry YAML")
    p.add_argument("--out", default=default_out, help="output directory")


def add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="answer probes along reasoning trajectories")
    _common(p, "out/probe")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.set_defaults(func=run_probe)


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="coefficient sweep of a vector on a question set")
    _common(p, "out/sweep")
    p.add_argument("--vector", default=None, help="registered vector name")
    p.add_argument("--scales", default=None, help="comma-separated scales")
    p.add_argument("--target", default=None,
                   help="choice whose log-odds is scored (default: config, else the first)")
    p.set_defaults(func=run_sweep)

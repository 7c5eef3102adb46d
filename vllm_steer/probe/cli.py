"""``vllm-steer probe`` and ``vllm-steer sweep``: YAML experiment in, JSON + PNG out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.job import ProbeConfig


def load_experiment(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ProbeError("config", f"{path}: cannot read ({e})") from e
    if not isinstance(cfg, dict):
        raise ProbeError("config", f"{path}: top level must be a mapping")
    return cfg, path.parent


def load_questions(path: Path) -> tuple[list[str], list[float], list[str]]:
    """(prompt texts with the instruction appended, +1/-1 signs from ``expected``, choices)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    items = raw.get("questions") or []
    if not items:
        raise ProbeError("questions", f"{path}: no questions")
    choices = [str(c) for c in raw.get("choices", ["Yes", "No"])]
    instr = str(raw.get("instruction") or "")
    texts = [f"{q['question']} {instr}".strip() for q in items]
    signs = [1.0 if q.get("expected", choices[0]) == choices[0] else -1.0 for q in items]
    return texts, signs, choices


def probe_config(d: dict[str, Any] | None) -> ProbeConfig:
    d = dict(d or {})
    known = set(ProbeConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ProbeError(f"probe.{unknown[0]}", f"unknown field (known: {sorted(known)})")
    return ProbeConfig(**d)


def _engine(cfg: dict[str, Any], args: argparse.Namespace) -> Any:
    from vllm_steer.engine import make_llm

    opts = {"block_size": 32, "enforce_eager": True, "max_model_len": 2048}
    opts.update(cfg.get("engine") or {})
    return make_llm(args.model or cfg.get("model"), registry=args.registry, **opts)


def run_probe(args: argparse.Namespace) -> int:
    from vllm_steer.probe.plot import plot_trajectories
    from vllm_steer.probe.run import build_prompt, probe

    cfg, base = load_experiment(args.config)
    texts, _, choices = load_questions(base / cfg["questions"])
    limit = args.limit if args.limit is not None else cfg.get("limit")
    texts = texts[:limit] if limit else texts
    pcfg = probe_config({"choices": choices, **(cfg.get("probe") or {})})
    runs = cfg.get("runs") or [{"label": "unsteered", "steering": None}]
    llm = _engine(cfg, args)
    tok = llm.get_tokenizer()
    prompts, specs, labels = [], [], []
    for qi, q in enumerate(texts):
        ids = build_prompt(tok, q, system=cfg.get("system"), open_thinking=cfg.get("open_thinking"))
        for run in runs:
            prompts.append(ids)
            specs.append(run.get("steering"))
            labels.append(f"q{qi} {run.get('label', '')}".strip())
    trajs = probe(llm, prompts, specs, pcfg, labels=labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": str(args.config), "questions": texts,
              "probe": pcfg.__dict__, "trajectories": [t.to_json() for t in trajs]}
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    for qi, q in enumerate(texts):
        group = [t for t in trajs if t.label.startswith(f"q{qi} ")]
        plot_trajectories(group, out / f"probe_q{qi}.png", title=q[:80])
    print(f"wrote {out / 'probe.json'} and {len(texts)} plot(s) in {out}")
    for t in trajs:
        last = t.readings[-1]
        print(f"{t.label:40s} final log ratio {last.log_ratio!s:>8.8} mass {last.mass:.3f}"
              f"{'  LOW MASS' if last.low_mass else ''}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from vllm_steer.probe.plot import plot_sweep
    from vllm_steer.probe.run import sweep

    cfg, base = load_experiment(args.config)
    texts, signs, choices = load_questions(base / cfg["questions"])
    pcfg = probe_config({"choices": choices, **(cfg.get("probe") or {})})
    vector = args.vector or cfg.get("vector")
    if not vector:
        raise ProbeError("vector", "name the registered vector to sweep (--vector or config)")
    scales = [float(s) for s in (args.scales.split(",") if args.scales else cfg["scales"])]
    llm = _engine(cfg, args)
    res = sweep(llm, texts, vector, scales, pcfg, apply_to=cfg.get("apply_to", "all"),
                layers=cfg.get("layers"), system=cfg.get("system"),
                open_thinking=cfg.get("open_thinking"), signs=signs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(res.to_json(), indent=1))
    plot_sweep(res, out / "sweep.png")
    for s, m, sm in zip(res.scales, res.mean_log_ratio, res.mean_signed_log_ratio or [],
                        strict=False):
        print(f"scale {s:+6.2f}  mean log ratio {m:+.3f}  persona-signed {sm:+.3f}")
    print(f"Pearson r (scale vs mean log ratio) = {res.pearson_r}; "
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
    p = sub.add_parser("sweep", help="coefficient sweep of a vector on yes/no questions")
    _common(p, "out/sweep")
    p.add_argument("--vector", default=None, help="registered vector name")
    p.add_argument("--scales", default=None, help="comma-separated scales")
    p.set_defaults(func=run_sweep)

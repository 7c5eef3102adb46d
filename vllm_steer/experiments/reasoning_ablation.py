"""The reasoning-data ablation: which of three changes to steering data matter for thinking?

For a persona pair, one vector is trained on the engine (hidden-state capture) for each of
the 2 x 2 x 2 combinations of

- ``thinking_prompt``: the persona instruction mentions thinking (the template),
- ``reasoning_suffixes``: reply openers from the reasoning-style set (else the chat set),
- ``think_token``: the training prompt opens the thinking section (``style: thinking``),

and each vector's effect is measured as the change in **action confidence** (``log P(Yes)
- log P(No)`` on questions where Yes = take the action) per unit scale, read with answer
probes (``vllm_steer.probe``) along thinking trajectories:

1. thinking phase: the prompt opens the thinking section (natively or by hand) and the
   model thinks for ``thinking_tokens``; a fork every ``probe.every`` tokens closes the
   section, appends the forcing suffix and reads Yes/No ("inside the thinking section");
2. answer phase (budget forcing): the section is closed after those tokens (unless the
   model closed it) and the answer is generated and probed the same way ("after it").

Per question, the slope of the mean reading against the scale (the unsteered run, scale
0, is shared) is fitted by least squares; the table reports the mean slope over questions
with its range. Readings whose choices' mass is below ``probe.min_mass`` are left out and
counted. ``run_ablation`` returns the JSON-ready result; ``write_outputs`` writes
``ablation.json``, ``ablation.md`` and ``ablation.png``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_steer.extract.dataset import PromptFormat, config_from_mapping, render_generation_prompt
from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.questions import QuestionSet, load_questions, read_mapping

FACTORS = ("thinking_prompt", "reasoning_suffixes", "think_token")
PHASES = ("thinking", "answer")
APPLY_TO = ("generated", "thinking", "answer")
_KEYS = {"personas", "factors", "max_suffixes", "layers", "method", "questions", "limit",
         "scales", "apply_to", "thinking_tokens", "answer_tokens", "probe", "sample_question",
         "engine", "model"}


@dataclass(frozen=True)
class Combo:
    """One combination of the three factors (True = the thinking-style variant)."""

    thinking_prompt: bool
    reasoning_suffixes: bool
    think_token: bool

    @property
    def key(self) -> str:
        return "".join("1" if getattr(self, f) else "0" for f in FACTORS)

    def label(self) -> str:
        return " ".join(("+" if getattr(self, f) else "-") + f for f in FACTORS)


def all_combos() -> list[Combo]:
    return [Combo(*bits) for bits in itertools.product((False, True), repeat=3)]


@dataclass
class AblationConfig:
    """The experiment (``configs/experiments/reasoning_data_ablation.yaml``); errors name
    the field (``ProbeError``)."""

    personas: list[list[str]]
    factors: dict[str, dict[str, str]]
    questions: QuestionSet
    max_suffixes: int | None = 32
    layers: Any = "4:26"
    method: str = "pca_center"
    limit: int | None = 4
    scales: list[float] = field(default_factory=lambda: [-4.0, 4.0])
    apply_to: str = "generated"
    thinking_tokens: int = 48
    answer_tokens: int = 24
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    sample_question: int = 0
    engine: dict[str, Any] = field(default_factory=dict)
    model: str | None = None

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> AblationConfig:
        from vllm_steer.locations import find_config

        path = find_config(path)
        raw = read_mapping(path, "config")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(raw, path.parent)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], base: Path) -> AblationConfig:
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ProbeError(unknown[0], f"unknown field (known: {', '.join(sorted(_KEYS))})")
        factors = raw.get("factors")
        if not isinstance(factors, dict) or sorted(factors) != sorted(FACTORS):
            raise ProbeError("factors", f"must map exactly {', '.join(FACTORS)} to "
                             "{on: ..., off: ...}")
        for name, arms in factors.items():
            if not isinstance(arms, dict) or sorted(arms) != ["off", "on"] or not all(
                    isinstance(v, str) and v for v in arms.values()):
                raise ProbeError(f"factors.{name}", "must be {on: TEXT, off: TEXT}")
        styles = set(factors["think_token"].values())
        if not styles <= {"chat", "thinking"}:
            raise ProbeError("factors.think_token", "its arms are styles: chat / thinking")
        if "questions" not in raw:
            raise ProbeError("questions", "name a questions file")
        qs = load_questions(base / raw["questions"])
        if [tuple(q.choices) for q in qs.questions] != [("Yes", "No")] * len(qs.questions):
            raise ProbeError("questions", "action confidence is read from Yes/No questions "
                             "(Yes = act)")
        scales = raw.get("scales", [-4.0, 4.0])
        if not isinstance(scales, list) or not scales or not all(
                isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s)
                and s != 0 for s in scales):
            raise ProbeError("scales", "must be a non-empty list of non-zero numbers (scale 0 "
                             "is always run)")
        apply_to = raw.get("apply_to", "generated")
        if apply_to not in APPLY_TO:
            raise ProbeError("apply_to", f"must be one of {', '.join(APPLY_TO)}")
        ints = {}
        for key, lo, default in (("thinking_tokens", 1, 48), ("answer_tokens", 1, 24),
                                 ("sample_question", 0, 0)):
            v = raw.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ProbeError(key, f"must be an integer >= {lo}")
            ints[key] = v
        for key in ("max_suffixes", "limit"):
            v = raw.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ProbeError(key, "must be an integer >= 1 or null")
        probe = dict(raw.get("probe") or {})
        probe.setdefault("choices", ["Yes", "No"])
        if probe["choices"] != ["Yes", "No"]:
            raise ProbeError("probe.choices", "the ablation reads Yes/No")
        for key in ("max_tokens", "ignore_eos"):
            if key in probe:
                raise ProbeError(f"probe.{key}", "set by the experiment (thinking_tokens, "
                                 "answer_tokens)")
        pcfg = ProbeConfig.from_dict(probe, prefix="probe.")
        cfg = cls(personas=raw.get("personas"), factors=factors, questions=qs,
                  max_suffixes=raw.get("max_suffixes", 32), layers=raw.get("layers", "4:26"),
                  method=raw.get("method", "pca_center"), limit=raw.get("limit", 4),
                  scales=[float(s) for s in scales], apply_to=apply_to, probe=pcfg,
                  engine=dict(raw.get("engine") or {}), model=raw.get("model"), **ints)
        for combo in all_combos():   # every recipe validates before anything runs
            try:
                cfg.recipe(combo)
            except Exception as e:
                raise ProbeError(getattr(e, "field", None) or "personas", str(e)) from e
        if cfg.sample_question >= len(cfg.question_texts()):
            raise ProbeError("sample_question", "beyond the questions run (limit)")
        return cfg

    def question_texts(self) -> list[str]:
        qs = self.questions.questions[:self.limit] if self.limit else self.questions.questions
        return [q.text for q in qs]

    def recipe(self, combo: Combo) -> Any:
        """The vector recipe (``VectorConfig``) of one combination."""
        arm = {f: self.factors[f]["on" if getattr(combo, f) else "off"] for f in FACTORS}
        raw: dict[str, Any] = {
            "name": f"ablation-{combo.key}", "personas": self.personas,
            "template": arm["thinking_prompt"], "suffixes": arm["reasoning_suffixes"],
            "style": arm["think_token"], "layers": self.layers, "method": self.method}
        if self.max_suffixes is not None:
            raw["max_suffixes"] = self.max_suffixes
        return config_from_mapping(raw, where=f"combination {combo.label()}", allow_files=False)


# -- running ---------------------------------------------------------------------------------
def _steering(path: str, scale: float, apply_to: str, prompt_len: int) -> dict[str, Any] | None:
    if scale == 0:
        return None
    spec: dict[str, Any] = {"vectors": [{"path": path, "scale": scale}]}
    if apply_to == "generated":   # every token the model writes, in both phases
        spec.update(apply_to="all", start_position=prompt_len)
    else:
        spec["apply_to"] = apply_to
    return spec


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def summarize(readings: dict[tuple[str, float, int, str], list[tuple[float | None, bool]]],
              combo_key: str, scales: Sequence[float], num_questions: int) -> dict[str, Any]:
    """Per phase: mean/min/max over questions of the least-squares slope of the mean
    reading against the scale (kept readings only: mass >= min_mass), and counts."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        slopes, kept, total = [], 0, 0
        for q in range(num_questions):
            xs, ys = [], []
            for s in [0.0, *scales]:
                key = ("unsteered" if s == 0 else combo_key, s, q, phase)
                vals = readings.get(key, [])
                total += len(vals)
                good = [v for v, low in vals if not low and v is not None]
                kept += len(good)
                if good:
                    xs.append(s)
                    ys.append(sum(good) / len(good))
            if len(set(xs)) >= 2:
                slopes.append(_slope(xs, ys))
        out[phase] = {
            "slope_mean": sum(slopes) / len(slopes) if slopes else None,
            "slope_min": min(slopes) if slopes else None,
            "slope_max": max(slopes) if slopes else None,
            "questions": len(slopes), "readings_kept": kept, "readings": total}
    return out


def run_ablation(llm: Any, cfg: AblationConfig, vector_dir: str | Path,
                 progress: bool = True) -> dict[str, Any]:
    """Train the 8 vectors on ``llm`` (saved in ``vector_dir``, which must be an allowed
    directory of the engine's registry: requests name them by file) and probe them."""
    from vllm_steer.extract import build_dataset, train
    from vllm_steer.extract.train import separation_scores
    from vllm_steer.probe.drivers import probe

    tok = llm.get_tokenizer()
    vector_dir = Path(vector_dir)
    vector_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    combos = all_combos()
    vectors: dict[str, dict[str, Any]] = {}
    for combo in combos:
        rcfg = cfg.recipe(combo)
        ds = build_dataset(rcfg, tok)
        t = time.perf_counter()
        vec = train(llm, tok, ds, layers=rcfg.layers, method=rcfg.method, progress=progress)
        fname = f"ablation-{combo.key}.safetensors"
        vec.save(str(vector_dir / fname))
        sep = separation_scores(vec)
        vectors[combo.key] = {"file": fname, "num_pairs": len(ds),
                              "mean_separation": sum(sep.values()) / len(sep),
                              "train_seconds": round(time.perf_counter() - t, 2)}
    t_train = time.perf_counter() - t0

    fmt = PromptFormat(style="thinking")
    think_open, think_close = fmt.markers(tok)
    questions = cfg.question_texts()   # each with the question file's instruction
    prompts = [tok.encode(render_generation_prompt(tok, q, fmt), add_special_tokens=False)
               for q in questions]
    runs = [("unsteered", 0.0)] + [(c.key, s) for c in combos for s in cfg.scales]
    pc = cfg.probe
    base = {**pc.to_json(), "think_start": think_open.strip(), "think_end": think_close}
    readings: dict[tuple[str, float, int, str], list[tuple[float | None, bool]]] = {}
    texts: dict[tuple[str, float, int], str] = {}

    def record(trajs: list[Any], labels: list[tuple[str, float, int]]) -> None:
        for traj, (key, s, q) in zip(trajs, labels, strict=True):
            for r in traj.readings:
                phase = "thinking" if r.in_thinking else "answer"
                readings.setdefault((key, s, q, phase), []).append((r.log_ratio, r.low_mass))

    # 1) thinking phase
    ids, specs, labels = [], [], []
    for key, s in runs:
        path = vectors[key]["file"] if key != "unsteered" else ""
        for q, p in enumerate(prompts):
            ids.append(p)
            specs.append(_steering(path, s, cfg.apply_to, len(p)))
            labels.append((key, s, q))
    pcfg1 = ProbeConfig.from_dict({**base, "max_tokens": cfg.thinking_tokens,
                                   "ignore_eos": True})
    trajs1 = probe(llm, ids, specs, pcfg1, labels=[f"{k} {s} q{q}" for k, s, q in labels],
                   use_tqdm=progress)
    record(trajs1, labels)
    # 2) answer phase: the thinking so far, the section closed (unless the model did)
    close = tok.encode(think_close, add_special_tokens=False)
    ids2 = []
    for traj in trajs1:
        cont = traj.prompt_ids + traj.token_ids
        if traj.think_end_index is None:
            cont = cont + tok.encode("\n", add_special_tokens=False) + close \
                + tok.encode("\n", add_special_tokens=False)
        ids2.append(cont)
    pcfg2 = ProbeConfig.from_dict({**base, "max_tokens": cfg.answer_tokens,
                                   "ignore_eos": False})
    specs2 = [_steering(vectors[k]["file"] if k != "unsteered" else "", s, cfg.apply_to,
                        len(prompts[q])) for k, s, q in labels]
    trajs2 = probe(llm, ids2, specs2, pcfg2, labels=[f"{k} {s} q{q} answer"
                                                      for k, s, q in labels],
                   use_tqdm=progress)
    record(trajs2, labels)
    for traj, (key, s, q) in zip(trajs2, labels, strict=True):
        texts[(key, s, q)] = traj.text

    rows = []
    lo, hi = min(cfg.scales), max(cfg.scales)
    sq = cfg.sample_question
    for combo in combos:
        rows.append({
            "combination": combo.key, "label": combo.label(),
            **{f: getattr(combo, f) for f in FACTORS},
            **vectors[combo.key],
            "effect": summarize(readings, combo.key, cfg.scales, len(prompts)),
            "answer_sample": {str(lo): texts[(combo.key, lo, sq)],
                              str(hi): texts[(combo.key, hi, sq)]},
        })
    return {
        "questions": questions, "scales": cfg.scales, "apply_to": cfg.apply_to,
        "thinking_tokens": cfg.thinking_tokens, "answer_tokens": cfg.answer_tokens,
        "probe": pc.to_json(), "personas": cfg.personas, "factors": cfg.factors,
        "think_markers": [think_open, think_close],
        "native_thinking": _native(tok),
        "unsteered_answer_sample": texts[("unsteered", 0.0, sq)],
        "sample_question": questions[sq],
        "rows": rows,
        "seconds": {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)},
    }


def _native(tok: Any) -> bool:
    from vllm_steer.thinking import native_markers

    return native_markers(tok) is not None


# -- outputs ----------------------------------------------------------------------------------
def _fmt(eff: dict[str, Any]) -> str:
    if eff["slope_mean"] is None:
        return "n/a"
    return f"{eff['slope_mean']:+.3f} [{eff['slope_min']:+.3f}, {eff['slope_max']:+.3f}]"


def markdown_table(result: dict[str, Any]) -> str:
    """The result as a markdown table (one row per combination)."""
    lines = [
        "| thinking prompt | reasoning suffixes | think token | pairs | separation | "
        "Δ action confidence / scale, in thinking | after thinking | readings kept |",
        "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        eff = r["effect"]
        kept = sum(eff[p]["readings_kept"] for p in PHASES)
        total = sum(eff[p]["readings"] for p in PHASES)
        lines.append(
            f"| {'yes' if r['thinking_prompt'] else 'no'} | "
            f"{'yes' if r['reasoning_suffixes'] else 'no'} | "
            f"{'yes' if r['think_token'] else 'no'} | {r['num_pairs']} | "
            f"{r['mean_separation']:.3f} | {_fmt(eff['thinking'])} | {_fmt(eff['answer'])} | "
            f"{kept}/{total} |")
    lines.append("")
    lines.append("Δ action confidence / scale: least-squares slope of the mean log P(Yes) − "
                 "log P(No) over scales " + ", ".join(f"{s:g}" for s in [0.0, *result["scales"]])
                 + ", mean [min, max] over questions; readings below min_mass "
                 f"{result['probe']['min_mass']} left out.")
    return "\n".join(lines)


def plot_ablation(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: per combination, the slope inside the thinking section and after it
    (error bars: range over questions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for k, (phase, color) in enumerate((("thinking", "tab:blue"), ("answer", "tab:orange"))):
        xs, ys, err = [], [], [[], []]
        for i, r in enumerate(rows):
            e = r["effect"][phase]
            if e["slope_mean"] is None:
                continue
            xs.append(i + (k - 0.5) * width)
            ys.append(e["slope_mean"])
            err[0].append(e["slope_mean"] - e["slope_min"])
            err[1].append(e["slope_max"] - e["slope_mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, color=color,
               label="inside thinking" if phase == "thinking" else "after thinking")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"].replace(" ", "\n") for r in rows], fontsize=7)
    ax.set_ylabel("Δ log P(Yes)/P(No) per unit scale")
    ax.set_title("Reasoning-data ablation: effect of each vector on action confidence")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    samples = [f"\n**Answer-phase sample** (question: {result['sample_question']!r}), "
               f"unsteered: {result['unsteered_answer_sample']!r}\n"]
    for r in result["rows"]:
        samples.append(f"- {r['label']}: " + "; ".join(
            f"scale {s}: {t!r}" for s, t in r["answer_sample"].items()))
    (out / "ablation.md").write_text(markdown_table(result) + "\n" + "\n".join(samples) + "\n")
    plot_ablation(result, out / "ablation.png")
    return [out / "ablation.json", out / "ablation.md", out / "ablation.png"]

"""Early exit on the shipped question sets: tokens saved vs agreement with the answer at
full length, and accuracy against the sets' ``expected`` answers, per trigger kind.

Every question of ``--questions`` (default: the shipped sets) is generated once at full
length (greedy, ``--max-tokens``, the thinking section opened) with a live probe
(``live_generate``, the questions of one choice set in one call) for each trigger kind of
``--triggers``: ``every`` (a reading every ``--every`` tokens) and ``steps`` (reasoning
steps: blank lines, "Wait", ...; at least every ``--steps-every`` tokens). The answer at
full length is the leading choice of the last reading. For each ``stop_when`` setting of
the grid (threshold x consecutive, the probe's ``min_mass``) the rule is applied to those
readings in token order: where it fires, the early answer is the settled choice and the
tokens saved are the tokens generated after that reading. Greedy decoding makes a run that
stops early the prefix of the full run, so this is what early exit does. Accuracy counts
only sets whose ``expected`` is the correct answer (``expected_kind: truth``), never the
model's own answers. ``--verify`` settings are also run for real with ``stop_when`` on
the engine, to check the stop points agree and to count the tokens generated while the
deciding reading was computed. ``--predictor`` also measures a fork-free reading: a
logistic probe on the running sequence's own hidden states (captured at each reading's
last prefix token) trained against the fork readings of the other questions, and reports
how often it agrees with them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import RESULTS_DIR, LoadTracker
from vllm_steer.bench.harness import Benchmark, meta_lines

SHIPPED = ("yes_no_reasoning", "multiple_choice", "arithmetic", "comparisons", "primality",
           "arithmetic_choice", "mood_yes_no", "mood_four_way")
#: Probe settings per trigger kind (``--every`` / ``--steps-every`` fill in the spacing).
TRIGGER_KINDS = ("every", "steps")


def simulate(readings: list[dict[str, Any]], threshold: float, consecutive: int,
             min_mass: float) -> tuple[int, str] | None:
    """Where ``StopWhen(threshold, consecutive)`` fires on ``readings`` (token order):
    ``(token_index, choice)``, or None."""
    from vllm_steer.probe.live_state import StopRule, StopWhen
    from vllm_steer.probe.reading import Reading

    rule = StopRule(StopWhen(threshold=threshold, consecutive=consecutive), min_mass)
    for r in readings:
        choice = rule.settled(None, Reading.from_json(r))
        if choice is not None:
            return r["token_index"], choice
    return None


def leader(reading: dict[str, Any]) -> str:
    return max(reading["probs"], key=reading["probs"].get)


def trigger_probe(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "every":
        return {"every": args.every}
    return {"trigger": "steps", "every": args.steps_every}


def _agree(a: str | None, b: str | None) -> bool:
    from vllm_steer.probe.choices import normalize

    return a is not None and b is not None and normalize(a) == normalize(b)


def grid(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Tokens saved, agreement with the full-length answer and accuracy per setting."""
    from vllm_steer.probe.reading import DEFAULT_MIN_MASS

    out = []
    total = sum(r["tokens"] for r in rows)
    graded = [r for r in rows if r["expected"] is not None]
    for th in args.thresholds:
        for k in args.consecutive:
            saved, agree, fired, correct = 0, 0, 0, 0
            for r in rows:
                hit = simulate(r["readings"], th, k, DEFAULT_MIN_MASS)
                answer = r["full_answer"]
                if hit is not None:
                    fired += 1
                    saved += r["tokens"] - hit[0]
                    agree += hit[1] == r["full_answer"]
                    answer = hit[1]
                if r["expected"] is not None:
                    correct += _agree(answer, r["expected"])
            out.append({"threshold": th, "consecutive": k, "questions": len(rows),
                        "fired": fired, "tokens_saved": saved, "tokens_total": total,
                        "saved_fraction": saved / total if total else 0.0,
                        "agreement_when_fired": agree / fired if fired else None,
                        "agreement_overall": (agree + len(rows) - fired) / len(rows),
                        "accuracy": correct / len(graded) if graded else None})
    return out


def full_runs(llm: Any, items: list[tuple[str, Any, bool]], probe: dict[str, Any],
              max_tokens: int, desc: str) -> list[dict[str, Any]]:
    """Each question generated at full length with a live probe (one ``live_generate``
    call per choice set)."""
    from tqdm import tqdm
    from vllm import SamplingParams

    from vllm_steer.probe import build_prompt
    from vllm_steer.probe.live_drivers import live_generate

    tok = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, (_, q, _) in enumerate(items):
        groups.setdefault(tuple(q.choices), []).append(i)
    rows: list[dict[str, Any] | None] = [None] * len(items)
    for choices, idx in tqdm(groups.items(), desc=desc):
        prompts = [build_prompt(tok, items[i][1].text, open_thinking="<think>\n") for i in idx]
        res = live_generate(llm, prompts, sp, {"choices": list(choices), **probe})
        for i, r, prompt in zip(idx, res, prompts, strict=True):
            set_name, q, graded = items[i]
            rs = r.readings[0]
            rows[i] = {"set": set_name, "question": q.text, "choices": list(choices),
                       "expected": q.expected if graded else None,
                       "tokens": len(r.output.outputs[0].token_ids),
                       "prompt_ids": prompt, "token_ids": list(r.output.outputs[0].token_ids),
                       "full_answer": leader(rs[-1]), "readings": rs}
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm
    from vllm import SamplingParams

    from vllm_steer.llm_factory import make_llm, shutdown
    from vllm_steer.locations import shipped_configs
    from vllm_steer.probe import build_prompt
    from vllm_steer.probe.live_drivers import live_generate
    from vllm_steer.probe.questions import load_questions
    from vllm_steer.probe.reading import DEFAULT_MIN_MASS

    llm = make_llm(args.model, enforce_eager=True, block_size=32, max_model_len=2048)
    tok = llm.get_tokenizer()
    items = []
    for name in args.questions:
        path = Path(name) if name.endswith(".yaml") else \
            shipped_configs() / "questions" / f"{name}.yaml"
        qs = load_questions(path)
        for q in qs.questions[: args.limit]:
            items.append((path.stem, q, qs.graded))
    load = LoadTracker()
    by_trigger: dict[str, Any] = {}
    for kind in args.triggers:
        rows = full_runs(llm, items, trigger_probe(kind, args), args.max_tokens,
                         f"full-length runs ({kind})")
        graded = [r for r in rows if r["expected"] is not None]
        by_trigger[kind] = {
            "probe": trigger_probe(kind, args), "rows": rows, "grid": grid(rows, args),
            "accuracy_full": (sum(_agree(r["full_answer"], r["expected"]) for r in graded)
                              / len(graded)) if graded else None,
            "graded": len(graded),
            "readings_per_question": sum(len(r["readings"]) for r in rows) / len(rows)}
    verify = []
    kind0 = args.triggers[0]
    rows0 = by_trigger[kind0]["rows"]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for th, k in args.verify:
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(rows0):
            groups.setdefault(tuple(r["choices"]), []).append(i)
        got: dict[int, Any] = {}
        for choices, idx in tqdm(groups.items(), desc=f"verify {th}/{k}"):
            prompts = [build_prompt(tok, rows0[i]["question"], open_thinking="<think>\n")
                       for i in idx]
            res = live_generate(llm, prompts, sp, {
                "choices": list(choices), **trigger_probe(kind0, args),
                "stop_when": {"threshold": th, "consecutive": k}})
            got.update(zip(idx, res, strict=True))
        for i, r in enumerate(rows0):
            stop = got[i].stops.get(0)
            verify.append({"threshold": th, "consecutive": k, "question": r["question"],
                           "simulated": simulate(r["readings"], th, k, DEFAULT_MIN_MASS),
                           "engine": None if stop is None else [stop.point.token_index,
                                                                stop.choice],
                           "generated": len(got[i].output.outputs[0].token_ids)})
    predictor = None
    if args.predictor:
        predictor = predictor_agreement(llm, by_trigger[kind0]["rows"], args.predictor_layers)
    shutdown(llm)
    for b in by_trigger.values():
        for r in b["rows"]:
            r.pop("prompt_ids", None)
            r.pop("token_ids", None)
    out = {"load": load.finish(), "by_trigger": by_trigger, "verify": verify,
           "verify_trigger": kind0}
    if predictor is not None:
        out["predictor"] = predictor
    return out


# -- a fork-free reading from the running sequence's hidden states ----------------------------
def _fit_logistic(x: Any, y: Any, steps: int = 300, l2: float = 1e-2) -> Any:
    """Weights of a logistic regression (bias last) on standardized ``x`` [n, d]."""
    import torch

    w = torch.zeros(x.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y) \
            + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _corr(a: Any, b: Any) -> float | None:
    import numpy as np

    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def predictor_agreement(llm: Any, rows: list[dict[str, Any]], layers: list[int],
                        folds: int = 5) -> dict[str, Any]:
    """Agreement of a logistic probe on hidden states with the fork readings.

    Two-choice questions only: for each reading at token ``t`` the block outputs at the
    sequence's last prefix token (``prompt + generated[:t]``, position ``len - 1``) are
    captured through the engine (``extract.engine_hidden.capture_hidden``); per layer a
    logistic regression predicts whether the first choice leads, trained on the readings
    of the other questions (``folds`` folds by question). Reported per layer: how often
    its leader equals the fork reading's, and the same among its confident predictions
    (p >= 0.9 or <= 0.1) with their share (where it could replace a fork)."""
    import numpy as np
    import torch

    from vllm_steer.extract.engine_hidden import CaptureRequest, run_captures

    binary = [r for r in rows if len(r["choices"]) == 2]
    prompts, index = [], []
    for qi, r in enumerate(binary):
        seq = r["prompt_ids"] + r["token_ids"]
        pos = [len(r["prompt_ids"]) + x["token_index"] - 1 for x in r["readings"]]
        prompts.append(seq[:max(pos) + 1] if pos else seq)
        index.append((qi, pos))
    feats: dict[int, list[Any]] = {layer: [] for layer in layers}
    labels, probs, groups = [], [], []
    reqs = [CaptureRequest(p, {"layers": list(layers), "at": "positions",
                               "positions": sorted(set(pos))})
            for p, (_, pos) in zip(prompts, index, strict=True)]
    recs = run_captures(llm, reqs, desc="capture hidden states")
    for (qi, pos), rec, r in zip(index, recs, binary, strict=True):
        cols = {p: j for j, p in enumerate(sorted(set(pos)))}
        first = r["choices"][0]
        for p, x in zip(pos, r["readings"], strict=True):
            for li, layer in enumerate(layers):
                feats[layer].append(rec["values"][li, cols[p]])
            labels.append(1.0 if x["probs"][first] >= 0.5 else 0.0)
            probs.append(x["probs"][first])
            groups.append(qi)
    y = torch.tensor(labels)
    g = np.array(groups)
    out: dict[str, Any] = {"questions": len(binary), "readings": len(labels), "layers": {}}
    for layer in layers:
        x = torch.tensor(np.stack(feats[layer]), dtype=torch.float32)
        pred = torch.zeros(len(y))
        for f in range(folds):
            test = torch.tensor(g % folds == f)
            if not test.any() or test.all():
                continue
            mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
            w = _fit_logistic((x[~test] - mu) / sd, y[~test])
            xt = (x[test] - mu) / sd
            pred[test] = torch.sigmoid(torch.cat([xt, torch.ones(len(xt), 1)], 1) @ w)
        agree = ((pred >= 0.5).float() == y).float()
        conf = (pred >= 0.9) | (pred <= 0.1)
        out["layers"][str(layer)] = {
            "agreement": float(agree.mean()),
            "confident_share": float(conf.float().mean()),
            "confident_agreement": float(agree[conf].mean()) if conf.any() else None,
            "corr_with_fork_prob": _corr(pred.numpy(), np.array(probs)),
            "majority_baseline": float(max(y.mean(), 1 - y.mean()))}
    return out


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(res["by_trigger"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        seen = set()
        for g in res["by_trigger"][kind]["grid"]:
            k = g["consecutive"]
            ax.scatter(100 * g["saved_fraction"], 100 * g["agreement_overall"], s=20 + 10 * k,
                       color=f"C{k}", label=None if k in seen else f"{k} consecutive")
            seen.add(k)
            ax.annotate(f"{g['threshold']:g}/{g['consecutive']}",
                        (100 * g["saved_fraction"], 100 * g["agreement_overall"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
        ax.set_xlabel("tokens saved (% of full-length tokens)")
        ax.set_ylabel("early answer = answer at full length (% of questions)")
        ax.set_title(f"early exit, trigger {kind}: stop_when threshold/consecutive")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def settings(s: str) -> list[tuple[float, int]]:
    """``"0.9/2,0.6/1"`` -> ``[(0.9, 2), (0.6, 1)]`` (threshold/consecutive)."""
    return [(float(t), int(k)) for t, k in (v.split("/") for v in s.split(",") if v)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--questions", nargs="+", default=list(SHIPPED),
                   help="shipped set names or YAML paths")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--triggers", nargs="+", choices=TRIGGER_KINDS, default=list(TRIGGER_KINDS))
    p.add_argument("--every", type=int, default=16, help="spacing of trigger 'every'")
    p.add_argument("--steps-every", type=int, default=64,
                   help="fallback of trigger 'steps' (a reading at least every N tokens)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 0.95])
    p.add_argument("--consecutive", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--verify", type=settings, default="0.9/2",
                   help="threshold/consecutive settings also run for real (comma-separated), "
                        "with the first trigger kind")
    p.add_argument("--predictor", action="store_true",
                   help="also measure a hidden-state predictor of the fork readings")
    p.add_argument("--predictor-layers", type=int, nargs="+", default=[8, 14, 20, 26])


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"workload": {"questions": args.questions, "limit": args.limit,
                                        "max_tokens": args.max_tokens, "every": args.every,
                                        "steps_every": args.steps_every,
                                        "triggers": args.triggers}}
    res.update(measure(args))
    plot(res, RESULTS_DIR / f"{args.result}.png")
    return res


# -- report ---------------------------------------------------------------------------
def _grid_table(grid: list[dict[str, Any]]) -> list[str]:
    out = ["| threshold | consecutive | stopped early | tokens saved | early answer = answer "
           "at full length (stopped ones) | (all questions) | accuracy with early exit |",
           "|---|---|---|---|---|---|---|"]
    for g in grid:
        agree = "n/a" if g["agreement_when_fired"] is None else \
            f"{100 * g['agreement_when_fired']:.0f}%"
        acc = "n/a" if g.get("accuracy") is None else f"{100 * g['accuracy']:.0f}%"
        out.append(f"| {g['threshold']:g} | {g['consecutive']} | {g['fired']}/{g['questions']}"
                   f" | {100 * g['saved_fraction']:.0f}% | {agree} | "
                   f"{100 * g['agreement_overall']:.0f}% | {acc} |")
    return out


def early_exit_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    by = d.get("by_trigger") or {"every": {"rows": d["rows"], "grid": d["grid"]}}
    rows0 = next(iter(by.values()))["rows"]
    out = ["### Early exit on the shipped question sets", "", *meta_lines(d),
           f"- {len(rows0)} questions ({', '.join(wl['questions'])}), greedy, up to "
           f"{wl['max_tokens']} tokens (natural end), thinking section opened"]
    for kind, b in by.items():
        rows = b["rows"]
        probe = b.get("probe") or {"every": wl["every"]}
        out += ["", f"Trigger `{kind}` (`{json.dumps(probe)}`): "
                f"{sum(r['tokens'] for r in rows)} tokens at full length"
                + (f", {b['readings_per_question']:.1f} readings per question"
                   if "readings_per_question" in b else "")
                + (f"; accuracy at full length {100 * b['accuracy_full']:.0f}% over the "
                   f"{b['graded']} questions whose sets give the correct answer"
                   if b.get("accuracy_full") is not None else ""), "", *_grid_table(b["grid"])]
    if d.get("verify"):
        v = d["verify"]
        vrows = by[d.get("verify_trigger", "every")]["rows"]
        same = sum(x["simulated"] == x["engine"] for x in v)   # both JSON lists (or null)
        full = {r["question"]: r["tokens"] for r in vrows}
        gen, tot = sum(x["generated"] for x in v), sum(full[x["question"]] for x in v)
        out += ["", "Tokens saved above count from the deciding reading's position. Run for "
                f"real with `stop_when` ({v[0]['threshold']:g}/{v[0]['consecutive']}, trigger "
                f"`{d.get('verify_trigger', 'every')}`): the "
                f"engine stopped where the rule on the full-length readings says for "
                f"{same}/{len(v)} questions, and generated {gen} of the {tot} full-length "
                f"tokens ({100 * (1 - gen / tot):.0f}% saved; the difference to the table is "
                "what it generated while the deciding reading was computed)."]
    if d.get("predictor"):
        p = d["predictor"]
        out += ["", f"Fork-free readings: a logistic probe on the running sequence's hidden "
                f"state at each reading's last prefix token, trained against the fork readings"
                f" of the other questions (5 folds by question; {p['readings']} readings of "
                f"{p['questions']} two-choice questions):", "",
                "| layer | same leader as the fork reading | confident (p >= 0.9 or <= 0.1) | "
                "same leader when confident | corr. with the fork's probability | majority "
                "baseline |", "|---|---|---|---|---|---|"]
        for layer, x in p["layers"].items():
            ca = "n/a" if x["confident_agreement"] is None else \
                f"{100 * x['confident_agreement']:.0f}%"
            corr = "n/a" if x["corr_with_fork_prob"] is None else \
                f"{x['corr_with_fork_prob']:.2f}"
            out.append(f"| {layer} | {100 * x['agreement']:.0f}% | "
                       f"{100 * x['confident_share']:.0f}% | {ca} | {corr} | "
                       f"{100 * x['majority_baseline']:.0f}% |")
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="early-exit", module="early_exit", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"questions": ["yes_no_reasoning"], "limit": 2, "max_tokens": 32,
           "verify": [(0.6, 1)]},
    sections={"early_exit": early_exit_section})

if __name__ == "__main__":
    BENCHMARK.main()

"""Early exit on the shipped question sets: tokens saved vs agreement with the answer at
full length.

Every question of ``--questions`` (default: the four shipped sets) is generated once at
full length (greedy, ``--max-tokens``, the thinking section opened) with a live probe every
``--every`` tokens (``live_generate``). The answer at full length is the leading choice
of the last reading. For each ``stop_when`` setting of the grid (threshold x
consecutive, the probe's ``min_mass``) the rule is applied to those readings in token
order: where it fires, the early answer is the settled choice and the tokens saved are
the tokens generated after that reading. Greedy decoding makes a run that stops early
the prefix of the full run, so this is what early exit does; ``--verify`` settings are
also run for real with ``stop_when`` on the engine, to check the stop points agree and
to count the tokens generated while the deciding reading was computed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import RESULTS_DIR, LoadTracker
from vllm_steer.bench.harness import Benchmark, meta_lines

SHIPPED = ("yes_no_reasoning", "multiple_choice", "mood_yes_no", "mood_four_way")


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
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    items = []
    for name in args.questions:
        path = Path(name) if name.endswith(".yaml") else \
            shipped_configs() / "questions" / f"{name}.yaml"
        qs = load_questions(path)
        for q in qs.questions[: args.limit]:
            items.append((path.stem, q))
    load = LoadTracker()
    rows = []
    for set_name, q in tqdm(items, desc="full-length runs"):
        prompt = build_prompt(tok, q.text, open_thinking="<think>\n")
        (res,) = live_generate(llm, [prompt], sp, {"choices": list(q.choices),
                                                   "every": args.every})
        rs = res.readings[0]
        rows.append({"set": set_name, "question": q.text, "choices": list(q.choices),
                     "expected": q.expected, "tokens": len(res.output.outputs[0].token_ids),
                     "full_answer": leader(rs[-1]), "readings": rs})
    grid = []
    for th in args.thresholds:
        for k in args.consecutive:
            saved, agree, fired = 0, 0, 0
            total = sum(r["tokens"] for r in rows)
            for r in rows:
                hit = simulate(r["readings"], th, k, DEFAULT_MIN_MASS)
                if hit is None:
                    continue
                fired += 1
                saved += r["tokens"] - hit[0]
                agree += hit[1] == r["full_answer"]
            grid.append({"threshold": th, "consecutive": k, "questions": len(rows),
                         "fired": fired, "tokens_saved": saved, "tokens_total": total,
                         "saved_fraction": saved / total if total else 0.0,
                         "agreement_when_fired": agree / fired if fired else None,
                         "agreement_overall": (agree + len(rows) - fired) / len(rows)})
    verify = []
    for th, k in args.verify:
        for r in tqdm(rows, desc=f"verify {th}/{k}"):
            want = simulate(r["readings"], th, k, DEFAULT_MIN_MASS)
            prompt = build_prompt(tok, r["question"], open_thinking="<think>\n")
            (res,) = live_generate(llm, [prompt], sp, {
                "choices": r["choices"], "every": args.every,
                "stop_when": {"threshold": th, "consecutive": k}})
            got = res.stops.get(0)
            verify.append({"threshold": th, "consecutive": k, "question": r["question"],
                           "simulated": want,
                           "engine": None if got is None else [got.point.token_index,
                                                               got.choice],
                           "generated": len(res.output.outputs[0].token_ids)})
    shutdown(llm)
    return {"load": load.finish(), "rows": rows, "grid": grid, "verify": verify}


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seen = set()
    for g in res["grid"]:
        k = g["consecutive"]
        ax.scatter(100 * g["saved_fraction"], 100 * g["agreement_overall"], s=20 + 10 * k,
                   color=f"C{k}", label=None if k in seen else f"{k} consecutive")
        seen.add(k)
        ax.annotate(f"{g['threshold']:g}/{g['consecutive']}",
                    (100 * g["saved_fraction"], 100 * g["agreement_overall"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
    ax.set_xlabel("tokens saved (% of full-length tokens)")
    ax.set_ylabel("early answer = answer at full length (% of questions)")
    ax.set_title("early exit: stop_when threshold/consecutive")
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
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 0.95])
    p.add_argument("--consecutive", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--verify", type=settings, default="0.9/2",
                   help="threshold/consecutive settings also run for real (comma-separated)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"workload": {"questions": args.questions, "limit": args.limit,
                                        "max_tokens": args.max_tokens, "every": args.every}}
    res.update(measure(args))
    plot(res, RESULTS_DIR / f"{args.result}.png")
    return res


# -- report ---------------------------------------------------------------------------
def early_exit_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    rows = d["rows"]
    out = ["### Early exit on the shipped question sets", "", *meta_lines(d),
           f"- {len(rows)} questions ({', '.join(wl['questions'])}), greedy, up to "
           f"{wl['max_tokens']} tokens (natural end), thinking section opened, a reading "
           f"every {wl['every']} tokens; {sum(r['tokens'] for r in rows)} tokens at full "
           "length", "",
           "| threshold | consecutive | stopped early | tokens saved | early answer = answer "
           "at full length (stopped ones) | (all questions) |", "|---|---|---|---|---|---|"]
    for g in d["grid"]:
        agree = "n/a" if g["agreement_when_fired"] is None else \
            f"{100 * g['agreement_when_fired']:.0f}%"
        out.append(f"| {g['threshold']:g} | {g['consecutive']} | {g['fired']}/{g['questions']}"
                   f" | {100 * g['saved_fraction']:.0f}% | {agree} | "
                   f"{100 * g['agreement_overall']:.0f}% |")
    if d.get("verify"):
        v = d["verify"]
        same = sum(x["simulated"] == x["engine"] for x in v)   # both JSON lists (or null)
        full = {r["question"]: r["tokens"] for r in rows}
        gen, tot = sum(x["generated"] for x in v), sum(full[x["question"]] for x in v)
        out += ["", "Tokens saved above count from the deciding reading's position. Run for "
                f"real with `stop_when` ({v[0]['threshold']:g}/{v[0]['consecutive']}): the "
                f"engine stopped where the rule on the full-length readings says for "
                f"{same}/{len(v)} questions, and generated {gen} of the {tot} full-length "
                f"tokens ({100 * (1 - gen / tot):.0f}% saved; the difference to the table is "
                "what it generated while the deciding reading was computed)."]
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="early-exit", module="early_exit", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"questions": ["yes_no_reasoning"], "limit": 2, "max_tokens": 32,
           "verify": [(0.6, 1)]},
    sections={"early_exit": early_exit_section})

if __name__ == "__main__":
    BENCHMARK.main()

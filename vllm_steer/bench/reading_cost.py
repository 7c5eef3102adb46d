"""What one reading costs: prompt tokens computed (vLLM's counters) and engine time, per
choice set and fork placement.

Per repetition a fresh trajectory (``--traj-tokens`` generated tokens, greedy,
ignore_eos, the thinking section opened) is probed at the same triggers (every
``--every`` tokens) with each variant, in shuffled order: a choice set (``Yes,No``;
``20,30,40,50``, multi-token) x a placement (``align``: ``none`` forks exactly at the
trigger; ``prefix`` moves it back to where the sequence prefix ends on a KV block;
``base`` to where the whole fork base does, so that every fork of a multi-token reading
shares it through the cache). Each variant runs on its own copy of the trajectory under
its own cache salt (nothing one variant computed is reused by another). Timed: the fork
and gap stages (the requests a probe submits for the readings). Per reading: prompt
tokens computed (``len(prompt) - num_cached_tokens`` of each request, summed), engine
requests, seconds; ratios multi-token / Yes-No per repetition, at the same placement and
against Yes/No at each placement.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from vllm_steer.bench.common import LoadTracker, interleaved, summarize
from vllm_steer.bench.harness import Benchmark, cell, comma_list, meta_lines

QUESTION = ("A train travels 120 km in 3 hours. What is its average speed in km/h? (case {k}) "
            "Think step by step inside <think> </think>, then answer {choices}.")
CHOICE_SETS = {"yes_no": ["Yes", "No"], "multi": ["20", "30", "40", "50"]}
ALIGNS = ("none", "prefix", "base")


def _job(tok: Any, prompt: list[int], gen: list[int] | None, choices: list[str], align: str,
         args: argparse.Namespace, salt: str) -> Any:
    from types import SimpleNamespace

    from vllm_steer.probe import ProbeConfig
    from vllm_steer.probe.job import ProbeJob

    cfg = ProbeConfig(choices=choices, every=args.every, max_tokens=args.traj_tokens,
                      ignore_eos=True, align=align)
    job = ProbeJob(tok, [prompt], [None], cfg, max_model_len=2048, block_size=args.block_size,
                   cache_salt=salt)
    if gen is not None:
        job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(token_ids=gen)])])
    return job


def _trajectory(llm: Any, job: Any) -> list[int]:
    (p, sp), = job.requests("trajectories")
    job.take("trajectories", llm.generate([p], [sp], use_tqdm=False))
    return job.trajs[0].token_ids


def _time_forks(llm: Any, job: Any) -> float:
    t0 = time.perf_counter()
    for stage in ("forks", "gaps"):
        reqs = job.requests(stage)
        outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False) \
            if reqs else []
        job.take(stage, outs)
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from vllm_steer.llm_factory import make_llm, shutdown
    from vllm_steer.probe import build_prompt

    llm = make_llm(args.model, enforce_eager=True, dtype="float32", block_size=args.block_size,
                   max_model_len=2048)
    tok = llm.get_tokenizer()
    variants = [f"{c}@{a}" for c in CHOICE_SETS for a in args.aligns]
    load = LoadTracker()
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    gens: dict[int, tuple[list[int], list[int]]] = {}
    warm = _job(tok, build_prompt(tok, "Warm up."), None, ["Yes", "No"], "none", args, "warm")
    _trajectory(llm, warm)
    _time_forks(llm, warm)
    for rep, v in tqdm(interleaved(variants, args.reps, seed=26), desc="reading cost"):
        cs, align = v.split("@")
        if rep not in gens:
            prompt = build_prompt(tok, QUESTION.format(k=rep, choices="20, 30, 40 or 50"),
                                  open_thinking="<think>\n")
            gens[rep] = (prompt, _trajectory(llm, _job(tok, prompt, None, ["Yes", "No"], "none",
                                                       args, f"gen-{rep}")))
        prompt, gen = gens[rep]
        salt = f"cost-{uuid.uuid4().hex}"
        job = _job(tok, prompt, None, CHOICE_SETS[cs], align, args, salt)
        again = _trajectory(llm, job)   # the trajectory's blocks, under this variant's salt
        if again != gen:   # greedy: the same tokens; else use the first ones (noted)
            job = _job(tok, prompt, gen, CHOICE_SETS[cs], align, args, salt)
        seconds = _time_forks(llm, job)
        rs = job.trajs[0].readings
        inner = [r for r in rs if r.trigger not in ("start", "end")]
        runs[v][rep] = {
            "seconds": seconds, "readings": len(rs), "seconds_per_reading": seconds / len(rs),
            "computed_per_reading": sum(r.computed_tokens for r in rs) / len(rs),
            "computed_per_inner_reading": sum(r.computed_tokens for r in inner) / max(
                1, len(inner)),
            "requests_per_reading": sum(r.requests for r in rs) / len(rs),
            "points": [r.token_index for r in rs], "same_trajectory": again == gen}
    shutdown(llm)
    out: dict[str, Any] = {"load": load.finish(), "variants": {}}
    for v in variants:
        out["variants"][v] = {k: summarize(runs[v][r][k] for r in range(args.reps))
                              for k in ("seconds_per_reading", "computed_per_reading",
                                        "computed_per_inner_reading", "requests_per_reading",
                                        "readings")}
    ratios: dict[str, Any] = {}
    for a in args.aligns:
        for b in args.aligns:
            m, y = runs[f"multi@{a}"], runs[f"yes_no@{b}"]
            ratios[f"multi@{a} / yes_no@{b}"] = {
                "tokens": summarize(m[r]["computed_per_reading"] / y[r]["computed_per_reading"]
                                    for r in range(args.reps)),
                "seconds": summarize(m[r]["seconds_per_reading"] / y[r]["seconds_per_reading"]
                                     for r in range(args.reps))}
    out["ratios"] = ratios
    out["runs"] = runs
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--traj-tokens", type=int, default=256)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--aligns", type=comma_list(str), default=",".join(ALIGNS))


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"workload": {"trajectory_tokens": args.traj_tokens,
                                        "every": args.every, "block_size": args.block_size,
                                        "aligns": args.aligns,
                                        "choice_sets": {k: ",".join(v)
                                                        for k, v in CHOICE_SETS.items()}}}
    res.update(measure(args))
    return res


# -- report ---------------------------------------------------------------------------
def reading_cost_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    out = ["### What one reading costs: Yes/No vs multi-token choices, per fork placement", "",
           *meta_lines(d),
           f"- trajectory {wl['trajectory_tokens']} generated tokens (thinking section "
           f"opened), triggers every {wl['every']} tokens, block size {wl['block_size']}, "
           f"eager engine; choice sets {wl['choice_sets']}; each variant under its own cache "
           "salt", "",
           "| choices @ placement | readings | prompt tokens computed per reading (all / "
           "between start and end) | requests per reading | ms per reading |",
           "|---|---|---|---|---|"]
    for v, x in d["variants"].items():
        ms = {k: (val * 1000 if isinstance(val, float) else val) for k, val in
              x["seconds_per_reading"].items() if k != "values"}
        out.append(f"| {v} | {cell(x['readings'], digits=0)} | "
                   f"{cell(x['computed_per_reading'], digits=1)} / "
                   f"{cell(x['computed_per_inner_reading'], digits=1)} | "
                   f"{cell(x['requests_per_reading'], digits=1)} | {cell(ms, digits=1)} |")
    out += ["", "| ratio per repetition (goal <= 3) | prompt tokens computed per reading | "
            "time per reading |", "|---|---|---|"]
    for k, r in d["ratios"].items():
        out.append(f"| {k} | {cell(r['tokens'], digits=2)} | {cell(r['seconds'], digits=2)} |")
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="readings", module="reading_cost", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"traj_tokens": 48, "reps": 1}, reps=3,
    sections={"reading_cost": reading_cost_section})

if __name__ == "__main__":
    BENCHMARK.main()

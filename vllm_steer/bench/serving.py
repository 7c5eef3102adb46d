"""Benchmark 4: serving. ``vllm bench serve`` against ``vllm-steer serve`` (eager engine).

- throughput / TTFT / ITL percentiles for unsteered vs steered requests (steering sent as
  ``--extra-body '{"vllm_xargs": {"steer": "all30"}}'``, i.e. vLLM's own ``vllm_xargs``),
  runs interleaved (shuffled per repetition), ratios per repetition;
- the TTFT cost of a vector the engine has not used yet: single streamed requests, one at
  a time, each with a fresh prompt: ``first`` (a registered vector never used before),
  ``repeat`` (the same vector right after), ``unsteered``; ratios to ``unsteered`` and
  ``first / repeat`` per round.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

from vllm_steer.bench.common import (
    BENCH_VECTORS,
    WORK_DIR,
    LoadTracker,
    bench_server,
    interleaved,
    summarize,
    write_vectors,
)
from vllm_steer.bench.harness import Benchmark, cell, meta_lines

KEYS = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
        "p90_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p90_itl_ms",
        "p99_itl_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")


def _ttft(url: str, model: str, prompt: list[int], xargs: dict[str, Any] | None,
          max_tokens: int) -> float:
    """Seconds to the first streamed token of one /v1/completions request."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "stream": True, "temperature": 0.0, "ignore_eos": True}
    if xargs:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data:") and first is None and b"[DONE]" not in line:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no streamed token")
    return first


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--first-use-rounds", type=int, default=8)
    p.add_argument("--compiled", action="store_true", help="server in compiled mode")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from vllm_steer.default_model import resolve_model

    tag = "_quick" if args.quick else ""
    fresh = {f"fresh{i}": range(30) for i in range(args.first_use_rounds)}
    reg = write_vectors(WORK_DIR / f"serving{tag}", {**BENCH_VECTORS, **fresh}, seed=99)
    model = str(resolve_model(None))
    res: dict[str, Any] = {}
    with bench_server(WORK_DIR / f"serving_server{tag}.log", reg, args.compiled) as srv:
        res["server_command"] = " ".join(srv.argv)
        res["server_start_s"] = round(srv.startup_s, 1)
        res["bench"] = run_bench_serve(args, srv.url, model, tag)
        res["first_use"] = run_first_use(args, srv.url, tqdm)
    return res


def run_bench_serve(args: argparse.Namespace, url: str, model: str, tag: str) -> dict[str, Any]:
    from tqdm import tqdm

    out_dir = WORK_DIR / f"serve_runs{tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = {"unsteered": None, "steered": {"vllm_xargs": {"steer": "all30"}}}
    load = LoadTracker()
    raw: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    cmds = {}
    for rep, v in tqdm(interleaved(list(variants), args.reps), desc="vllm bench serve"):
        fname = f"{v}_{rep}.json"
        cmd = [sys.executable, "-m", "vllm_steer.server.vllm_cli", "bench", "serve",
               "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
               "--model", "bench", "--tokenizer", model, "--dataset-name", "random",
               "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--ignore-eos", "--seed", str(rep),
               "--request-rate", "inf", "--percentile-metrics", "ttft,tpot,itl",
               "--metric-percentiles", "50,90,99", "--save-result", "--result-dir",
               str(out_dir), "--result-filename", fname, "--disable-tqdm"]
        if variants[v]:
            cmd += ["--extra-body", json.dumps(variants[v])]
        cmds[v] = " ".join(cmd)
        with open(out_dir / f"{v}_{rep}.log", "w") as lf:
            subprocess.run(cmd, check=True, stdout=lf, stderr=subprocess.STDOUT)
        data = json.loads((out_dir / fname).read_text())
        raw[v][rep] = {k: data[k] for k in KEYS if k in data}
    res: dict[str, Any] = {"load": load.finish(), "commands": cmds, "raw": raw,
                           "workload": {"num_prompts": args.num_prompts,
                                        "input_len": args.input_len,
                                        "output_len": args.output_len, "request_rate": "inf"}}
    res["ratios_steered_over_unsteered"] = {
        k: summarize(raw["steered"][r][k] / raw["unsteered"][r][k]
                     for r in raw["steered"] if r in raw["unsteered"]
                     and raw["unsteered"][r].get(k))
        for k in KEYS if k in next(iter(raw["unsteered"].values()), {})}
    return res


def run_first_use(args: argparse.Namespace, url: str, tqdm: Any) -> dict[str, Any]:
    rng = random.Random(5)
    load = LoadTracker()

    def prompt() -> list[int]:
        return [rng.randrange(300, 49000) for _ in range(args.input_len)]

    _ttft(url, "bench", prompt(), None, 2)  # warm-up
    _ttft(url, "bench", prompt(), {"steer": "all30"}, 2)
    t: dict[str, dict[int, float]] = {"first": {}, "repeat": {}, "unsteered": {}}
    for i in tqdm(range(args.first_use_rounds), desc="first-use TTFT"):
        order = ["unsteered", "first", "repeat"]
        rng.shuffle(order)
        # "repeat" must come after "first": keep their relative order
        if order.index("repeat") < order.index("first"):
            a, b = order.index("repeat"), order.index("first")
            order[a], order[b] = order[b], order[a]
        for v in order:
            xargs = None if v == "unsteered" else {"steer": f"fresh{i}"}
            t[v][i] = _ttft(url, "bench", prompt(), xargs, 4)
    return {"load": load.finish(),
            "ttft_ms": {v: summarize(1000 * x for x in d.values()) for v, d in t.items()},
            "ratio_first_over_repeat": summarize(t["first"][i] / t["repeat"][i]
                                                 for i in t["first"]),
            "ratio_first_over_unsteered": summarize(t["first"][i] / t["unsteered"][i]
                                                    for i in t["first"]),
            "ratio_repeat_over_unsteered": summarize(t["repeat"][i] / t["unsteered"][i]
                                                     for i in t["first"])}


# -- report ---------------------------------------------------------------------------
def serving_section(d: dict[str, Any]) -> list[str]:
    b, f = d["bench"], d["first_use"]
    wl = b["workload"]
    out = ["### Serving (`vllm bench serve` against `vllm-steer serve`)", "", *meta_lines(d),
           f"- server: `{d['server_command']}`",
           f"- bench: {wl['num_prompts']} prompts, random input {wl['input_len']} / output "
           f"{wl['output_len']} tokens, request rate inf, ignore_eos; steered = "
           "`--extra-body '{\"vllm_xargs\": {\"steer\": \"all30\"}}'`",
           f"- load during bench runs: {b['load']}", "",
           "| metric | unsteered (median of runs) | steered (median of runs) | "
           "steered / unsteered per rep |", "|---|---|---|---|"]
    for k, r in b["ratios_steered_over_unsteered"].items():
        med = {v: statistics.median(x[k] for x in b["raw"][v].values() if k in x)
               for v in ("unsteered", "steered")}
        out.append(f"| {k} | {med['unsteered']:.1f} | {med['steered']:.1f} | "
                   f"{cell(r, digits=3)} |")
    out += ["", "First use of a vector (single streamed requests, 4 tokens, fresh prompts):",
            "", "| request | TTFT ms |", "|---|---|"]
    for v, r in f["ttft_ms"].items():
        out.append(f"| {v} | {cell(r, digits=1)} |")
    out += ["", f"- TTFT first use / repeated use: {cell(f['ratio_first_over_repeat'], digits=2)}",
            f"- TTFT first use / unsteered: {cell(f['ratio_first_over_unsteered'], digits=2)}",
            f"- TTFT repeated use / unsteered: "
            f"{cell(f['ratio_repeat_over_unsteered'], digits=2)}", ""]
    return out


BENCHMARK = Benchmark(
    name="serving", module="serving", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"num_prompts": 4, "output_len": 8, "reps": 1, "first_use_rounds": 2}, reps=3,
    sections={"serving": serving_section})

if __name__ == "__main__":
    BENCHMARK.main()

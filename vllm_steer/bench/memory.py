"""Benchmark 5: memory. Steering-table bytes (per slot, in total, from the workers'
``vllm_steer_stats``) and peak RSS/PSS of the whole engine process tree, each variant in
a fresh subprocess (interleaved over repetitions):

- ``plugin_off``: ``VLLMSTEER_DISABLE=1`` (plugin not loaded), unsteered workload;
- ``unsteered``: plugin loaded, unsteered workload;
- ``steered``: plugin loaded, every request a distinct composed vector (all slots used).

Ratios are peak(variant) / peak(plugin_off) of the same repetition.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from vllm_steer.bench.common import (
    HIDDEN,
    NUM_LAYERS,
    WORK_DIR,
    LoadTracker,
    Worker,
    bench_registry,
    interleaved,
    random_prompts,
    serve_commands,
    summarize,
)
from vllm_steer.bench.harness import Benchmark, cell, comma_list, meta_lines

VARIANTS = ("plugin_off", "unsteered", "steered")


def worker(args: argparse.Namespace) -> None:
    from vllm import SamplingParams

    from vllm_steer.llm_factory import make_llm

    bench_registry()
    llm = make_llm(enforce_eager=True, dtype="float32", max_num_seqs=args.prompts,
                   max_model_len=2048)

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        steered = cmd["variant"] == "steered"
        prompts = random_prompts(args.prompts, 32, seed=3)
        params = [SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.8,
                                 extra_args={"steering": {"vectors": [
                                     {"name": "all30", "scale": 1.0 + 0.001 * i}]}}
                                 if steered else None) for i in range(len(prompts))]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        try:
            stats = llm.collective_rpc("vllm_steer_stats")
        except Exception as e:  # plugin disabled: the worker method does not exist
            stats = [f"unavailable: {type(e).__name__}"]
        return {"stats": stats}

    serve_commands(handle)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=64, help="requests = max_num_seqs")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--variants", type=comma_list(), default=",".join(VARIANTS))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    bench_registry()
    res: dict[str, Any] = {"workload": {
        "prompts": args.prompts, "max_num_seqs": args.prompts, "max_tokens": args.tokens,
        "enforce_eager": True, "dtype": "float32"}}
    load = LoadTracker()
    raw: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in args.variants}
    tag = "_quick" if args.quick else ""
    for rep, v in tqdm(interleaved(args.variants, args.reps), desc="memory"):
        env = dict(os.environ)
        env.pop("VLLMSTEER_DISABLE", None)
        env.pop("VLLM_STEER_DISABLE", None)  # the deprecated spelling
        if v == "plugin_off":
            env["VLLMSTEER_DISABLE"] = "1"
        w = Worker(BENCHMARK.worker_command(args.argv, v), WORK_DIR / f"memory_{v}{tag}.log",
                   env=env)
        w.recv()
        reply = w.call(variant=v)
        raw[v][rep] = {**w.close(), **reply}
    res["load"] = load.finish()
    res["raw"] = raw
    stats = next((x["stats"][0] for d in raw.values() for x in d.values()
                  if x["stats"] and isinstance(x["stats"][0], dict)), None)
    # per layer: delta row + per projection (direction row, two scalars); one normalize flag
    k = stats["max_projections"] if stats else 1
    per_slot = NUM_LAYERS * (HIDDEN + k * (HIDDEN + 2)) * 4 + 4
    res["tables"] = {"measured": stats, "expected_bytes_per_slot": per_slot,
                     "expected_table_bytes": (args.prompts + 1) * per_slot}
    res["peak_rss_mib"] = {v: summarize(x["peak_rss_mib"] for x in d.values())
                           for v, d in raw.items()}
    res["peak_pss_mib"] = {v: summarize(x["peak_pss_mib"] for x in d.values())
                           for v, d in raw.items()}
    base = "plugin_off" if "plugin_off" in raw else "unsteered"
    res["rss_ratio_over_" + base] = {
        v: summarize(raw[v][r]["peak_rss_mib"] / raw[base][r]["peak_rss_mib"]
                     for r in raw[v] if r in raw[base]) for v in raw if v != base}
    return res


# -- report ---------------------------------------------------------------------------
def memory_section(d: dict[str, Any]) -> list[str]:
    t = d["tables"]
    m = t.get("measured") or {}
    wl = d["workload"]
    out = ["### Memory", "", *meta_lines(d),
           f"- eager engine, max_num_seqs={wl['max_num_seqs']}, {wl['prompts']} requests x "
           f"{wl['max_tokens']} tokens; each variant in a fresh process", "",
           f"Steering tables (from `collective_rpc('vllm_steer_stats')`): "
           f"{m.get('bytes_per_slot', 'n/a')} bytes per slot (30 layers x (576 + K x 578) x "
           f"fp32 + 4, K = {m.get('max_projections', 'n/a')} projections: "
           f"{t['expected_bytes_per_slot']} expected), "
           f"{m.get('table_bytes', 'n/a')} bytes in total "
           f"({m.get('num_slots', 'n/a')} slots = max_num_seqs + 1; "
           f"{m.get('table_bytes', 0) / 2**20:.2f} MiB).", "",
           "| variant | peak RSS MiB (tree) | peak PSS MiB (tree) | RSS ratio |",
           "|---|---|---|---|"]
    ratio_key = next((k for k in d if k.startswith("rss_ratio_over_")), None)
    rr = d.get(ratio_key, {}) if ratio_key else {}
    for v in d["peak_rss_mib"]:
        out.append(f"| {v} | {cell(d['peak_rss_mib'][v], digits=0)} | "
                   f"{cell(d['peak_pss_mib'][v], digits=0)} | "
                   f"{cell(rr.get(v), digits=3) if v in rr else 'baseline'} |")
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="memory", module="memory", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"prompts": 4, "tokens": 4, "reps": 1, "variants": ["unsteered", "steered"]},
    reps=2, sections={"memory": memory_section}, workers=VARIANTS, worker=worker)

if __name__ == "__main__":
    BENCHMARK.main()

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
import sys
from collections.abc import Sequence
from typing import Any

from vllm_steer.bench.common import (
    HIDDEN,
    NUM_LAYERS,
    WORK_DIR,
    LoadTracker,
    Worker,
    bench_registry,
    header,
    interleaved,
    module_argv,
    random_prompts,
    serve_commands,
    summarize,
    write_result,
)

VARIANTS = ("plugin_off", "unsteered", "steered")


def worker(args: argparse.Namespace) -> None:
    from vllm import SamplingParams

    from vllm_steer.llm_factory import make_llm

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


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-steer bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompts", type=int, default=64, help="requests = max_num_seqs")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(list(argv))
    if a.quick:
        a.prompts, a.tokens, a.reps, a.variants = 4, 4, 1, "unsteered,steered"
    a.variants = a.variants.split(",")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    bench_registry()
    if args.worker:
        worker(args)
        return {}
    from tqdm import tqdm

    res = header(argv, "memory")
    res["workload"] = {"prompts": args.prompts, "max_num_seqs": args.prompts,
                       "max_tokens": args.tokens, "enforce_eager": True, "dtype": "float32"}
    load = LoadTracker()
    raw: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in args.variants}
    tag = "_quick" if args.quick else ""
    for rep, v in tqdm(interleaved(args.variants, args.reps), desc="memory"):
        env = dict(os.environ)
        env.pop("VLLMSTEER_DISABLE", None)
        env.pop("VLLM_STEER_DISABLE", None)  # the deprecated spelling
        if v == "plugin_off":
            env["VLLMSTEER_DISABLE"] = "1"
        w = Worker([*module_argv("memory"), *argv, "--worker", v],
                   WORK_DIR / f"memory_{v}{tag}.log", env=env)
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
    write_result(args.out or f"memory{tag}", res)
    return res


if __name__ == "__main__":
    main()

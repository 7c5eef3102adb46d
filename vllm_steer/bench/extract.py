"""Benchmark: vector extraction through the vLLM engine's hidden-state capture versus the
HF transformers path (forward hooks), on the shipped ``happy`` recipe.

Both sides train the same vector (``extract.train``: every prompt's last-token block
outputs, then PCA) from the same dataset, each in its own subprocess (peak RSS/PSS of
each process tree sampled by the parent), called alternately (shuffled per repetition),
so each repetition gives one ratio ``seconds(HF) / seconds(vLLM)``. The engine's prefix
cache is reset before every repetition (the shared chat-template prefix is then cached
within one extraction only, as on a fresh engine). Start-up (model load / engine start)
is reported separately. The vectors of the two sides are compared (cosine per layer).

HF: batch size 32 (the recipe's), its shared-prefix path (``read_last_token``), torch
threads = cores. vLLM: eager, ``block_size`` 32, prefix caching, 4096 batched tokens.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from vllm_steer.bench.common import (
    WORK_DIR,
    LoadTracker,
    Worker,
    interleaved,
    serve_commands,
    summarize,
    tree_cpu_seconds,
)
from vllm_steer.bench.harness import Benchmark, cell, meta_lines

RECIPE = "configs/vectors/happy.yaml"


def _dataset(tok: Any, pairs: int | None) -> Any:
    from vllm_steer.extract import build_dataset, load_config
    from vllm_steer.extract.dataset import ContrastiveDataset
    from vllm_steer.locations import find_config

    cfg = load_config(find_config(RECIPE))
    ds = build_dataset(cfg, tok)
    if pairs:
        ds = ContrastiveDataset(ds.pairs[:pairs], ds.add_special_tokens, ds.name, ds.info)
    return cfg, ds


def worker(args: argparse.Namespace) -> None:
    import torch

    from vllm_steer.default_model import resolve_model
    from vllm_steer.extract import train
    from vllm_steer.extract.train import extraction_llm, load_model

    t0 = time.perf_counter()
    if args.worker == "vllm":
        from transformers import AutoTokenizer

        model_dir = str(resolve_model(None))
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = extraction_llm(model_dir, "float32")
    else:
        torch.set_num_threads(args.hf_threads)
        model, tok = load_model(None)
    startup = time.perf_counter() - t0
    cfg, ds = _dataset(tok, args.pairs)

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        if args.worker == "vllm":
            model.reset_prefix_cache()
        c0, t = tree_cpu_seconds(), time.perf_counter()
        vec = train(model, tok, ds, layers=cfg.layers, method=cfg.method,
                    normalize=cfg.normalize, batch_size=cfg.batch_size, progress=False)
        dt, cpu = time.perf_counter() - t, tree_cpu_seconds() - c0
        if cmd.get("save"):
            vec.save(str(WORK_DIR / f"extract_{args.worker}.safetensors"))
        return {"seconds": dt, "cpu_s": cpu, "pairs": len(ds), "startup_s": startup}

    handle({"save": False, "warmup": True})
    serve_commands(handle)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=None, help="first N pairs (default: all; "
                   "32 with --quick)")
    p.add_argument("--hf-threads", type=int, default=os.cpu_count() or 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from vllm_steer import SteeringVector

    res: dict[str, Any] = {}
    tag = "_quick" if args.quick else ""
    load = LoadTracker()
    workers = {w: Worker(BENCHMARK.worker_command(args.argv, w),
                         WORK_DIR / f"extract_{w}{tag}.log") for w in ("vllm", "hf")}
    for w in workers.values():
        w.recv()
    raw: dict[str, dict[int, dict[str, Any]]] = {"vllm": {}, "hf": {}}
    for rep, v in tqdm(interleaved(["vllm", "hf"], args.reps), desc="extract"):
        raw[v][rep] = workers[v].call(save=rep == 0)
    res["load"] = load.finish()
    res["memory"] = {w: workers[w].close() for w in workers}
    res["raw"] = raw
    a, b = (SteeringVector.load(str(WORK_DIR / f"extract_{w}.safetensors"))
            for w in ("vllm", "hf"))
    cos = {layer: float(torch.nn.functional.cosine_similarity(
        a.directions[layer], b.directions[layer], dim=0)) for layer in a.directions}
    res["workload"] = {"recipe": RECIPE, "pairs": raw["vllm"][0]["pairs"],
                       "prompts": 2 * raw["vllm"][0]["pairs"], "hf_torch_threads": args.hf_threads}
    reps = [r for r in raw["vllm"] if r in raw["hf"]]
    res["seconds"] = {w: summarize(x["seconds"] for x in raw[w].values()) for w in raw}
    res["startup_s"] = {w: round(raw[w][0]["startup_s"], 1) for w in raw}
    res["speedup_hf_over_vllm"] = summarize(raw["hf"][r]["seconds"] / raw["vllm"][r]["seconds"]
                                            for r in reps)
    res["cpu_s_ratio_hf_over_vllm"] = summarize(raw["hf"][r]["cpu_s"] / raw["vllm"][r]["cpu_s"]
                                                for r in reps)
    res["min_cosine_per_layer"] = round(min(cos.values()), 6)
    res["rss_ratio_vllm_over_hf"] = round(
        res["memory"]["vllm"]["peak_rss_mib"] / max(res["memory"]["hf"]["peak_rss_mib"], 1), 3)
    return res


# -- report ---------------------------------------------------------------------------
def extract_section(d: dict[str, Any]) -> list[str]:
    wl, m = d["workload"], d["memory"]
    sec = d["seconds"]
    return ["### Vector extraction: vLLM engine (hidden-state capture) vs HF forward hooks", "",
            *meta_lines(d),
            f"- `{wl['recipe']}`: {wl['pairs']} pairs ({wl['prompts']} prompts), the recipe's "
            f"layers and method; HF torch threads {wl['hf_torch_threads']}; engine: eager, "
            "prefix caching (reset before every repetition), block size 32", "",
            "| | seconds per extraction | start-up (s) | peak RSS (MiB) |", "|---|---|---|---|",
            f"| vLLM engine | {cell(sec['vllm'], digits=1)} | {d['startup_s']['vllm']} | "
            f"{m['vllm']['peak_rss_mib']} |",
            f"| HF | {cell(sec['hf'], digits=1)} | {d['startup_s']['hf']} | "
            f"{m['hf']['peak_rss_mib']} |", "",
            f"Speed-up HF seconds / vLLM seconds per repetition: "
            f"{cell(d['speedup_hf_over_vllm'], digits=2)}; CPU-seconds ratio "
            f"{cell(d['cpu_s_ratio_hf_over_vllm'], digits=2)}. Smallest cosine between the two "
            f"sides' vectors over layers: {d['min_cosine_per_layer']}.", ""]


BENCHMARK = Benchmark(
    name="extract", module="extract", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"pairs": 32, "reps": 1}, reps=3, sections={"extract": extract_section},
    workers=("vllm", "hf"), worker=worker)

if __name__ == "__main__":
    BENCHMARK.main()

"""Benchmark 2: vLLM + vllm-steer versus HF transformers ``generate`` with forward hooks.

The HF side is what repeng does: forward hooks adding the vector to decoder block outputs
(``vllm_steer.hf_steering.steer_hf``), one ``generate`` per batch. Same prompts
(equal-length random token ids, so HF needs no padding), same number of sampled output
tokens (``min_new_tokens = max_new_tokens``, i.e. ignore_eos), same vectors (all 30
layers), both in float32.

Workloads: ``shared`` (every request steered by one vector) and ``spread`` (requests spread
over 8 vectors: HF runs one batch per vector, vLLM one ``generate`` for all). HF is timed
at several batch sizes; the best HF batch size (highest median tok/s) is the reference.

Each side runs in its own subprocess (peak RSS/PSS of each process tree is sampled by the
parent); the parent interleaves the calls (shuffled per repetition), so each repetition
gives one ratio ``tok/s(vLLM) / tok/s(HF best)``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from vllm_steer.bench.common import (
    WORK_DIR,
    LoadTracker,
    Worker,
    bench_registry,
    interleaved,
    random_prompts,
    serve_commands,
    summarize,
    tree_cpu_seconds,
)
from vllm_steer.bench.harness import Benchmark, cell, comma_list, meta_lines

N_VECTORS = 8


def _vector_of(i: int, workload: str) -> str:
    return "h0" if workload == "shared" else f"h{i % N_VECTORS}"


# -- workers --------------------------------------------------------------------------------
def vllm_worker(args: argparse.Namespace) -> None:
    from vllm import SamplingParams

    from vllm_steer.llm_factory import make_llm

    llm = make_llm(enforce_eager=not args.compiled, dtype="float32",
                   max_num_seqs=max(args.prompts, 8), max_model_len=2048)

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        wl, rep = cmd["workload"], cmd["rep"]
        prompts = random_prompts(args.prompts, args.prompt_len, seed=11)
        reqs = [{"prompt_token_ids": p, "cache_salt": f"{wl}-{rep}"} for p in prompts]
        params = [SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.8,
                                 extra_args={"steering": {"vectors": [
                                     {"name": _vector_of(i, wl), "scale": 1.0}]}})
                  for i in range(len(prompts))]
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"tokens": n, "seconds": dt, "tok_s": n / dt, "cpu_s": cpu}

    handle({"workload": "shared", "rep": -1})  # warm-up
    serve_commands(handle)


def hf_worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_steer import SteeringVector
    from vllm_steer.default_model import resolve_model
    from vllm_steer.hf_steering import steer_hf

    torch.set_num_threads(args.hf_threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32)
    model.eval()
    vecs = {f"h{i}": SteeringVector.load(WORK_DIR / "vectors" / f"h{i}.safetensors")
            for i in range(N_VECTORS)}

    @torch.inference_mode()
    def gen(ids: list[list[int]], name: str, new: int) -> int:
        x = torch.tensor(ids)
        with steer_hf(model, vecs[name]):
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=True,
                                 temperature=0.8, top_k=0, top_p=1.0, pad_token_id=0)
        return int(out.shape[0] * (out.shape[1] - x.shape[1]))

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        wl, bs = cmd["workload"], cmd["batch_size"]
        prompts = random_prompts(args.prompts, args.prompt_len, seed=11)
        groups: dict[str, list[list[int]]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(_vector_of(i, wl), []).append(p)
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        n = 0
        for name, ps in groups.items():
            for k in range(0, len(ps), bs):
                n += gen(ps[k:k + bs], name, cmd.get("tokens", args.tokens))
        dt, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
        return {"tokens": n, "seconds": dt, "tok_s": n / dt, "cpu_s": cpu,
                "torch_threads": torch.get_num_threads()}

    handle({"workload": "shared", "batch_size": 2, "tokens": 4})  # warm-up
    serve_commands(handle)


# -- driver ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compiled", action="store_true", help="vLLM compiled (default eager)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--hf-batch-sizes", type=comma_list(int), default="8,32")
    p.add_argument("--hf-threads", type=int, default=1,
                   help="torch threads for HF (default 1: vLLM's CPU worker also computes on "
                        "one thread, and 2 OMP threads on a loaded 2-core box were far slower)")


def worker(args: argparse.Namespace) -> None:
    bench_registry()
    (vllm_worker if args.worker == "vllm" else hf_worker)(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    bench_registry()
    res: dict[str, Any] = {"workload": {
        "prompts": args.prompts, "max_tokens": args.tokens, "prompt_len": args.prompt_len,
        "vectors": "random, all 30 layers", "hf_batch_sizes": args.hf_batch_sizes,
        "sampling": "temperature 0.8", "hf_torch_threads": args.hf_threads}}
    res["vllm_mode"] = "compiled" if args.compiled else "eager"
    tag = "_quick" if args.quick else ""
    vw = Worker(BENCHMARK.worker_command(args.argv, "vllm"), WORK_DIR / f"vs_hf_vllm{tag}.log")
    hw = Worker(BENCHMARK.worker_command(args.argv, "hf"), WORK_DIR / f"vs_hf_hf{tag}.log")
    vw.recv()
    hw.recv()
    variants = [f"vllm_{w}" for w in ("shared", "spread")] + [
        f"hf_{w}_b{b}" for w in ("shared", "spread") for b in args.hf_batch_sizes]
    load = LoadTracker()
    raw: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    for rep, v in tqdm(interleaved(variants, args.reps), desc="vs-hf"):
        parts = v.split("_")
        if parts[0] == "vllm":
            raw[v][rep] = vw.call(workload=parts[1], rep=rep)
        else:
            raw[v][rep] = hw.call(workload=parts[1], batch_size=int(parts[2][1:]))
    res["load"] = load.finish()
    res["memory"] = {"vllm": vw.close(), "hf": hw.close()}
    res["raw"] = raw
    out: dict[str, Any] = {}
    for wl in ("shared", "spread"):
        hf = {b: summarize(x["tok_s"] for x in raw[f"hf_{wl}_b{b}"].values())
              for b in args.hf_batch_sizes}
        best = max(hf, key=lambda b: hf[b]["median"])
        vl = raw[f"vllm_{wl}"]
        hb = raw[f"hf_{wl}_b{best}"]
        out[wl] = {"hf_tok_s_by_batch": hf, "hf_best_batch": best,
                   "vllm_tok_s": summarize(x["tok_s"] for x in vl.values()),
                   "ratio_vllm_over_hf": summarize(vl[r]["tok_s"] / hb[r]["tok_s"]
                                                   for r in vl if r in hb),
                   "cpu_s_ratio_hf_over_vllm": summarize(hb[r]["cpu_s"] / vl[r]["cpu_s"]
                                                         for r in vl if r in hb)}
    res["workloads"] = out
    res["rss_ratio_vllm_over_hf"] = round(
        res["memory"]["vllm"]["peak_rss_mib"] / max(res["memory"]["hf"]["peak_rss_mib"], 1), 3)
    return res


# -- report ---------------------------------------------------------------------------
def vs_hf_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    out = ["### vLLM + vllm-steer vs HF transformers generate + forward hooks", "", *meta_lines(d),
           f"- vLLM {d['vllm_mode']}; {wl['prompts']} prompts x {wl['max_tokens']} tokens, "
           f"{wl['sampling']}, fp32; HF batch sizes tried: {wl['hf_batch_sizes']}; HF torch "
           f"threads: {wl.get('hf_torch_threads', 'default')} (vLLM's CPU worker computes on 1 "
           "thread; its front end runs in another process)", "",
           "| workload | vLLM tok/s | HF tok/s at best batch | vLLM / HF (tok/s) | "
           "HF CPU-s / vLLM CPU-s |", "|---|---|---|---|---|"]
    for name, w in d["workloads"].items():
        b = w["hf_best_batch"]
        hf = w["hf_tok_s_by_batch"][str(b)] if str(b) in w["hf_tok_s_by_batch"] else \
            w["hf_tok_s_by_batch"][b]
        out.append(f"| {name} | {cell(w['vllm_tok_s'], digits=1)} | {cell(hf, digits=1)} "
                   f"(batch {b}) | {cell(w['ratio_vllm_over_hf'], digits=2)} | "
                   f"{cell(w.get('cpu_s_ratio_hf_over_vllm'), digits=2)} |")
    m = d["memory"]
    out += ["", f"Peak memory of each side's process tree over the whole run (sampled every "
            f"0.25 s): vLLM RSS {m['vllm']['peak_rss_mib']} MiB (PSS "
            f"{m['vllm']['peak_pss_mib']} MiB; front end, EngineCore and worker processes), HF RSS "
            f"{m['hf']['peak_rss_mib']} MiB (PSS {m['hf']['peak_pss_mib']} MiB). vLLM's "
            "includes its preallocated KV cache (VLLM_CPU_KVCACHE_SPACE GiB, in the command).", ""]
    return out


BENCHMARK = Benchmark(
    name="vs-hf", module="vs_hf", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"prompts": 8, "tokens": 8, "reps": 2, "hf_batch_sizes": [4, 8]}, reps=3,
    sections={"vs_hf": vs_hf_section}, workers=("vllm", "hf"), worker=worker)

if __name__ == "__main__":
    BENCHMARK.main()

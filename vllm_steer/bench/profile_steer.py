"""Where steering time goes: py-spy samples of the engine's worker and front-end processes.

For each variant (the ``overhead`` workloads) the workload is repeated while ``py-spy
record --format raw`` samples the worker process and this (front-end) process; samples
whose stack passes through vllm-steer code are attributed to:

- ``fill_rows``: per-step row-index fill (``RunnerSteering.fill_rows``, Python);
- ``layer_add``: the gather + add lines of ``_steered_forward`` (self time);
- ``slots``: slot acquire/release (``_update_states`` wrapper: add/remove_request);
- ``frontend``: the front-end hook (parse, resolve, compose) in this process;
- ``model``: the decoder layers under the wrapper; ``other``: everything else.

``vllm-steer bench profile --reread`` re-classifies the saved raw profiles.

Needs ``pip install py-spy`` (root or ptrace permission). Not part of ``bench all``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import RESULTS_DIR, WORK_DIR, LoadTracker, bench_registry
from vllm_steer.bench.harness import Benchmark
from vllm_steer.bench.overhead import run_case


def _classify(stack: str) -> str:
    """Bucket of one sampled stack (frames ``func (file:line)``, root first)."""
    frames = stack.split(";")
    leaf = frames[-1]
    ours = [f for f in frames if "(vllm_steer/" in f]
    if "_steered_forward (vllm_steer/" in leaf and not leaf.endswith(":60)"):
        return "layer_add"   # self time of the wrapper's gather + add lines
    if any("fill_rows" in f or "_prepare_inputs (vllm_steer/" in f for f in ours):
        return "fill_rows"
    if any("slots.py" in f or "add_request" in f or "remove_request" in f
           or "_update_states (vllm_steer/" in f for f in ours):
        return "slots"
    if any(k in f for f in ours for k in ("vllm_adapter/frontend.py", "resolve.py", "spec.py",
                                          "wire.py", "registry.py", "vector")):
        return "frontend"
    if any("_steered_forward" in f for f in frames):
        return "model"       # the decoder layers themselves (called by the wrapper)
    return "other"


def _read(path: Path) -> Counter:
    c: Counter = Counter()
    if not path.is_file():
        return c
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            c[_classify(stack)] += int(n)
    return c


def summarize_profiles(files: dict[str, Path]) -> dict[str, Any]:
    """Per process: sample counts and fractions per bucket; both processes are sampled at
    the same rate over the same window, so ``per_worker_sample`` compares them."""
    out: dict[str, Any] = {}
    counts = {who: _read(f) for who, f in files.items()}
    wtotal = sum(counts.get("worker", Counter()).values()) or 1
    for who, c in counts.items():
        total = sum(c.values()) or 1
        out[who] = {"samples": sum(c.values()),
                    "fraction": {k: round(x / total, 4) for k, x in c.most_common()},
                    "per_worker_sample": {k: round(x / wtotal, 4) for k, x in c.most_common()}}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=int, default=25)
    p.add_argument("--variants", default="unsteered,shared,distinct,thinking")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reread", action="store_true", help="only re-classify saved profiles")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from vllm_steer.llm_factory import make_llm, shutdown

    if args.reread:   # the saved result, its profiles re-classified
        res = json.loads((RESULTS_DIR / f"{args.result}.json").read_text())
        for v in res["profiles"]:
            res["profiles"][v] = summarize_profiles(
                {who: WORK_DIR / f"pyspy_{v}_{who}.txt" for who in ("worker", "frontend")})
        return res
    bench_registry()
    llm = make_llm(enforce_eager=True, dtype="float32", max_num_seqs=args.prompts,
                   max_model_len=2048)
    tok = llm.get_tokenizer()
    worker = next(c for c in psutil.Process().children(recursive=True)
                  if "Worker" in " ".join(c.cmdline()) or c.name().startswith("VLLM::Worker"))
    load = LoadTracker()
    out: dict[str, Any] = {}
    for v in args.variants.split(","):
        run_case(llm, tok, f"warm-{v}", v, 2, 4, -1, 32)
        files = {who: WORK_DIR / f"pyspy_{v}_{who}.txt" for who in ("worker", "frontend")}
        spies = [subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(args.seconds),
                                   "-r", "200", "--format", "raw", "-o", str(f), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid, f in ((worker.pid, files["worker"]), (os.getpid(), files["frontend"]))]
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            run_case(llm, tok, f"prof-{v}-{n}", v, args.prompts, args.tokens, n, 32)
            n += 1
        for s in spies:
            s.wait(timeout=120)
        out[v] = summarize_profiles(files)
    shutdown(llm)
    return {"load": load.finish(), "profiles": out}


BENCHMARK = Benchmark(
    name="profile", module="profile_steer", doc=__doc__, add_arguments=add_arguments, run=run,
    result_name=lambda a: "profile", quick={"seconds": 3, "prompts": 4, "tokens": 8},
    in_all=False)

if __name__ == "__main__":
    BENCHMARK.main()

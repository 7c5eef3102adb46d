"""Benchmark: the cost of live probes on a served stream (``vllm-steer serve``, eager).

- ``stream``: one streamed chat request at a time (``--tokens`` generated, greedy,
  ignore_eos), unprobed vs probed every ``--every`` tokens with Yes/No and with
  20/30/40/50, variants interleaved (shuffled per repetition). Per run: median
  inter-token latency (time between content chunks; reading chunks are not tokens) and
  tokens per second; ratios probed / unprobed per repetition. Each reading's prompt
  tokens computed vs served from the prefix cache (vLLM's counters, through the
  reading's ``computed_tokens`` / ``cached_tokens``) show that a fork costs its suffix.
- ``neighbours``: ``--concurrent`` streamed requests at once, ``--probed`` of them probed
  (Yes/No, every ``--every``), vs the same requests with none probed; the unprobed
  requests' throughput (their tokens / the time from the first request sent to the last
  of them done) and median ITL, ratio with probes / without, per repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from vllm_steer.bench.common import (
    WORK_DIR,
    LoadTracker,
    header,
    interleaved,
    summarize,
    write_result,
)
from vllm_steer.bench.serving import _free_port, _wait_ready

QUESTION = ("Is {n} a prime number? Think step by step inside <think> </think>, then answer "
            "Yes or No.")
PROBES = {"yes_no": {"choices": ["Yes", "No"]},
          "multi": {"choices": ["20", "30", "40", "50"]}}


def _client(url: str) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=600)


async def _one(url: str, n: int, tokens: int, probe: dict[str, Any] | None) -> dict[str, Any]:
    async with _client(url) as client:
        return await _stream(client, n, tokens, probe)


async def _stream(client: Any, n: int, tokens: int, probe: dict[str, Any] | None
                  ) -> dict[str, Any]:
    """One streamed chat request: token-chunk arrival times and its readings."""
    body: dict[str, Any] = {"ignore_eos": True}
    if probe is not None:
        body["probe"] = probe
    t_sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": QUESTION.format(n=n)}],
        max_tokens=tokens, temperature=0.0, stream=True, extra_body=body)
    times, readings = [], []
    async for chunk in stream:
        for c in chunk.choices:
            if c.delta and c.delta.content:
                times.append(time.perf_counter())
            readings += (c.model_extra or {}).get("probe_readings") or []
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"sent": t_sent, "first": times[0], "end": times[-1], "chunks": len(times),
            "itl_median_s": statistics.median(itl) if itl else None,
            "tok_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
            "readings": [{k: r[k] for k in ("token_index", "computed_tokens", "cached_tokens",
                                            "requests")} for r in readings]}


def run_stream(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    variants = ["unprobed", *PROBES]
    load = LoadTracker()
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    asyncio.run(_one(url, 1, 16, None))   # warm-up
    for rep, v in tqdm(interleaved(variants, args.reps, seed=1), desc="single stream"):
        probe = None if v == "unprobed" else {**PROBES[v], "every": args.every}
        runs[v][rep] = asyncio.run(_one(url, 100 + rep, args.tokens, probe))
    out: dict[str, Any] = {"load": load.finish(), "tokens": args.tokens, "every": args.every}
    for v in PROBES:
        out[v] = {
            "itl_ratio": summarize(runs[v][r]["itl_median_s"] / runs["unprobed"][r]
                                   ["itl_median_s"] for r in range(args.reps)),
            "throughput_ratio": summarize(runs[v][r]["tok_s"] / runs["unprobed"][r]["tok_s"]
                                          for r in range(args.reps)),
            "readings_per_run": summarize(len(runs[v][r]["readings"])
                                          for r in range(args.reps)),
            "computed_tokens_per_request": summarize(
                x["computed_tokens"] / x["requests"] for r in range(args.reps)
                for x in runs[v][r]["readings"]),
            "cached_tokens_per_reading": summarize(
                x["cached_tokens"] for r in range(args.reps) for x in runs[v][r]["readings"]),
        }
    out["itl_median_ms"] = {v: summarize(1000 * runs[v][r]["itl_median_s"]
                                         for r in range(args.reps)) for v in variants}
    out["runs"] = runs
    return out


async def _batch(url: str, args: argparse.Namespace, probed: bool, rep: int
                 ) -> dict[str, Any]:
    probe = {**PROBES["yes_no"], "every": args.every}
    async with _client(url) as client:
        tasks = [_stream(client, 1000 * rep + i, args.batch_tokens,
                         probe if probed and i < args.probed else None)
                 for i in range(args.concurrent)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*tasks)
    plain = res[args.probed:]   # the same requests in both variants
    tokens = sum(r["chunks"] for r in plain)
    return {"unprobed_tok_s": tokens / (max(r["end"] for r in plain) - t0),
            "unprobed_itl_median_s": statistics.median(r["itl_median_s"] for r in plain)}


def run_neighbours(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    load = LoadTracker()
    runs: dict[str, dict[int, dict[str, Any]]] = {"none": {}, "probed": {}}
    for rep, v in tqdm(interleaved(list(runs), args.reps, seed=2), desc="neighbours"):
        runs[v][rep] = asyncio.run(_batch(url, args, v == "probed", rep))
    return {"load": load.finish(), "concurrent": args.concurrent, "probed": args.probed,
            "tokens": args.batch_tokens, "every": args.every, "runs": runs,
            "throughput_ratio": summarize(runs["probed"][r]["unprobed_tok_s"]
                                          / runs["none"][r]["unprobed_tok_s"]
                                          for r in range(args.reps)),
            "itl_ratio": summarize(runs["probed"][r]["unprobed_itl_median_s"]
                                   / runs["none"][r]["unprobed_itl_median_s"]
                                   for r in range(args.reps))}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-steer bench live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--probed", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args(list(argv))
    if a.quick:
        a.tokens, a.reps, a.concurrent, a.probed, a.batch_tokens = 32, 1, 4, 1, 16
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    tag = "_quick" if args.quick else ""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ,
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    serve = [sys.executable, "-m", "vllm_steer.cli", "serve", "--port", str(port),
             "--host", "127.0.0.1", "--dtype", "float32",
             "--gpu-memory-utilization", "0.5", "--max-model-len", "2048",
             "--block-size", str(args.block_size), "--served-model-name", "bench",
             "--enforce-eager"]
    res = header(argv, "live_probe")
    res["server_command"] = " ".join(serve)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    log = open(WORK_DIR / f"live_server{tag}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(url, proc)
        res["stream"] = run_stream(url, args)
        res["neighbours"] = run_neighbours(url, args)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    write_result(args.out or f"live_probe{tag}", res)
    return res


if __name__ == "__main__":
    main()

"""Benchmark: the cost of live probes on a served stream (``vllm-steer serve``, eager).

- ``stream``: one streamed chat request at a time (``--tokens`` generated, greedy,
  ignore_eos), unprobed vs probed every ``--every`` tokens with Yes/No and with
  20/30/40/50, variants interleaved (shuffled per repetition). Per run: median
  inter-token latency (time between content chunks; reading chunks are not tokens) and
  tokens per second; ratios probed / unprobed per repetition. Each reading's prompt
  tokens computed vs served from the prefix cache (vLLM's counters, through the
  reading's ``computed_tokens`` / ``cached_tokens``) show that a fork costs its suffix.
- ``neighbours``: ``--concurrent`` streamed requests at once, ``--probed`` of them probed
  (Yes/No, with each setting of ``--neighbour-probes``: by default every ``--every``
  tokens exactly, the same aligned to KV blocks, and reasoning steps aligned), vs the same
  requests with none probed; the unprobed requests' throughput (their tokens / the time
  from the first request sent to the last of them done) and median ITL, ratio with probes
  / without, per repetition, all settings interleaved in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from vllm_steer.bench.common import WORK_DIR, LoadTracker, bench_server, interleaved, summarize
from vllm_steer.bench.harness import Benchmark, cell, meta_lines, verdict

QUESTION = ("Is {n} a prime number? Think step by step inside <think> </think>, then answer "
            "Yes or No.")
PROBES = {"yes_no": {"choices": ["Yes", "No"]},
          "multi": {"choices": ["20", "30", "40", "50"]},
          "yes_no_aligned": {"choices": ["Yes", "No"], "align": "block"},
          "multi_aligned": {"choices": ["20", "30", "40", "50"], "align": "block"}}
LABELS = {"yes_no": "Yes/No", "multi": "20/30/40/50", "yes_no_aligned": "Yes/No, aligned",
          "multi_aligned": "20/30/40/50, aligned"}


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
            "readings": [{k: r.get(k) for k in ("token_index", "computed_tokens",
                                                "cached_tokens", "requests", "trigger")}
                         for r in readings]}


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


async def _batch(url: str, args: argparse.Namespace, probe: dict[str, Any] | None, rep: int
                 ) -> dict[str, Any]:
    async with _client(url) as client:
        tasks = [_stream(client, 1000 * rep + i, args.batch_tokens,
                         probe if i < args.probed else None)
                 for i in range(args.concurrent)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*tasks)
    plain = res[args.probed:]   # the same requests in every variant
    tokens = sum(r["chunks"] for r in plain)
    probed = res[:args.probed] if probe is not None else []
    return {"unprobed_tok_s": tokens / (max(r["end"] for r in plain) - t0),
            "unprobed_itl_median_s": statistics.median(r["itl_median_s"] for r in plain),
            "readings": [x for r in probed for x in r["readings"]]}


def neighbour_probes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{name: probe}`` of the probed variants (Yes/No with each setting)."""
    return {name: {**PROBES["yes_no"], **cfg} for name, cfg in args.neighbour_probes.items()}


def run_neighbours(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    load = LoadTracker()
    probes = neighbour_probes(args)
    runs: dict[str, dict[int, dict[str, Any]]] = {"none": {}, **{p: {} for p in probes}}
    for rep, v in tqdm(interleaved(list(runs), args.reps, seed=2), desc="neighbours"):
        runs[v][rep] = asyncio.run(_batch(url, args, probes.get(v), rep))
    per = {}
    for name in probes:
        rs = [x for r in range(args.reps) for x in runs[name][r]["readings"]]
        per[name] = {
            "probe": probes[name],
            "throughput_ratio": summarize(runs[name][r]["unprobed_tok_s"]
                                          / runs["none"][r]["unprobed_tok_s"]
                                          for r in range(args.reps)),
            "itl_ratio": summarize(runs[name][r]["unprobed_itl_median_s"]
                                   / runs["none"][r]["unprobed_itl_median_s"]
                                   for r in range(args.reps)),
            "readings_per_probed_stream": len(rs) / max(1, args.reps * args.probed),
            "computed_tokens_per_reading": summarize(x["computed_tokens"] for x in rs),
            "computed_tokens_per_probed_stream": sum(x["computed_tokens"] for x in rs) / max(
                1, args.reps * args.probed)}
    return {"load": load.finish(), "concurrent": args.concurrent, "probed": args.probed,
            "tokens": args.batch_tokens, "runs": runs, "probes": per}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--probed", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--neighbour-probes", type=_probes, default=";".join(
        f"{k}={json.dumps(v)}" for k, v in NEIGHBOUR_PROBES.items()),
        help="probe settings of the neighbours part, NAME=JSON;NAME=JSON (Yes/No)")


#: Probe settings of the neighbours part (each a variant, interleaved with none probed).
NEIGHBOUR_PROBES = {"every16": {"every": 16}, "every16_aligned": {"every": 16, "align": "block"},
                    "steps_aligned": {"trigger": "steps", "every": 64, "align": "block"}}


def _probes(s: str) -> dict[str, dict[str, Any]]:
    out = {}
    for part in s.split(";"):
        if part.strip():
            name, raw = part.split("=", 1)
            out[name.strip()] = json.loads(raw)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = "_quick" if args.quick else ""
    res: dict[str, Any] = {}
    with bench_server(WORK_DIR / f"live_server{tag}.log",
                      extra_args=("--block-size", str(args.block_size))) as srv:
        res["server_command"] = " ".join(srv.argv)
        res["stream"] = run_stream(srv.url, args)
        res["neighbours"] = run_neighbours(srv.url, args)
    return res


# -- report ---------------------------------------------------------------------------
def live_section(d: dict[str, Any]) -> list[str]:
    st, nb = d["stream"], d["neighbours"]
    out = ["### Live probes: cost on the probed stream and on its neighbours", "", *meta_lines(d),
           f"- server: `{d['server_command']}`",
           f"- single stream: {st['tokens']} tokens, greedy, a reading every {st['every']} "
           f"tokens; load: start {st['load']['start']}, end {st['load']['end']}, 1-min max "
           f"{st['load']['max_1m']}",
           f"- neighbours: {nb['concurrent']} concurrent streams x {nb['tokens']} tokens, "
           f"{nb['probed']} probed (Yes/No{', every ' + str(nb['every']) if 'every' in nb else ''}"
           f"); load: start "
           f"{nb['load']['start']}, end {nb['load']['end']}, 1-min max {nb['load']['max_1m']}",
           "", "| probed stream | ITL median, probed / unprobed (goal <= 1.15) | tokens/s, "
           "probed / unprobed | readings per run | prompt tokens computed per fork request | "
           "tokens served from the cache per reading |", "|---|---|---|---|---|---|"]
    for v, label in LABELS.items():
        if v not in st:
            continue
        x = st[v]
        out.append(f"| {label} | {cell(x['itl_ratio'])} | {cell(x['throughput_ratio'])} | "
                   f"{cell(x['readings_per_run'], digits=0)} | "
                   f"{cell(x['computed_tokens_per_request'], digits=1)} | "
                   f"{cell(x['cached_tokens_per_reading'], digits=0)} |")
    if "probes" not in nb:   # results written before the neighbour settings existed
        out += ["", f"Unprobed neighbours with {nb['probed']} of {nb['concurrent']} streams "
                f"probed vs none probed: throughput {cell(nb['throughput_ratio'])} (goal >= "
                f"0.95: {verdict(nb['throughput_ratio'], 0.95)}), ITL median "
                f"{cell(nb['itl_ratio'])}.", ""]
        return out
    out += ["", f"Unprobed neighbours with {nb['probed']} of {nb['concurrent']} streams probed "
            "(Yes/No) vs none probed, each setting interleaved in one run:", "",
            "| probe of the probed streams | neighbours' throughput (goal >= 0.95) | "
            "neighbours' ITL median | readings per probed stream | prompt tokens computed "
            "per reading | per probed stream |", "|---|---|---|---|---|---|"]
    for name, x in nb["probes"].items():
        out.append(f"| {name} `{json.dumps(x['probe'])}` | {cell(x['throughput_ratio'])} "
                   f"({verdict(x['throughput_ratio'], 0.95)}) | {cell(x['itl_ratio'])} | "
                   f"{x['readings_per_probed_stream']:.1f} | "
                   f"{cell(x['computed_tokens_per_reading'], digits=1)} | "
                   f"{x['computed_tokens_per_probed_stream']:.0f} |")
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="live", module="live_probe", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"tokens": 32, "reps": 1, "concurrent": 4, "probed": 1, "batch_tokens": 16},
    reps=5, sections={"live_probe": live_section})

if __name__ == "__main__":
    BENCHMARK.main()

"""Goodput: does the server deliver more answers per second with probes and early exit,
at the same answers?

The same questions (default: the checkable sets ``arithmetic``, ``comparisons`` and
``primality``, ``--limit`` each) are served by one ``vllm-steer serve`` (eager, block
size ``--block-size``) as chat requests through the official ``openai`` client: the reply
starts inside an open thinking section, greedy, up to ``--max-tokens`` (natural end),
``--concurrency`` requests in flight (a closed loop: a finished request is replaced by
the next question). Variants, interleaved (shuffled per repetition), each run with its
own cache salt (nothing one run cached is reused by another; forks share their request's
blocks):

- ``plain``: no probe. Its answer is read after the timed runs, outside them: a one-shot
  reading at the end of its text (``POST /v1/steering/probe``, the choices, the think-end
  marker when the section is open, the suffix), what a live probe's end reading reads;
- ``probed:NAME``: a live probe (``--probes NAME=JSON``); the answer is its end reading;
- ``exit:NAME``: the same probe with ``stop_when`` (``--stop``, without ``complete``): the
  settled choice, else the end reading.

Per run: answers per second (questions / time from the first request sent to the last
answer), generated tokens per answer (usage), prompt tokens computed and served from the
cache per answer (vLLM's counters, ``vllm:prompt_tokens_by_source``), fork tokens per
answer (the readings' ``computed_tokens``), accuracy against ``expected``, agreement with
``plain``'s answers of the same repetition, and latency per answer (p50/p90). Ratios to
``plain`` per repetition and concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import (
    RESULTS_DIR,
    WORK_DIR,
    LoadTracker,
    bench_server,
    interleaved,
    summarize,
)
from vllm_steer.bench.harness import Benchmark, cell, comma_list, meta_lines

SETS = ("arithmetic", "comparisons", "primality")
#: Probe settings compared by default (``--probes``): every 16 tokens, and reasoning steps
#: with a fallback, both aligned to KV blocks.
PROBES = {"every16": {"every": 16, "align": "block"},
          "steps": {"trigger": "steps", "every": 64, "align": "block"}}
OPEN_THINKING = "<think>\n"
COUNTERS = (("prompt_computed", "vllm:prompt_tokens_by_source", "local_compute"),
            ("prompt_cached", "vllm:prompt_tokens_by_source", "local_cache_hit"),
            ("generated", "vllm:generation_tokens", None))


# -- the workload --------------------------------------------------------------------------
def load_items(names: list[str], limit: int | None) -> list[dict[str, Any]]:
    """Questions of the sets ``names`` (shipped set names or YAML paths), ``limit`` each."""
    from vllm_steer.locations import shipped_configs
    from vllm_steer.probe.questions import load_questions

    items = []
    for name in names:
        path = Path(name) if name.endswith(".yaml") else \
            shipped_configs() / "questions" / f"{name}.yaml"
        qs = load_questions(path)
        for q in qs.questions[:limit]:
            items.append({"set": path.stem, "text": q.text, "choices": list(q.choices),
                          "expected": q.expected if qs.graded else None})
    return items


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any] | None]:
    """``{variant: probe field or None}``: plain, then probed/exit per probe setting."""
    out: dict[str, dict[str, Any] | None] = {"plain": None}
    for name, cfg in args.probes.items():
        if "probed" in args.modes:
            out[f"probed:{name}"] = dict(cfg)
        if "exit" in args.modes:
            out[f"exit:{name}"] = {**cfg, "stop_when": dict(args.stop)}
    return out


def _cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the server's processes: the API server (front end: HTTP,
    detokenizing, the live probes' Python) and the engine (core and workers)."""
    import psutil

    if pid is None:
        return {}
    root = psutil.Process(pid)
    out = {"api_server": 0.0, "engine": 0.0}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = " ".join(p.cmdline()[:1]) + p.name()
        except psutil.Error:
            continue
        out["engine" if "VLLM::" in name else "api_server"] += t.user + t.system
    return out


def _metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for key, name, source in COUNTERS:
        total = 0.0
        for line in text.splitlines():
            if line.startswith((name + "{", name + "_total{")) and (
                    source is None or f'source="{source}"' in line):
                total += float(line.rsplit(" ", 1)[1])
        out[key] = total
    return out


async def _ask(client: Any, item: dict[str, Any], probe: dict[str, Any] | None, salt: str,
               max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"cache_salt": salt, "return_token_ids": True,
                            "continue_final_message": True, "add_generation_prompt": False}
    if probe is not None:
        body["probe"] = {"choices": item["choices"], **probe}
    t0 = time.perf_counter()
    r = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": item["text"]},
                                 {"role": "assistant", "content": OPEN_THINKING}],
        max_tokens=max_tokens, temperature=0.0, extra_body=body)
    t1 = time.perf_counter()
    c = r.choices[0]
    ex = dict(c.model_extra or {})
    readings = ex.get("probe_readings") or []
    stop = ex.get("probe_stop")
    answer = None
    if stop:
        answer = stop["choice"]
    elif readings:
        last = readings[-1]
        answer = max(last["probs"], key=last["probs"].get)
    return {"latency_s": t1 - t0, "done": t1, "generated": r.usage.completion_tokens,
            "prompt_ids": list((r.model_extra or {}).get("prompt_token_ids") or []),
            "token_ids": list(ex.get("token_ids") or []), "answer": answer,
            "stopped_at": stop["token_index"] if stop else None,
            "finish_reason": c.finish_reason,
            "readings": len(readings),
            "fork_tokens": sum(x["computed_tokens"] for x in readings),
            "triggers": [x.get("trigger") for x in readings]}


async def _run(url: str, items: list[dict[str, Any]], probe: dict[str, Any] | None,
               concurrency: int, max_tokens: int, pid: int | None = None) -> dict[str, Any]:
    from openai import AsyncOpenAI

    salt = f"goodput-{uuid.uuid4().hex}"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait(i)
    out: list[dict[str, Any] | None] = [None] * len(items)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0,
                           timeout=3600) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                out[i] = await _ask(client, items[i], probe, salt, max_tokens)

        before, cpu0 = _metrics(url), _cpu(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = max(o["done"] for o in out) - t0
        cpu1 = _cpu(pid)
        await asyncio.sleep(1.0)   # the counters follow the engine's last steps
        after = _metrics(url)
    return {"seconds": seconds, "answers_per_s": len(items) / seconds,
            "counters": {k: after[k] - before[k] for k in after},
            "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu1}, "requests": out}


def _plain_answers(url: str, items: list[dict[str, Any]], run: dict[str, Any]) -> None:
    """Each plain request's answer: the one-shot reading at the end of its text."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        for item, req in zip(items, run["requests"], strict=True):
            body = {"prompt_token_ids": req["prompt_ids"] + req["token_ids"],
                    "trajectory": False, "choices": item["choices"]}
            r = http.post("/v1/steering/probe", json=body)
            r.raise_for_status()
            (reading,) = r.json()["trajectory"]["readings"]
            req["answer"] = max(reading["probs"], key=reading["probs"].get)


def _summary(items: list[dict[str, Any]], run: dict[str, Any],
             plain: dict[str, Any]) -> dict[str, Any]:
    from vllm_steer.probe.choices import normalize

    reqs, n = run["requests"], len(items)
    graded = [(r["answer"], it["expected"]) for r, it in zip(reqs, items, strict=True)
              if it["expected"] is not None]
    lat = sorted(r["latency_s"] for r in reqs)
    c = run["counters"]
    cpu = run.get("cpu_s") or {}
    return {
        "api_cpu_s_per_answer": cpu.get("api_server", 0.0) / n,
        "engine_cpu_s_per_answer": cpu.get("engine", 0.0) / n,
        "answers_per_s": run["answers_per_s"],
        "generated_per_answer": sum(r["generated"] for r in reqs) / n,
        "prompt_computed_per_answer": c["prompt_computed"] / n,
        "prompt_cached_per_answer": c["prompt_cached"] / n,
        "computed_per_answer": (c["prompt_computed"] + c["generated"]) / n,
        "fork_tokens_per_answer": sum(r["fork_tokens"] for r in reqs) / n,
        "readings_per_answer": sum(r["readings"] for r in reqs) / n,
        # settled before the request would have ended by itself
        "stopped_early": sum(r["stopped_at"] is not None and r["finish_reason"] == "stop"
                             and r["stopped_at"] < r["generated"] for r in reqs) / n,
        "accuracy": (sum(a is not None and normalize(a) == normalize(e) for a, e in graded)
                     / len(graded)) if graded else None,
        "agreement_with_plain": sum(
            a["answer"] == b["answer"] for a, b in zip(reqs, plain["requests"], strict=True)
        ) / n,
        "latency_p50_s": statistics.median(lat),
        "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))],
    }


METRICS = ("answers_per_s", "generated_per_answer", "computed_per_answer",
           "fork_tokens_per_answer", "accuracy", "agreement_with_plain", "latency_p50_s",
           "latency_p90_s", "stopped_early", "prompt_computed_per_answer",
           "prompt_cached_per_answer", "readings_per_answer", "api_cpu_s_per_answer",
           "engine_cpu_s_per_answer")


def measure(url: str, args: argparse.Namespace, pid: int | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    items = load_items(args.questions, args.limit)
    vs = variants(args)
    order = [(rep, f"{v}@{c}") for c in args.concurrency
             for rep, v in interleaved(list(vs), args.reps, seed=26 + c)]
    order.sort(key=lambda x: x[0])   # repetition by repetition; shuffled within each
    load = LoadTracker()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    asyncio.run(_run(url, items[:2], None, 2, 8))   # warm-up
    for rep, key in tqdm(order, desc="goodput runs"):
        v, c = key.rsplit("@", 1)
        runs.setdefault(key, {})[rep] = asyncio.run(
            _run(url, items, vs[v], int(c), args.max_tokens, pid))
    for key, reps in runs.items():
        if key.startswith("plain@"):
            for run in tqdm(reps.values(), desc="plain answers (untimed)"):
                _plain_answers(url, items, run)
    out: dict[str, Any] = {"load": load.finish(), "questions": len(items), "by_concurrency": {}}
    for c in args.concurrency:
        per: dict[str, Any] = {}
        for v in vs:
            rows = [_summary(items, runs[f"{v}@{c}"][rep], runs[f"plain@{c}"][rep])
                    for rep in range(args.reps)]
            per[v] = {m: summarize(r[m] for r in rows if r[m] is not None) for m in METRICS}
            per[v]["answers_per_s_ratio"] = summarize(
                runs[f"{v}@{c}"][rep]["answers_per_s"] / runs[f"plain@{c}"][rep]["answers_per_s"]
                for rep in range(args.reps))
            per[v]["computed_ratio"] = summarize(
                rows[rep]["computed_per_answer"] / _summary(
                    items, runs[f"plain@{c}"][rep], runs[f"plain@{c}"][rep])["computed_per_answer"]
                for rep in range(args.reps))
        out["by_concurrency"][str(c)] = per
    out["runs"] = {k: {str(rep): {**run, "requests": [
        {kk: vv for kk, vv in r.items() if kk not in ("prompt_ids", "token_ids")}
        for r in run["requests"]]} for rep, run in reps.items()} for k, reps in runs.items()}
    out["items"] = items
    return out


# -- command line --------------------------------------------------------------------------
def _probes(s: str) -> dict[str, dict[str, Any]]:
    """``NAME=JSON;NAME=JSON`` -> ``{name: probe field}`` (choices come from the questions)."""
    out = {}
    for part in s.split(";"):
        if part.strip():
            name, raw = part.split("=", 1)
            out[name.strip()] = json.loads(raw)
    return out


def _stop(s: str) -> dict[str, Any]:
    return json.loads(s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", nargs="+", default=list(SETS),
                   help="shipped set names or YAML paths")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=comma_list(int), default="16,64")
    p.add_argument("--probes", type=_probes,
                   default=";".join(f"{k}={json.dumps(v)}" for k, v in PROBES.items()),
                   help="probe settings as NAME=JSON;NAME=JSON (the probe field without "
                        "choices)")
    p.add_argument("--modes", type=comma_list(str), default="probed,exit",
                   help="which of probed, exit to run per probe setting")
    p.add_argument("--stop", type=_stop, default='{"threshold": 0.9, "consecutive": 2}',
                   help="stop_when of the exit variants, as JSON")
    p.add_argument("--block-size", type=int, default=32)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = "_quick" if args.quick else ""
    res: dict[str, Any] = {"workload": {
        "questions": args.questions, "limit": args.limit, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "probes": args.probes, "stop_when": args.stop,
        "block_size": args.block_size, "modes": args.modes}}
    with bench_server(WORK_DIR / f"goodput_server{tag}.log",
                      extra_args=("--block-size", str(args.block_size))) as srv:
        res["server_command"] = " ".join(srv.argv)
        res.update(measure(srv.url, args, srv.proc.pid if srv.proc else None))
    plot(res, RESULTS_DIR / f"{args.result}.png")
    return res


# -- report --------------------------------------------------------------------------------
def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c, per in res["by_concurrency"].items():
        names = list(per)
        ratio = [per[v]["answers_per_s_ratio"]["median"] or 0 for v in names]
        agree = [100 * (per[v]["agreement_with_plain"]["median"] or 0) for v in names]
        axes[0].plot(names, ratio, "o-", label=f"{c} concurrent")
        axes[1].plot(names, agree, "o-", label=f"{c} concurrent")
    axes[0].axhline(1.3, ls="--", c="gray", lw=1)
    axes[0].axhline(1.0, c="gray", lw=0.5)
    axes[0].set_ylabel("answers/s relative to plain")
    axes[1].axhline(98, ls="--", c="gray", lw=1)
    axes[1].set_ylabel("answers equal to plain's (%)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=8)
    fig.suptitle("goodput: probes and early exit vs plain serving")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: dict[str, Any]) -> str:
    return cell(x, pct=True)


def goodput_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    probes = "; ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in wl["probes"].items())
    out = ["### Goodput: answers per second with probes and early exit", "", *meta_lines(d),
           f"- server: `{d['server_command']}`",
           f"- {d['questions']} questions ({', '.join(wl['questions'])}), chat, thinking "
           f"section opened, greedy, up to {wl['max_tokens']} tokens; concurrency "
           f"{', '.join(map(str, wl['concurrency']))}; probes: {probes}; exit: "
           f"`stop_when` = `{json.dumps(wl['stop_when'])}`; block size {wl['block_size']}",
           "- plain's answers: a one-shot reading at the end of each text, after the timed "
           "runs; agreement: the same answer as plain in the same repetition", ""]
    for c, per in d["by_concurrency"].items():
        out += [f"{c} concurrent requests:", "",
                "| variant | answers/s vs plain (goal for exit >= 1.3) | generated tokens / "
                "answer | computed tokens / answer (prompt + generated) | fork tokens / "
                "answer | stopped early | accuracy | answers = plain's (goal >= 98%) | "
                "latency p50 s | latency p90 s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for v, x in per.items():
            out.append(f"| {v} | {cell(x['answers_per_s_ratio'])} | "
                       f"{cell(x['generated_per_answer'], digits=1)} | "
                       f"{cell(x['computed_per_answer'], digits=1)} | "
                       f"{cell(x['fork_tokens_per_answer'], digits=1)} | "
                       f"{_pct(x['stopped_early'])} | {_pct(x['accuracy'])} | "
                       f"{_pct(x['agreement_with_plain'])} | "
                       f"{cell(x['latency_p50_s'], digits=2)} | "
                       f"{cell(x['latency_p90_s'], digits=2)} |")
        plain = per.get("plain", {}).get("answers_per_s", {})
        out += ["", f"plain: {cell(plain, digits=3)} answers/s. Where the time goes (CPU "
                "seconds per answer: the API server process, with the live probes' Python; "
                "the engine core and worker), and the computed tokens per answer relative to "
                "plain:", "", "| variant | API server CPU s | engine CPU s | computed tokens vs "
                "plain |", "|---|---|---|---|"]
        for v, x in per.items():
            if "api_cpu_s_per_answer" in x:
                out.append(f"| {v} | {cell(x['api_cpu_s_per_answer'])} | "
                           f"{cell(x['engine_cpu_s_per_answer'])} | "
                           f"{cell(x['computed_ratio'])} |")
        out.append("")
    return out


BENCHMARK = Benchmark(
    name="goodput", module="goodput", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"questions": ["arithmetic"], "limit": 4, "max_tokens": 24, "concurrency": [2],
           "reps": 1, "probes": {"every8": {"every": 8, "align": "block"}}},
    reps=2, sections={"goodput": goodput_section})

if __name__ == "__main__":
    BENCHMARK.main()

"""Benchmark: what ``POST /v1/steering/vectors/train`` does to concurrent traffic.

A ``vllm-steer serve`` (eager) serves ``--clients`` streaming completion clients, each
sending requests of ``--output-len`` tokens back to back. Each repetition has a quiet
window (traffic only, ``--window`` seconds) and, per ``--budgets`` value, a training
window (a training job on the shipped ``happy`` recipe, trimmed to ``--max-suffixes``
openers, with ``--max-concurrent`` capture requests in flight at most, runs while the
traffic continues), in shuffled order. A budget is the job's ``engine_share``
(``extract.capture_budget``): ``default`` is the server's (the operator's, default
0.25), ``1`` turns the pacing off (the route before it had a budget). Inter-token latency
(ITL) = time between consecutive streamed chunks of one request; per window its median,
p90 and p99, and per repetition the ratio training / quiet.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import threading
import time
from typing import Any

from vllm_steer.bench.common import WORK_DIR, LoadTracker, bench_server, summarize
from vllm_steer.bench.harness import Benchmark, cell, comma_list, meta_lines


class Traffic:
    """Streaming clients; every chunk arrival is recorded with its request."""

    def __init__(self, url: str, clients: int, output_len: int, seed: int = 0) -> None:
        self.url, self.output_len = url, output_len
        self.stop = threading.Event()
        self.arrivals: list[list[float]] = []   # per request: chunk arrival times
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=600) as c:
            while not self.stop.is_set():
                prompt = [self.rng.randrange(300, 49000) for _ in range(32)]
                body = {"model": "bench", "prompt": prompt, "max_tokens": self.output_len,
                        "temperature": 0.0, "ignore_eos": True, "stream": True}
                times: list[float] = []
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:") and "[DONE]" not in line:
                            times.append(time.perf_counter())
                with self.lock:
                    self.arrivals.append(times)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)

    def itl_between(self, t0: float, t1: float) -> list[float]:
        """ITLs (ms) whose later chunk arrived in ``[t0, t1)``."""
        with self.lock:
            reqs = list(self.arrivals)
        return [1000 * (b - a) for ts in reqs for a, b in zip(ts, ts[1:], strict=False)
                if t0 <= b < t1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _stats(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median_ms": round(statistics.median(xs), 2),
            "p90_ms": round(_pct(xs, 0.9), 2), "p99_ms": round(_pct(xs, 0.99), 2)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-suffixes", type=int, default=64)
    p.add_argument("--window", type=float, default=30.0, help="quiet window, seconds")
    p.add_argument("--max-concurrent", type=int, default=8,
                   help="max_concurrent of the route's requests (capture requests in flight)")
    p.add_argument("--budgets", type=comma_list(str), default="default,1",
                   help="comma-separated engine shares of the training job, one training "
                        "window each per repetition ('default': the server's)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import yaml

    from vllm_steer.locations import find_config

    tag = "_quick" if args.quick else ""
    root = WORK_DIR / f"train_route{tag}"
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "uploads", ignore_errors=True)   # registrations of an earlier run
    reg = root / "registry.yaml"
    reg.write_text("allowed_dirs: []\nvectors: {}\n")
    recipe = yaml.safe_load(find_config("configs/vectors/happy.yaml").read_text())
    recipe["max_suffixes"] = args.max_suffixes
    res: dict[str, Any] = {}
    srv = bench_server(root / "server.log", reg)
    traffic = None
    try:
        srv.start()
        url = srv.url
        res["server_command"] = " ".join(srv.argv)
        res["workload"] = {"clients": args.clients, "output_len": args.output_len,
                           "recipe": "configs/vectors/happy.yaml",
                           "max_suffixes": args.max_suffixes, "quiet_window_s": args.window,
                           "max_concurrent": args.max_concurrent, "budgets": args.budgets}
        res["server_start_s"] = round(srv.startup_s, 1)
        load = LoadTracker()
        traffic = Traffic(url, args.clients, args.output_len)
        traffic.start()
        time.sleep(min(args.window, 10.0))   # warm-up: traffic reaches steady state
        kinds = ["quiet", *(f"training@share={b}" for b in args.budgets)]
        rng = random.Random(3)
        order = [w for _ in range(args.reps) for w in rng.sample(kinds, len(kinds))]
        windows: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        trains: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds[1:]}
        with httpx.Client(base_url=url, timeout=3600) as c:
            for k, w in enumerate(order):
                a = time.perf_counter()
                if w == "quiet":
                    time.sleep(args.window)
                else:
                    share = w.split("=")[1]
                    body: dict[str, Any] = {"name": f"bench_{k}", "recipe": recipe,
                                            "replace": True,
                                            "max_concurrent": args.max_concurrent}
                    if share != "default":
                        body["budget"] = {"engine_share": float(share)}
                    r = c.post("/v1/steering/vectors/train", json=body)
                    r.raise_for_status()
                    trains[w].append(r.json()["training"])
                windows[w].append((a, time.perf_counter()))
        res["load"] = load.finish()
    finally:
        if traffic is not None:
            traffic.finish()
        srv.stop()
    res["training_reports"] = {w: [{k: tr.get(k) for k in (
        "num_prompts", "mean_separation", "seconds", "budget", "capture_requests")}
        for tr in trs]
                               for w, trs in trains.items()}
    res["itl_quiet"] = _stats([x for a, b in windows["quiet"] for x in traffic.itl_between(a, b)])
    res["variants"] = {}
    for w in kinds[1:]:
        per_rep = []
        for (qa, qb), (ta, tb) in zip(windows["quiet"], windows[w], strict=True):
            q, t = traffic.itl_between(qa, qb), traffic.itl_between(ta, tb)
            per_rep.append({"quiet": _stats(q), "training": _stats(t),
                            "training_s": round(tb - ta, 1)})
        v: dict[str, Any] = {"raw": per_rep, "itl": _stats(
            [x for a, b in windows[w] for x in traffic.itl_between(a, b)]),
            "training_s": summarize(r["training_s"] for r in per_rep)}
        for key in ("median_ms", "p90_ms", "p99_ms"):
            v[f"itl_ratio_over_quiet_{key[:-3]}"] = summarize(
                r["training"][key] / r["quiet"][key] for r in per_rep
                if r["quiet"].get(key) and r["training"].get(key))
        res["variants"][w] = v
    print(json.dumps({"itl_quiet": res["itl_quiet"],
                      **{w: {k: v[k] for k in v if k != "raw"}
                         for w, v in res["variants"].items()}}, indent=1))
    return res


# -- report ---------------------------------------------------------------------------
def train_route_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    out = ["### The training route under traffic: inter-token latency", "", *meta_lines(d),
           f"- {wl['clients']} streaming clients x {wl['output_len']} tokens, back to back; "
           f"training job: `{wl['recipe']}` with {wl['max_suffixes']} openers; quiet windows "
           f"{wl['quiet_window_s']} s", "",
           f"Quiet ITL: {d['itl_quiet']}", "",
           "| training window | ITL median / quiet | p90 / quiet | p99 / quiet | "
           "job seconds |", "|---|---|---|---|---|"]
    variants = d.get("variants")
    if variants is None:   # a result file of the bench before it compared max_concurrent
        secs = [r["training_s"] for r in d["raw"]]
        variants = {f"max_concurrent: {wl.get('max_concurrent')}": {
            **{f"itl_ratio_over_quiet_{q}": d[f"itl_ratio_training_over_quiet_{q}"]
               for q in ("median", "p90", "p99")},
            "training_s": {"n": len(secs), "median": sorted(secs)[len(secs) // 2],
                           "min": min(secs), "max": max(secs)}}}
    for name, v in variants.items():
        out.append(f"| {name} | {cell(v['itl_ratio_over_quiet_median'], digits=2)} | "
                   f"{cell(v['itl_ratio_over_quiet_p90'], digits=2)} | "
                   f"{cell(v['itl_ratio_over_quiet_p99'], digits=2)} | "
                   f"{cell(v['training_s'], digits=1)} |")
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="train-route", module="train_route", doc=__doc__, add_arguments=add_arguments,
    run=run, quick={"clients": 2, "output_len": 16, "max_suffixes": 4, "window": 5.0,
                    "reps": 1},
    reps=3, sections={"train_route": train_route_section}, in_all=False)

if __name__ == "__main__":
    BENCHMARK.main()

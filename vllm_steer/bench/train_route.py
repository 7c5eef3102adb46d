"""Benchmark: what ``POST /v1/steering/vectors/train`` does to concurrent traffic.

A ``vllm-steer serve`` (eager) serves ``--clients`` streaming completion clients, each
sending requests of ``--output-len`` tokens back to back. Each repetition has a quiet
window (traffic only, ``--window`` seconds) and, per ``--max-concurrent`` value, a
training window (a training job on the shipped ``happy`` recipe, trimmed to
``--max-suffixes`` openers, with that many capture requests in flight, runs while the
traffic continues), in shuffled order. Inter-token latency (ITL) = time between consecutive
streamed chunks of one request; per window its median, p90 and p99, and per repetition
the ratio training / quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from vllm_steer.bench.common import (
    WORK_DIR,
    LoadTracker,
    header,
    summarize,
    write_result,
)
from vllm_steer.bench.serving import _free_port, _wait_ready


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


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-steer bench train-route", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-suffixes", type=int, default=64)
    p.add_argument("--window", type=float, default=30.0, help="quiet window, seconds")
    p.add_argument("--max-concurrent", default="8,1024",
                   help="comma-separated max_concurrent values of the route, one training "
                        "window each per repetition (1024: every capture request at once)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(list(argv))
    if a.quick:
        a.clients, a.output_len, a.max_suffixes, a.window, a.reps = 2, 16, 4, 5.0, 1
    a.max_concurrent = [int(x) for x in str(a.max_concurrent).split(",")]
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import httpx
    import yaml

    from vllm_steer.locations import find_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    tag = "_quick" if args.quick else ""
    root = WORK_DIR / f"train_route{tag}"
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "uploads", ignore_errors=True)   # registrations of an earlier run
    reg = root / "registry.yaml"
    reg.write_text("allowed_dirs: []\nvectors: {}\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    serve = [sys.executable, "-m", "vllm_steer.cli", "serve", "--registry", str(reg),
             "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
             "--gpu-memory-utilization", "0.5", "--max-model-len", "2048",
             "--served-model-name", "bench", "--enforce-eager"]
    recipe = yaml.safe_load(find_config("configs/vectors/happy.yaml").read_text())
    recipe["max_suffixes"] = args.max_suffixes
    res = header(argv, "train-route")
    res["server_command"] = " ".join(serve)
    res["workload"] = {"clients": args.clients, "output_len": args.output_len,
                       "recipe": "configs/vectors/happy.yaml", "max_suffixes": args.max_suffixes,
                       "quiet_window_s": args.window,
                       "max_concurrent": args.max_concurrent}
    log = open(root / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env)
    traffic = None
    try:
        t0 = time.perf_counter()
        _wait_ready(url, proc)
        res["server_start_s"] = round(time.perf_counter() - t0, 1)
        load = LoadTracker()
        traffic = Traffic(url, args.clients, args.output_len)
        traffic.start()
        time.sleep(min(args.window, 10.0))   # warm-up: traffic reaches steady state
        kinds = ["quiet", *(f"training@{m}" for m in args.max_concurrent)]
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
                    body: dict[str, Any] = {"name": f"bench_{k}", "recipe": recipe,
                                            "replace": True,
                                            "max_concurrent": int(w.split("@")[1])}
                    r = c.post("/v1/steering/vectors/train", json=body)
                    r.raise_for_status()
                    trains[w].append(r.json()["training"])
                windows[w].append((a, time.perf_counter()))
        res["load"] = load.finish()
    finally:
        if traffic is not None:
            traffic.finish()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    res["training_reports"] = {w: [{k: tr[k] for k in ("num_prompts", "mean_separation",
                                                        "seconds")} for tr in trs]
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
    write_result(args.out or f"train_route{tag}", res)
    print(json.dumps({"itl_quiet": res["itl_quiet"],
                      **{w: {k: v[k] for k in v if k != "raw"}
                         for w, v in res["variants"].items()}}, indent=1))
    return res


if __name__ == "__main__":
    main()

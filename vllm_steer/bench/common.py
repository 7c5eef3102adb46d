"""Shared helpers for the benchmarks: machine facts, load tracking, ratios, vectors, RSS.

Every comparison is a ratio measured side by side in one run: variants are interleaved
(shuffled per repetition) and each repetition yields one ratio against the baseline of
the same repetition; we report the median and the spread (min, max) over repetitions.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vllm_steer import envvars, locations
from vllm_steer.bench.launch import Server

#: The repository root in a source checkout (benchmarks/ holds RESULTS.md, notes.md and
#: results/ there), else None: an installed package writes to the working directory.
REPO = locations.source_checkout()
BENCH_DIR = REPO / "benchmarks" if REPO is not None else None
#: Where result JSON goes: ``$VLLMSTEER_BENCH_RESULTS`` (the tests use a tmp dir), else
#: ``benchmarks/results`` in a source checkout, else ``./bench-results``.
RESULTS_DIR = Path(envvars.get(envvars.BENCH_RESULTS)
                   or (BENCH_DIR / "results" if BENCH_DIR is not None else "bench-results")
                   ).resolve()
WORK_DIR = RESULTS_DIR / "work"
#: Where ``report`` writes RESULTS.md and the chart (the checkout's benchmarks/ only for
#: the checkout's own results); the hand-written analysis it appends.
REPORT_DIR = BENCH_DIR if BENCH_DIR is not None and RESULTS_DIR == BENCH_DIR / "results" \
    else RESULTS_DIR
NOTES = BENCH_DIR / "notes.md" if BENCH_DIR is not None else None

HIDDEN, NUM_LAYERS = 576, 30  # SmolLM2-135M


# -- machine and versions -----------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for mod in ("vllm", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - missing optional package
            out[mod] = "n/a"
    from vllm_steer.version import __version__

    out["vllm_steer"] = __version__
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10
                                    ).stdout.strip() if REPO is not None else "n/a"
    except Exception:
        out["git"] = "n/a"
    return out


def machine() -> dict[str, Any]:
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        mem_gib = None
    return {"cores": os.cpu_count(), "cpu_model": cpu_model(), "mem_gib": mem_gib,
            "platform": platform.platform()}


class LoadTracker:
    """Load average at start and end, plus a 1-min-loadavg sample every ``period`` s."""

    def __init__(self, period: float = 5.0) -> None:
        self.start = loadavg()
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._t.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.samples.append(os.getloadavg()[0])

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        s = self.samples or [self.start[0]]
        return {"start": self.start, "end": loadavg(), "min_1m": round(min(s), 2),
                "max_1m": round(max(s), 2), "mean_1m": round(sum(s) / len(s), 2)}


def header(argv: Sequence[str], name: str) -> dict[str, Any]:
    """The metadata every result file starts with (machine, versions, exact command)."""
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    cmd = " ".join([*(f"{k}={v}" for k, v in env.items()), "vllm-steer bench " + name,
                    *argv])
    return {"benchmark": name, "command": cmd, "argv": list(argv), "env": env,
            "machine": machine(), "versions": versions(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


#: Environment variables that change what a benchmark measures (recorded with results).
ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", envvars.DISABLE, "OMP_NUM_THREADS")


# -- statistics ---------------------------------------------------------------------------
def summarize(xs: Iterable[float]) -> dict[str, Any]:
    """Median and spread of per-repetition values."""
    v = [float(x) for x in xs]
    if not v:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(v), "median": round(statistics.median(v), 4), "min": round(min(v), 4),
            "max": round(max(v), 4),
            "stdev": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
            "values": [round(x, 4) for x in v]}


def interleaved(variants: Sequence[str], reps: int, seed: int = 0) -> list[tuple[int, str]]:
    """(rep, variant) pairs: every repetition runs every variant once, in shuffled order."""
    rng = random.Random(seed)
    order = []
    for r in range(reps):
        vs = list(variants)
        rng.shuffle(vs)
        order += [(r, v) for v in vs]
    return order


def ratios(times: dict[str, dict[int, float]], base: str, variant: str,
           higher_is_better: bool = True) -> list[float]:
    """Per-repetition ratio variant/base of a metric measured in the same repetition."""
    out = []
    for r, x in times[variant].items():
        b = times[base].get(r)
        if b:
            out.append(x / b if higher_is_better else b / x)
    return out


# -- workloads and vectors ----------------------------------------------------------------
def random_prompts(n: int, length: int = 32, seed: int = 0, vocab: int = 49152,
                   lo: int = 200) -> list[list[int]]:
    """``n`` fixed pseudo-random token-id prompts (same in every engine and run)."""
    rng = random.Random(seed)
    return [[rng.randrange(lo, vocab - 200) for _ in range(length)] for _ in range(n)]


def write_vectors(root: Path, specs: dict[str, Sequence[int]], seed: int = 1234,
                  norm_scale: float = 0.15) -> Path:
    """Random vectors ``{name: layers}`` for the default model and a registry; its path
    (``vllm_steer.fixtures.vectors.write_vectors``, the tests' writer)."""
    from vllm_steer.fixtures.vectors import write_vectors as write_random_vectors

    return write_random_vectors(root, specs, hidden=HIDDEN, norm_scale=norm_scale, seed=seed)


#: Vectors every benchmark uses: one on all layers, three to compose, eight for vs-hf.
BENCH_VECTORS: dict[str, Sequence[int]] = {
    "all30": range(NUM_LAYERS), "c1": range(NUM_LAYERS), "c2": range(5, 20),
    "c3": range(0, NUM_LAYERS, 3), **{f"h{i}": range(NUM_LAYERS) for i in range(8)},
    **{f"d{i}": range(NUM_LAYERS) for i in range(64)},
}


def bench_registry() -> Path:
    """Write (once per process) the benchmark vectors and registry; set the env var."""
    reg = write_vectors(WORK_DIR, BENCH_VECTORS)
    os.environ[envvars.REGISTRY] = str(reg)
    return reg


# -- output -------------------------------------------------------------------------------
def write_result(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def bench_server(log: Path, registry: Path | None = None, compiled: bool = False,
                 extra_args: tuple[str, ...] = ()) -> Server:
    """The benchmarks' ``vllm-steer serve`` of the default model, served as ``bench``
    (eager unless ``compiled``), logging to ``log`` (started afresh); not started yet."""
    from vllm_steer.default_model import resolve_model

    log.unlink(missing_ok=True)
    return Server(str(resolve_model(None)), registry, log, compiled=compiled,
                  extra_args=("--served-model-name", "bench", *extra_args),
                  start_timeout_s=600)


# -- peak memory of a process tree --------------------------------------------------------
class TreeMemory:
    """Peak summed RSS (and PSS, sampled less often) of a process and its descendants."""

    def __init__(self, pid: int, period: float = 0.25, pss_every: int = 8) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(period, pss_every), daemon=True)
        self._t.start()

    def _run(self, period: float, pss_every: int) -> None:
        import psutil

        k = 0
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            for p in procs:
                try:
                    if k % pss_every == 0:
                        mi = p.memory_full_info()
                        rss += mi.rss
                        pss += getattr(mi, "pss", mi.rss)
                    else:
                        rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            k += 1
            self._stop.wait(period)

    def finish(self) -> dict[str, float]:
        self._stop.set()
        self._t.join(timeout=5)
        return {"peak_rss_mib": round(self.peak_rss / 2**20, 1),
                "peak_pss_mib": round(self.peak_pss / 2**20, 1)}


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by a process and its live descendants.

    On a shared machine wall time depends on other people's load; CPU time of the engine
    processes mostly does not, so the benchmarks report tokens per CPU-second as well.
    """
    import psutil

    root = psutil.Process(pid or os.getpid())
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# -- line protocol for benchmark worker subprocesses -------------------------------------
TAG = "@@VLLM_STEER_BENCH@@ "


def emit(obj: dict[str, Any]) -> None:
    """Send one JSON message from a worker subprocess to its parent (over stdout)."""
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    """A worker subprocess that answers JSON commands on stdin with tagged JSON lines."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._log, text=True, bufsize=1, env=env)
        self.mem = TreeMemory(self.p.pid)

    def recv(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            self._log.write(line)
        raise RuntimeError(f"worker exited (rc={self.p.wait()}); see {self._log.name}")

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self.recv()

    def close(self) -> dict[str, float]:
        mem = self.mem.finish()
        try:
            if self.p.stdin:
                self.p.stdin.close()
            self.p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self._log.close()
        return mem


def serve_commands(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Worker loop: one JSON command per stdin line, one tagged reply each; EOF ends it."""
    emit({"ready": True})
    for line in sys.stdin:
        if line.strip():
            emit(handler(json.loads(line)))

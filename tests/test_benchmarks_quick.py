"""Quick benchmark runs, so that the benchmarks (``vllm_steer.bench``) cannot rot.

One eager engine (``vllm-steer bench overhead --quick``), the HF worker of ``vs-hf`` over
its line protocol, the argument parsers of the other benchmarks, the registry, the report
(through the thin caller in benchmarks/; from the committed results it must reproduce
``benchmarks/RESULTS.md``). Results go to a temporary directory
(``$VLLMSTEER_BENCH_RESULTS``), never to benchmarks/results.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _finite_pos(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_results")


def _env(results_dir: Path) -> dict[str, str]:
    return {**os.environ, "VLLMSTEER_BENCH_RESULTS": str(results_dir)}


@pytest.mark.engine
def test_overhead_quick(results_dir: Path, default_model_dir: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vllm_steer.cli", "bench", "overhead", "--quick"],
                       env=_env(results_dir), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((results_dir / "overhead_eager_quick.json").read_text())
    for key in ("machine", "versions", "command", "load", "engine", "workload", "groups",
                "slot_stats", "raw"):
        assert key in d, key
    assert d["mode"] == "eager"
    assert set(d["load"]) >= {"start", "end"}
    modes = d["groups"]["modes"]
    assert set(modes["ratios"]) == {"shared", "distinct", "distinct_vectors", "composed3",
                                    "generated", "thinking"}
    assert set(d["groups"]["ops"]["ratios"]) == {"ablate", "clamp", "add_normalize", "shared"}
    groups = set(d["groups"])
    assert {"batch2", "batch4", "layers"} <= groups
    for g in d["groups"].values():
        assert _finite_pos(g["baseline_tok_s"]["median"])
        assert set(g["cpu_ratios"]) == set(g["ratios"])
        for r in [*g["ratios"].values(), *g["cpu_ratios"].values()]:
            assert r["n"] == 2
            assert all(_finite_pos(x) for x in (r["median"], r["min"], r["max"]))
    stats = d["slot_stats"][0]
    # per layer: the delta row, then per projection a direction row and two scalars (fp32);
    # one fp32 normalize flag
    k = stats["max_projections"]
    assert k == 1  # the default
    assert stats["bytes_per_slot"] == 30 * (576 + k * (576 + 2)) * 4 + 4
    assert stats["live_digests"] == 0  # every slot released after the run

    rep = subprocess.run([sys.executable, str(BENCH / "report.py"), "--quick"],
                         env=_env(results_dir), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (results_dir / "RESULTS_quick.md").read_text()
    assert "Overhead, eager" in md and "| distinct |" in md
    assert (results_dir / "overhead_quick.png").stat().st_size > 0


def test_wire_quick(results_dir: Path) -> None:
    """Bytes per steered request through vLLM's IPC encoder: the earlier commit carried the
    vector's content in every request, the store transport carries an id, inline (Ray)
    the content again."""
    r = subprocess.run([sys.executable, "-m", "vllm_steer.cli", "bench", "wire", "--quick"],
                       env=_env(results_dir), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((results_dir / "wire_quick.json").read_text())
    vector_bytes = d["workload"]["vector_bytes"]
    (before,) = [k for k in d["summary"] if k.startswith("before")]
    s = {k: v["repeated_bytes"]["median"] for k, v in d["summary"].items()}
    assert s["after (store)"] < vector_bytes <= s[before]
    assert s["after (inline)"] >= vector_bytes
    pkgs = {k: {x["package"] for x in v} for k, v in d["raw"].items()}
    assert pkgs["after (store)"] == {str(REPO / "vllm_steer")} != pkgs[before]


def test_hf_worker_protocol(results_dir: Path, default_model_dir: str) -> None:
    """The vs-hf HF side answers a command over the worker line protocol."""
    from vllm_steer.bench.common import Worker
    from vllm_steer.bench.vs_hf import BENCHMARK

    w = Worker(BENCHMARK.worker_command(["--quick"], "hf"), results_dir / "hf_worker.log",
               env=_env(results_dir))
    try:
        assert w.recv() == {"ready": True}
        out = w.call(workload="spread", batch_size=4)
    finally:
        mem = w.close()
    assert (results_dir / "work" / "registry.yaml").is_file()  # the worker's, not the repo's
    assert out["tokens"] == 8 * 8  # 8 prompts x 8 tokens in quick mode
    assert _finite_pos(out["tok_s"])
    assert mem["peak_rss_mib"] > 100


def test_parsers_and_cli() -> None:
    from vllm_steer.bench import live_probe, memory, overhead, probe_forks, serving, vs_hf
    from vllm_steer.cli import build_parser

    probe = probe_forks.BENCHMARK.parse
    assert probe(["--quick"]).block_sizes == [32]
    assert probe_forks.choice_sets(probe([])) == [["Yes", "No"], ["20", "30", "40", "50"]]
    assert probe_forks.choice_sets(probe(["--choices", "New York, Chicago"])) == [
        ["New York", "Chicago"]]
    assert probe([]).neighbours == 8
    assert vs_hf.BENCHMARK.parse(["--quick"]).hf_batch_sizes == [4, 8]
    assert memory.BENCHMARK.parse(["--quick"]).variants == ["unsteered", "steered"]
    assert serving.BENCHMARK.parse(["--quick"]).num_prompts == 4
    live = live_probe.BENCHMARK.parse([])
    assert (live.every, live.concurrent, live.reps) == (16, 64, 5)
    # --quick sets the sizes; options given explicitly still apply
    q = overhead.BENCHMARK.parse(["--quick", "--reps", "3", "--compiled"])
    assert (q.reps, q.prompts, q.batch_sizes, q.groups) == (
        3, 4, [2, 4], ["modes", "ops", "batch", "layers"])
    assert q.result == "overhead_compiled_quick"
    assert overhead.BENCHMARK.parse(["--out", "overhead_capture"]).result == "overhead_capture"
    assert q.argv == ["--quick", "--reps", "3", "--compiled"]

    args, extra = build_parser().parse_known_args(["bench", "overhead", "--quick", "--reps", "3"])
    assert args.which == "overhead" and args.quick and extra == ["--reps", "3"]
    args, extra = build_parser().parse_known_args(["bench", "vs-hf", "--help"])
    assert args.which == "vs-hf" and args.help and extra == []


def test_registry() -> None:
    """One list of benchmark modules: the CLI's names, the thin callers in benchmarks/ and
    the report's result files all come from it."""
    from vllm_steer.bench.registry import MODULES, benchmarks
    from vllm_steer.cli import build_parser

    benches = benchmarks()
    assert [b.module for b in benches.values()] == list(MODULES)
    callers = {p.stem for p in BENCH.glob("*.py")} - {"refusal_demo"}  # a demo, not timed
    assert callers == {*MODULES, "report"}
    for stem in callers:
        assert 'f"vllm_steer.bench.{Path(__file__).stem}"' in (BENCH / f"{stem}.py").read_text()
    for name in [*benches, "all", "report"]:
        assert build_parser().parse_known_args(["bench", name])[0].which == name
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(["bench", "vs_hf"])  # a module, not a name
    owners: dict[str, str] = {}
    for name, b in benches.items():
        assert b.parser().prog == f"vllm-steer bench {name}"
        default = b.parse([]).result
        assert default in b.sections or not b.sections, (name, default)
        for result in b.sections:
            assert owners.setdefault(result, name) == name, result  # one owner per result
    stems = {p.stem for p in (BENCH / "results").glob("*.json")}
    assert stems - set(owners) <= {"profile"}  # profile.json has no report section


def test_report_reproduces_results_md(tmp_path: Path) -> None:
    """The committed result files give exactly the committed RESULTS.md, every result
    file rendered by its benchmark's section."""
    for f in (BENCH / "results").glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    rep = subprocess.run([sys.executable, str(BENCH / "report.py")], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (tmp_path / "RESULTS.md").read_text()
    assert "result file incomplete" not in md
    assert md == (BENCH / "RESULTS.md").read_text()
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_extract_bench_arguments() -> None:
    """``vllm-steer bench extract``: the engine vs HF extraction benchmark's options."""
    from vllm_steer.bench.extract import BENCHMARK
    from vllm_steer.bench.registry import benchmarks

    assert benchmarks()["extract"] is BENCHMARK and BENCHMARK.in_all
    quick = BENCHMARK.parse(["--quick"])
    assert (quick.pairs, quick.reps) == (32, 1)
    assert BENCHMARK.parse(["--quick", "--pairs", "8"]).pairs == 8
    full = BENCHMARK.parse(["--reps", "5"])
    assert full.pairs is None and full.reps == 5 and full.hf_threads >= 1

"""``vllm-steer bench``: run one benchmark module (``vllm_steer.bench.NAME``) or all.

Each benchmark runs in its own Python process (so it gets fresh engines and its own
peak-memory accounting). Results go to ``vllm_steer.bench.common.RESULTS_DIR``
(``benchmarks/results`` in a source checkout, else ``./bench-results``;
``$VLLMSTEER_BENCH_RESULTS`` overrides); ``report`` turns them into ``RESULTS.md`` and a
chart.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

#: ``vllm-steer bench NAME`` -> module in ``vllm_steer.bench``.
MODULES = {"overhead": "overhead", "vs-hf": "vs_hf", "probe": "probe_forks", "extract": "extract",
           "train-route": "train_route", "serving": "serving", "memory": "memory",
           "wire": "wire", "live": "live_probe", "early-exit": "early_exit",
           "report": "report"}
#: ``wire`` compares against an earlier commit, so it needs a source checkout: not in ``all``
#: (nor ``train-route``, a server under traffic for minutes).
#: What ``all`` runs, in order (cheapest first; serving last).
ALL = ("overhead", "probe", "memory", "vs-hf", "extract", "serving", "live", "early-exit",
       "report")


def run_script(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` with ``argv`` in a fresh interpreter; its exit status."""
    print(f"== vllm-steer bench {name} {' '.join(argv)}".rstrip(), file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", f"vllm_steer.bench.{MODULES[name]}", *argv])


def run(which: str, quick: bool, extra: list[str]) -> int:
    """Run one benchmark (``extra`` args go to its script) or ``all`` of them."""
    flags = ["--quick"] if quick else []
    if which != "all":
        return run_script(which, [*flags, *extra])
    if extra:
        raise ValueError("`bench all` takes only --quick; run benchmarks one by one for options")
    rc = 0
    for name in ALL:
        rc = run_script(name, [] if name == "report" else flags) or rc
    return rc


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand (registered by ``vllm_steer.cli``)."""
    p = sub.add_parser(
        "bench", help="run benchmarks (overhead, vs-hf, probe, extract, train-route, "
                      "serving, memory, wire, live, early-exit, all, report)",
        description="Run a benchmark (module vllm_steer.bench.NAME). Unknown options go to "
                    "it (e.g. `vllm-steer bench overhead --compiled --reps 5`; see "
                    "`python -m vllm_steer.bench.overhead --help`). Results: "
                    "benchmarks/results in a source checkout, else ./bench-results "
                    "($VLLMSTEER_BENCH_RESULTS overrides).")
    p.add_argument("which", choices=[*MODULES, "all"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (what the tests run)")

    def _run(args: argparse.Namespace) -> int:
        return run(args.which, args.quick, list(args.extra))

    p.set_defaults(func=_run, accepts_extra=True)

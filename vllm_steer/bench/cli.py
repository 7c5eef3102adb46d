"""``vllm-steer bench``: run one benchmark (``registry.MODULES``), ``all`` or ``report``.

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

from vllm_steer.bench.registry import benchmarks


def run_script(module: str, argv: list[str], label: str) -> int:
    """Run ``vllm_steer.bench.MODULE`` with ``argv`` in a fresh interpreter; its exit status."""
    print(f"== vllm-steer bench {label} {' '.join(argv)}".rstrip(), file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", f"vllm_steer.bench.{module}", *argv])


def run(which: str, quick: bool, extra: list[str]) -> int:
    """Run one benchmark (``extra`` args go to it), ``report``, or ``all`` benchmarks
    marked ``in_all`` and then the report."""
    flags = ["--quick"] if quick else []
    if which == "report":
        return run_script("report", [*flags, *extra], "report")
    if which != "all":
        return run_script(benchmarks()[which].module, [*flags, *extra], which)
    if extra:
        raise ValueError("`bench all` takes only --quick; run benchmarks one by one for options")
    rc = 0
    for name, b in benchmarks().items():
        if b.in_all:
            rc = run_script(b.module, flags, name) or rc
    return run_script("report", [], "report") or rc


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand (registered by ``vllm_steer.cli``)."""
    names = [*benchmarks(), "all", "report"]
    p = sub.add_parser(
        "bench", add_help=False, help=f"run benchmarks ({', '.join(names)})",
        description="Run a benchmark (module vllm_steer.bench.MODULE). Unknown options go to "
                    "it (e.g. `vllm-steer bench overhead --compiled --reps 5`; "
                    "`vllm-steer bench overhead --help` lists them). Results: "
                    "benchmarks/results in a source checkout, else ./bench-results "
                    "($VLLMSTEER_BENCH_RESULTS overrides).")
    p.add_argument("which", choices=names, nargs="?")
    p.add_argument("--quick", action="store_true", help="tiny sizes (what the tests run)")
    p.add_argument("-h", "--help", action="store_true",
                   help="this help; after a benchmark's name, that benchmark's options")

    def _run(args: argparse.Namespace) -> int:
        if args.which is None and not args.help:
            p.error("name a benchmark, all or report")
        if args.which is None or (args.help and args.which == "all"):
            p.print_help()
            return 0
        return run(args.which, args.quick, ["--help"] * args.help + list(args.extra))

    p.set_defaults(func=_run, accepts_extra=True)

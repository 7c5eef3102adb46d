"""``vllm-steer bench``: run the repository's benchmark scripts (``benchmarks/*.py``).

``benchmarks/`` is not an installed package: it is located next to this package in a
source checkout / editable install, and each script runs in its own Python process (so
every benchmark gets fresh engines and its own peak-memory accounting). Results go to
``benchmarks/results/*.json``; ``report`` turns them into ``benchmarks/RESULTS.md`` and a
chart.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

#: ``vllm-steer bench NAME`` -> script in ``benchmarks/``.
SCRIPTS = {"overhead": "overhead.py", "vs-hf": "vs_hf.py", "probe": "probe_forks.py",
           "serving": "serving.py", "memory": "memory.py", "report": "report.py"}
#: What ``all`` runs, in order (cheapest first; serving last).
ALL = ("overhead", "probe", "memory", "vs-hf", "serving", "report")


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` directory (source checkout / editable install)."""
    d = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (d / "common.py").is_file():
        raise FileNotFoundError(f"benchmarks directory not found at {d}; `vllm-steer bench` "
                                "needs a source checkout (pip install -e .)")
    return d


def run_script(name: str, argv: list[str]) -> int:
    """Run ``benchmarks/<script> argv`` in a fresh interpreter; its exit status."""
    script = benchmarks_dir() / SCRIPTS[name]
    print(f"== vllm-steer bench {name} {' '.join(argv)}".rstrip(), file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, str(script), *argv])


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
        "bench", help="run benchmarks (overhead, vs-hf, probe, serving, memory, all, report)",
        description="Run a benchmark script from the repository's benchmarks/ directory. "
                    "Unknown options go to the script (e.g. `vllm-steer bench overhead "
                    "--compiled --reps 5`; see `python benchmarks/overhead.py --help`).")
    p.add_argument("which", choices=[*SCRIPTS, "all"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (what the tests run)")

    def _run(args: argparse.Namespace) -> int:
        return run(args.which, args.quick, list(args.extra))

    p.set_defaults(func=_run, accepts_extra=True)

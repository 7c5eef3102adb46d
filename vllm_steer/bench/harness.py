"""What a benchmark declares, and how every benchmark runs and reports.

A benchmark module defines ``BENCHMARK = Benchmark(...)``: its name (``vllm-steer bench
NAME``), its own options, ``run(args) -> result`` and its report sections, and ends with
``BENCHMARK.main()``. The harness adds the common options (``--quick``, ``--out``,
``--reps``, the hidden ``--worker``), starts the result with the metadata header
(``common.header``) and writes it to ``RESULTS_DIR/<result name>.json``. The registry
(``registry.py``) lists the modules; the helpers below format report sections.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import header, write_result

#: A report section: a result file's data -> markdown lines (ending with a blank line).
Section = Callable[[dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark. ``run`` gets the parsed options plus ``argv`` (the command line, for
    worker processes) and ``result`` (the result name); it returns what follows the header
    in the result file."""

    name: str                                   # ``vllm-steer bench NAME``
    module: str                                 # ``vllm_steer.bench.MODULE``
    doc: str                                    # the module docstring (``--help``)
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    #: The result's name without ``_quick`` (default: the module's name).
    result_name: Callable[[argparse.Namespace], str] | None = None
    #: ``--quick`` sizes: defaults for the options (ones given explicitly still apply).
    quick: Mapping[str, Any] = field(default_factory=dict)
    reps: int | None = None                     # ``--reps`` default (None: no such option)
    #: Report: result name -> its section, in report order.
    sections: Mapping[str, Section] = field(default_factory=dict)
    #: A figure from the loaded results (``{result name: data}``) at a path; None: nothing.
    chart: Callable[[dict[str, dict[str, Any]], Path], Path | None] | None = None
    #: Roles of worker processes (``--worker ROLE``, see ``worker_command``), and their code.
    workers: tuple[str, ...] = ()
    worker: Callable[[argparse.Namespace], None] | None = None
    in_all: bool = True                         # run by ``vllm-steer bench all``

    def parser(self) -> argparse.ArgumentParser:
        """The command line: the common options, then the benchmark's own."""
        p = argparse.ArgumentParser(prog=f"vllm-steer bench {self.name}", description=self.doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--quick", action="store_true",
                       help="tiny sizes (what the tests run); options given still apply")
        p.add_argument("--out", default=None, metavar="NAME",
                       help="result name: NAME.json in the results directory (default: "
                            "the benchmark's, with _quick in quick mode)")
        if self.reps is not None:
            p.add_argument("--reps", type=int, default=self.reps,
                           help="repetitions (variants interleaved in each)")
        if self.workers:
            p.add_argument("--worker", choices=self.workers, help=argparse.SUPPRESS)
        self.add_arguments(p)
        return p

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """The options of ``argv``, with ``argv`` and ``result`` (the result name) added."""
        p = self.parser()
        if p.parse_known_args(argv)[0].quick:
            p.set_defaults(**self.quick)
        args = p.parse_args(list(argv))
        args.argv = list(argv)
        stem = self.result_name(args) if self.result_name else self.module
        args.result = args.out or stem + ("_quick" if args.quick else "")
        return args

    def worker_command(self, argv: Sequence[str], role: str) -> list[str]:
        """Command line of a worker process: this benchmark's ``argv`` in a fresh
        interpreter, as worker ``role``."""
        return [sys.executable, "-m", f"vllm_steer.bench.{self.module}", *argv,
                "--worker", role]

    def main(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Run with ``argv`` (default: this process's); the result (also written)."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        args = self.parse(list(sys.argv[1:] if argv is None else argv))
        if getattr(args, "worker", None):
            assert self.worker is not None
            self.worker(args)
            return {}
        res = header(args.argv, self.name)
        res.update(self.run(args))
        write_result(args.result, res)
        return res


def comma_list(kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """An argparse ``type``: ``"8,32"`` -> ``[8, 32]`` (with ``kind=int``)."""
    def parse(s: str) -> list[Any]:
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


# -- report sections ------------------------------------------------------------------
def cell(x: dict[str, Any] | None, pct: bool = False, digits: int = 3) -> str:
    """``median [min, max] (n)`` of a summary (``common.summarize``)."""
    if not x or x.get("median") is None:
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(x['median'])} [{f(x['min'])}, {f(x['max'])}] (n={x['n']})"


def verdict(r: dict[str, Any], target: float) -> str:
    """Whether a ratio's median meets ``target``."""
    if r["median"] is None:
        return "n/a"
    return "met" if r["median"] >= target else \
        f"missed by {100 * (target - r['median']):.1f} points"


def meta_lines(d: dict[str, Any]) -> list[str]:
    """Command, machine, versions and load of a result, as list items."""
    m, v, ld = d["machine"], d["versions"], d.get("load") or {}
    lines = [f"- command: `{d['command']}`  (started {d['started']})",
             f"- machine: {m['cores']} cores, {m['cpu_model']}, {m.get('mem_gib')} GiB; "
             f"vLLM {v['vllm']}, torch {v['torch']}, transformers {v['transformers']}, "
             f"Python {v['python']}, git {v['git']}"]
    if ld:
        lines.append(f"- load average (1/5/15 min) at start {ld['start']}, at end {ld['end']}; "
                     f"1-min samples during the run: min {ld['min_1m']}, mean {ld['mean_1m']},"
                     f" max {ld['max_1m']}")
    return lines


def retitled(section: Section, old: str, new: str) -> Section:
    """``section`` under another heading: the first ``old`` of each line becomes ``new``."""
    def out(d: dict[str, Any]) -> list[str]:
        return [line.replace(old, new, 1) for line in section(d)]
    return out

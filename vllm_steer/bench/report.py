"""Write ``RESULTS.md`` and the benchmarks' charts from ``results/*.json``.

Each benchmark (``registry.MODULES``, in that order) renders its own result files
(``Benchmark.sections``) and charts. In a source checkout the report goes to
``benchmarks/`` and the hand-written analysis in ``benchmarks/notes.md`` is included
verbatim; an installed package writes it next to its results (``common.RESULTS_DIR``).
``--quick`` reports the ``*_quick.json`` files instead (to a separate
``results/RESULTS_quick.md``) so a quick run never overwrites the real report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from vllm_steer.bench.common import NOTES, REPORT_DIR, RESULTS_DIR
from vllm_steer.bench.registry import benchmarks

INTRO = ("Every number is a ratio measured side by side in one run: the variants run "
         "interleaved (shuffled per repetition) on the same engine (or, for vs-HF and "
         "memory, in sibling processes driven alternately), each repetition gives one "
         "ratio, and tables show `median [min, max] (n=repetitions)`. The machine is "
         "shared with other work, so absolute times are not comparable across runs; "
         "the load average during each run is listed. Regenerate this file with "
         "`vllm-steer bench report` (tables from `benchmarks/results/*.json`, analysis "
         "from `benchmarks/notes.md`).")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="vllm-steer bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="report the *_quick.json results")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    suffix = "_quick" if args.quick else ""
    out_md = RESULTS_DIR / "RESULTS_quick.md" if args.quick else REPORT_DIR / "RESULTS.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)  # an installed package: ./bench-results
    lines = ["# vllm-steer benchmark results", "", INTRO, ""]
    if NOTES is not None and NOTES.is_file() and not args.quick:
        lines += [NOTES.read_text().rstrip(), ""]
    lines += ["## Tables", ""]
    figures, found, missing = [], [], []
    for bench in benchmarks().values():
        results = {}
        for name, section in bench.sections.items():
            path = RESULTS_DIR / f"{name}{suffix}.json"
            if not path.is_file():
                missing.append(name)
                continue
            results[name] = d = json.loads(path.read_text())
            try:
                lines += section(d)
            except (KeyError, TypeError, ZeroDivisionError) as e:
                lines += [f"### {name}: result file incomplete ({type(e).__name__}: {e})", ""]
        found += results
        png = (RESULTS_DIR if args.quick else REPORT_DIR) / f"{bench.module}{suffix}.png"
        if bench.chart is not None and bench.chart(results, png):
            figures += [f"![{bench.module}]({png.relative_to(out_md.parent).as_posix()})", ""]
    lines += figures
    if missing:
        lines += ["Not run (no result file): " + ", ".join(missing), ""]
    out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_md}", file=sys.stderr)
    return {"results": sorted(found), "path": str(out_md)}


if __name__ == "__main__":
    main()

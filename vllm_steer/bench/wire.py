"""What one steered request costs between the API front end and the engine, before vs after.

For a synthetic large-model vector (default 80 layers x 8192 hidden, fp32: 2.6 MB), each
request is passed through the front end's admission hook (``steer_request``: parse,
validate, resolve, encode), its ``SamplingParams`` are serialized with vLLM's own IPC
encoder (``MsgpackEncoder``, what crosses to the engine core with every request), sent
over a ZMQ ``ipc://`` socket to a second process that decodes them with vLLM's
``MsgpackDecoder`` and answers (as the engine core receives requests). Reported per
request: bytes serialized beyond the same request unsteered; the hook's time; and the
time from admission to decoded-on-the-other-side (hook + encode + IPC + decode). The
first request of a vector is reported apart from the repeated ones.

"Before" is an earlier commit of this package (``--before``, default the last commit
before the vector store: composed deltas travelled with every request), extracted from
this source checkout with ``git archive`` and imported in its own process; "after" is
this package, with its default transport (``store``: the request carries the recipe's
content id) and with ``inline`` (the transport used under Ray: content in every request).
Each variant runs in a fresh process, rounds interleaved.

No model and no engine: the front end sees a stand-in for vLLM's ``InputProcessor``
holding only what the hook reads (the model's layer count and hidden size, the engine
options). Run: ``vllm-steer bench wire`` (from a source checkout, for ``--before``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import summarize
from vllm_steer.bench.harness import Benchmark, cell, meta_lines

#: The last commit whose wire carried composed deltas (before "Beyond addition").
DEFAULT_BEFORE = "f5b313e"


def _extract(commit: str, dest: Path) -> tuple[Path, str]:
    from vllm_steer.locations import source_checkout

    repo = source_checkout()
    if repo is None:
        raise SystemExit("--before needs a source checkout of vllm-steer (git history)")
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "vllm_steer"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", commit],
                         check=True, capture_output=True, text=True).stdout.strip()
    return dest, rev


def _run_variant(root: Path | None, transport: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vs-wire-") as work:
        env = {**os.environ, "VLLMSTEER_HOME": str(Path(work) / "home")}
        env.pop("VLLMSTEER_REGISTRY", None)
        # the package under test first on the path: the old one, or this one
        env["PYTHONPATH"] = str(root if root is not None else Path(__file__).parents[2])
        cmd = [sys.executable, str(Path(__file__).with_name("wire_worker.py").resolve()),
               "--work", work, "--layers", str(args.layers), "--hidden", str(args.hidden),
               "--requests", str(args.requests), "--transport", transport]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                           cwd=work)
        if r.returncode != 0:
            raise RuntimeError(f"wire worker ({transport}, {root}) failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vs-wire-before-") as tmp:
        before_root, rev = _extract(args.before, Path(tmp))
        variants = {f"before ({rev})": (before_root, "default"),
                    "after (store)": (None, "default"),
                    "after (inline)": (None, "inline")}
        raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in tqdm(range(args.rounds), desc="wire rounds"):
            for v, (root, transport) in variants.items():
                raw[v].append(_run_variant(root, transport, args))
    res["workload"] = {"layers": args.layers, "hidden": args.hidden,
                       "vector_bytes": args.layers * args.hidden * 4,
                       "requests_per_round": args.requests, "rounds": args.rounds}
    res["raw"] = raw
    res["summary"] = {v: {"repeated_bytes": summarize(x["repeated"]["bytes"] for x in rs),
                          "repeated_total_ms": summarize(x["repeated"]["total_ms"] for x in rs),
                          "repeated_hook_ms": summarize(x["repeated"]["hook_ms"] for x in rs),
                          "first_bytes": summarize(x["first"]["bytes"] for x in rs),
                          "first_total_ms": summarize(x["first"]["total_ms"] for x in rs),
                          "unsteered_total_ms": summarize(x["unsteered_total_ms"] for x in rs),
                          "added_ms": summarize(x["repeated"]["total_ms"]
                                                - x["unsteered_total_ms"] for x in rs)}
                      for v, rs in raw.items()}
    b = next(iter(raw))
    res["before_over_after_store"] = {
        "bytes": summarize(x["repeated"]["bytes"] / max(y["repeated"]["bytes"], 1)
                           for x, y in zip(raw[b], raw["after (store)"], strict=True)),
        "total_ms": summarize(x["repeated"]["total_ms"] / y["repeated"]["total_ms"]
                              for x, y in zip(raw[b], raw["after (store)"], strict=True)),
        "added_ms": summarize(
            (x["repeated"]["total_ms"] - x["unsteered_total_ms"])
            / max(y["repeated"]["total_ms"] - y["unsteered_total_ms"], 1e-6)
            for x, y in zip(raw[b], raw["after (store)"], strict=True)),
        "hook_ms": summarize(x["repeated"]["hook_ms"] / y["repeated"]["hook_ms"]
                             for x, y in zip(raw[b], raw["after (store)"], strict=True))}
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--requests", type=int, default=200, help="repeated requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default=DEFAULT_BEFORE, help="commit to compare against")


# -- report ---------------------------------------------------------------------------
def wire_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    sm = d["summary"]
    out = [f"### Front end to engine per steered request ({wl['layers']} layers x "
           f"{wl['hidden']} hidden fp32 = {wl['vector_bytes'] / 1e6:.1f} MB vector)", "",
           *meta_lines(d),
           f"- {wl['requests_per_round']} repeated requests per round (scale varying), "
           f"{wl['rounds']} rounds, each variant in a fresh process per round; bytes: "
           "vLLM's `MsgpackEncoder` on the request's `SamplingParams`, minus the same "
           "request unsteered; hook: the admission hook alone; to engine: admission "
           "hook + encode + ZMQ ipc send + `MsgpackDecoder` in a second process (medians "
           "per round; the table shows their median [min, max] over rounds)", "",
           "| variant | bytes / request | hook ms | to engine ms | unsteered to engine ms "
           "| added by steering ms | first request: bytes | first request: to engine ms |",
           "|---|---|---|---|---|---|---|---|"]
    for v, r in sm.items():
        out.append(f"| {v} | {cell(r['repeated_bytes'], digits=0)} | "
                   f"{cell(r['repeated_hook_ms'])} | {cell(r['repeated_total_ms'])} | "
                   f"{cell(r.get('unsteered_total_ms'))} | {cell(r.get('added_ms'))} | "
                   f"{cell(r['first_bytes'], digits=0)} | {cell(r['first_total_ms'])} |")
    bo = d["before_over_after_store"]
    out += ["", f"Before / after (store), per round: bytes {cell(bo['bytes'], digits=1)}, "
            f"admission to engine {cell(bo['total_ms'], digits=1)}, time added by steering "
            f"(to engine, minus the unsteered request's) {cell(bo.get('added_ms'), digits=1)}, "
            "hook alone "
            f"{cell(bo.get('hook_ms'), digits=1)}.", ""]
    return out


BENCHMARK = Benchmark(
    name="wire", module="wire", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"layers": 4, "hidden": 64, "requests": 5, "rounds": 1},
    sections={"wire": wire_section}, in_all=False)

if __name__ == "__main__":
    BENCHMARK.main()

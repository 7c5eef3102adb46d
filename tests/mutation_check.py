"""Mutation check: deliberate bugs in ``vllm_steer`` that the tests must catch.

    python -m tests.mutation_check [NAME ...] [--list] [--baseline] [--engine]
                                   [--out FILE] [--timeout S] [--tests ARGS] [--keep]

For each mutation (``MUTATIONS``) the tracked files of the working tree (``git ls-files``;
symlinks such as ``configs`` stay symlinks) are copied to a fresh temporary directory, one
exact string replacement is made in one production file (a mutation whose old string is not
found exactly once is an error naming it, never a silent pass), and pytest runs the
mutation's small test selection in that copy (``PYTHONPATH`` = the copy, so the copy's
``vllm_steer`` is imported; checked before pytest runs). Outcomes:

- ``KILLED``: pytest exit code 1 (tests failed), the failing tests are listed;
- ``SURVIVED``: exit code 0, no selected test noticed the bug;
- ``ERROR``: anything else (collection error, timeout, no tests collected, ...);
- ``NEEDS-ENGINE``: the selection starts a vLLM engine and ``--engine`` was not given (not
  run).

``--baseline`` runs every selection on an unmodified copy instead (``PASSED`` expected)
and checks that each mutation still applies. ``--tests`` replaces the selections (to look
for a smaller or engine-free one). Run it niced when other work shares the machine
(``nice -n 19 python -m tests.mutation_check``); children inherit the niceness.

Exit status: 0 when every selected mutation was KILLED (baseline: every selection PASSED);
3 when the only rows missing are NEEDS-ENGINE; 1 otherwise; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
UNIT_TIMEOUT_S = 300
ENGINE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace ``old`` (exactly once) by ``new`` in ``path``, then run
    ``selection`` (pytest arguments) expecting a failure."""

    name: str
    path: str
    old: str
    new: str
    selection: tuple[str, ...]
    what: str
    engine: bool = False

    @property
    def timeout_s(self) -> int:
        return ENGINE_TIMEOUT_S if self.engine else UNIT_TIMEOUT_S


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "fork_suffix", "vllm_steer/probe/job.py",
        "base = seq[:n_prompt + p] + (list(self.te) if thinking else []) \\\n"
        "                    + self.suffix_ids\n",
        "base = seq[:n_prompt + p] + (list(self.te) if thinking else [])\n",
        ("tests/test_probe_units.py::test_fork_plan_closes_thinking_and_appends_suffix",),
        "probe forks read the choices without the forcing suffix after the think-end marker"),
    Mutation(
        "variant_rule", "vllm_steer/probe/choices.py",
        "single = [(i,) for i in found[k]]",
        "single = [(i,) for i in found[k][:1]]",
        ("tests/test_probe_units.py::test_choice_variants_come_from_the_tokenizer",),
        "a choice keeps only its first single-token variant ('Yes' but not ' Yes', 'yes', ...)"),
    Mutation(
        "thinking_tracker", "vllm_steer/steering/think_tracker.py",
        "out[j] = before == want and self.state == want",
        "out[j] = self.state == want",
        ("tests/test_steering_units.py::test_think_tracker_is_causal_and_chunk_invariant",),
        "the token completing a marker is steered (off by one: thinking starts on <think>)"),
    Mutation(
        "clamp_formula", "vllm_steer/steering/program.py",
        'else (1.0, part.param)',
        'else (0.0, part.param)',
        ("tests/test_steering_engine.py::test_ops_match_hf_reference_in_a_mixed_batch",),
        "clamp adds value * r without removing the old component (h + value r, not "
        "h + (value - h.r) r)", engine=True),
    Mutation(
        "layer_index", "vllm_steer/steering/slots.py",
        "rows = list(c.layers)",
        "rows = [layer - 1 for layer in c.layers]",
        ("tests/test_steering_units.py::test_slots_refcount_free_and_evict",),
        "each layer's vector is uploaded into the previous layer's table (layer 0's into "
        "the last layer's)"),
    Mutation(
        "start_position", "vllm_steer/vllm_adapter/runner.py",
        "lo, hi = max(st.start, first), min(st.end, first + n)",
        "lo, hi = max(st.start + 1, first), min(st.end, first + n)",
        ("tests/test_steering_engine.py::test_start_position_matches_reference",),
        "the per-token selection starts one token after start_position (and after the prompt "
        "for apply_to generated)", engine=True),
    Mutation(
        "noop_add", "vllm_steer/steering/layers.py",
        "x = x + self._vllm_steer_add[rows]",
        "x = x + 0 * self._vllm_steer_add[rows]",
        ("tests/test_layer_adapters.py::test_stream_kinds_add_to_the_stream",),
        "the traced forward adds 0 x the add table (every add op is a no-op)"),
)
BY_NAME = {m.name: m for m in MUTATIONS}


class MutationError(RuntimeError):
    """A mutation that does not apply (its old string is not in the file exactly once)."""


@dataclass
class Result:
    """One row of the table (and of ``--out``)."""

    name: str
    file: str
    status: str
    selection: list[str]
    engine: bool
    returncode: int | None = None
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    detail: str = ""
    old: str = ""
    new: str = ""


# -- the copy -----------------------------------------------------------------------------
def tracked_files(repo: Path = REPO) -> list[str]:
    """Paths of ``git ls-files`` (relative, working tree)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, check=True,
                         capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def copy_tree(dest: Path, repo: Path = REPO) -> None:
    """Copy the tracked files of ``repo``'s working tree into ``dest``; symlinks stay
    symlinks, tracked files deleted from the working tree are left out."""
    for rel in tracked_files(repo):
        src, dst = repo / rel, dest / rel
        if not src.is_symlink() and not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def apply(m: Mutation, root: Path) -> None:
    """Make ``m``'s replacement in ``root``; ``MutationError`` unless it matches once."""
    path = root / m.path
    if not path.is_file():
        raise MutationError(f"mutation {m.name}: {m.path} does not exist")
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise MutationError(f"mutation {m.name}: old string found {n} times in {m.path} "
                            f"(expected exactly once): {m.old!r}")
    path.write_text(text.replace(m.old, m.new))


def check_applies(m: Mutation, repo: Path = REPO) -> None:
    """Raise ``MutationError`` if ``m`` would not apply to the working tree."""
    text = (repo / m.path).read_text() if (repo / m.path).is_file() else ""
    n = text.count(m.old)
    if n != 1:
        raise MutationError(f"mutation {m.name}: old string found {n} times in {m.path} "
                            f"(expected exactly once): {m.old!r}")


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}


def check_import(root: Path) -> None:
    """Fail unless ``vllm_steer`` resolves to the copy under ``root`` (not the editable
    install of the working tree)."""
    code = "import importlib.util as u; print(u.find_spec('vllm_steer').origin)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root),
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"the copy at {root} imports vllm_steer from {out}")


# -- pytest ---------------------------------------------------------------------------------
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)")


def failed_tests(output: str) -> list[str]:
    """Node ids of the ``FAILED``/``ERROR`` lines of pytest's short summary."""
    seen: dict[str, None] = {}
    for line in output.splitlines():
        match = _SUMMARY.match(line)
        if match:
            seen[match.group(2)] = None
    return list(seen)


def run_pytest(root: Path, selection: Sequence[str], timeout_s: float
               ) -> tuple[int | None, str, float]:
    """``(exit code or None on timeout, output, seconds)`` of pytest on ``selection`` in
    ``root``; on timeout the whole process group (engines included) is killed."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out = ""
        return None, out or "", time.monotonic() - t0


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])


def run_one(m: Mutation, selection: Sequence[str], timeout_s: float, baseline: bool,
            keep: bool) -> Result:
    """Copy, mutate (unless ``baseline``), run ``selection``; the row for ``m``."""
    res = Result(m.name, m.path, "", list(selection), m.engine, old=m.old, new=m.new)
    tmp = Path(tempfile.mkdtemp(prefix=f"mutation-{m.name}-"))
    try:
        root = tmp / "repo"
        copy_tree(root)
        if baseline:
            check_applies(m)
        else:
            apply(m, root)
        check_import(root)
        code, out, res.seconds = run_pytest(root, selection, timeout_s)
        res.returncode, res.failed = code, failed_tests(out)
        if baseline:
            res.status = "PASSED" if code == 0 else "FAILED" if code == 1 else "ERROR"
        else:
            res.status = "KILLED" if code == 1 else "SURVIVED" if code == 0 else "ERROR"
        if code is None:
            res.detail = f"timed out after {timeout_s:.0f} s\n" + _tail(out)
        elif res.status == "KILLED":
            res.detail = "\n".join(line[:200] for line in out.splitlines()
                                   if _SUMMARY.match(line))
        elif res.status != "PASSED":
            res.detail = _tail(out)
    except MutationError as e:
        res.status, res.detail = "ERROR", str(e)
    finally:
        if keep:
            res.detail = (res.detail + f"\ncopy kept at {tmp}").strip()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return res


# -- output -----------------------------------------------------------------------------------
def _short(selection: Sequence[str]) -> str:
    return " ".join(s.removeprefix("tests/") for s in selection)


def table(results: Sequence[Result]) -> str:
    """The results as a fixed-width text table."""
    head = ("mutation", "status", "secs", "file", "selection", "failing tests")
    rows = [(r.name, r.status, f"{r.seconds:.0f}" if r.returncode is not None or r.seconds
             else "-", r.file.removeprefix("vllm_steer/"), _short(r.selection),
             ", ".join(f.split("::", 1)[-1] for f in r.failed) or "-") for r in results]
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head) - 1)]
    lines = []
    for row in (head, *rows):
        lines.append("  ".join([c.ljust(w) for c, w in zip(row, widths, strict=False)]
                               + [row[-1]]).rstrip())
    return "\n".join(lines)


def exit_status(results: Sequence[Result], baseline: bool) -> int:
    """0: all KILLED (baseline: PASSED); 3: only NEEDS-ENGINE rows missing; else 1."""
    good = "PASSED" if baseline else "KILLED"
    missing = [r for r in results if r.status != good]
    if not missing:
        return 0
    return 3 if all(r.status == "NEEDS-ENGINE" for r in missing) else 1


def list_mutations() -> str:
    """``--list``: every mutation with its change and selection."""
    out = []
    for m in MUTATIONS:
        tag = " [engine]" if m.engine else ""
        out.append(f"{m.name}{tag}: {m.what}\n  file: {m.path}\n  old: {m.old!r}\n"
                   f"  new: {m.new!r}\n  tests: {' '.join(m.selection)}")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.mutation_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"mutations to run (default: all): {', '.join(BY_NAME)}")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--baseline", action="store_true",
                   help="run the selections on an unmodified copy (they must pass)")
    p.add_argument("--engine", action="store_true",
                   help="also run selections that start a vLLM engine (minutes each)")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.add_argument("--timeout", type=float,
                   help=f"seconds per pytest run (default {UNIT_TIMEOUT_S}, engine "
                        f"selections {ENGINE_TIMEOUT_S})")
    p.add_argument("--tests", type=shlex.split, metavar="ARGS",
                   help="pytest arguments (one shell-quoted string) replacing every selected "
                        "mutation's selection, e.g. --tests '-m \"not engine\" tests/x.py'")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_mutations())
        return 0
    chosen = [BY_NAME[n] for n in dict.fromkeys(args.names)] or list(MUTATIONS)
    results: list[Result] = []
    bar = tqdm(chosen, desc="baseline" if args.baseline else "mutations", unit="run")
    for m in bar:
        bar.set_postfix_str(m.name)
        selection = tuple(args.tests) if args.tests else m.selection
        engine = m.engine and not args.tests
        if engine and not args.engine:
            res = Result(m.name, m.path, "NEEDS-ENGINE", list(selection), True, old=m.old,
                         new=m.new, detail="starts a vLLM engine; rerun with --engine")
        else:
            timeout = args.timeout or (ENGINE_TIMEOUT_S if engine else UNIT_TIMEOUT_S)
            res = run_one(m, selection, timeout, args.baseline, args.keep)
        results.append(res)
        tqdm.write(f"{m.name}: {res.status}"
                   + (f" ({', '.join(res.failed)})" if res.failed else "")
                   + (f"\n{res.detail}" if res.detail and res.status != "NEEDS-ENGINE" else ""))
    print(table(results))
    if args.out:
        doc = {"mode": "baseline" if args.baseline else "mutations",
               "results": [asdict(r) for r in results]}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return exit_status(results, args.baseline)


if __name__ == "__main__":
    sys.exit(main())

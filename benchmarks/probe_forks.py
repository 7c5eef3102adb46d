"""Benchmark 3: answer-probe forks with prefix caching on vs off.

Per repetition a fresh steered trajectory (``--traj-tokens`` generated tokens, greedy,
ignore_eos, ``apply_to=generated``) is generated, then its forks (one every ``--every``
tokens, ``max_tokens=1`` with the choices' logprobs, exactly what ``vllm_steer.probe``
submits) are timed, in shuffled order, as:

- ``cached``: the forks as the probe sends them (they share the trajectory's blocks);
- ``salted``: every fork gets a unique ``cache_salt`` (emulates caching off on the same
  engine: nothing is shared, every fork recomputes its whole prefix);
- ``engine_off`` (``--real-off``): a second engine started with
  ``enable_prefix_caching=False`` runs the same forks.

Reported: ``t(salted) / t(cached)`` and ``t(engine_off) / t(cached)`` per repetition, per
block size (``--block-sizes``; vLLM's CPU default is 128).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LoadTracker,
    bench_registry,
    header,
    interleaved,
    ratios,
    shutdown,
    summarize,
    write_result,
)

QUESTIONS = ["Is the sky blue on a clear day?", "Is seven a prime number?",
             "Do fish live in water?", "Is Paris the capital of France?",
             "Can penguins fly?", "Is ice colder than steam?", "Is the moon a planet?",
             "Do cats bark?", "Is two plus two four?", "Is the sun a star?"]


def _engine(block_size: int, caching: bool) -> Any:
    from vllm_steer.engine import make_llm

    return make_llm(enforce_eager=True, dtype="float32", block_size=block_size,
                    enable_prefix_caching=caching, max_model_len=2048)


def _fork_requests(llm: Any, rep: int, args: argparse.Namespace) -> tuple[list, list, Any]:
    """A fresh trajectory for repetition ``rep``; returns (fork prompts, params, job)."""
    from vllm_steer.probe.job import ProbeConfig, ProbeJob
    from vllm_steer.probe.run import build_prompt

    tok = llm.get_tokenizer()
    prompt = build_prompt(tok, QUESTIONS[rep % len(QUESTIONS)] + f" (case {rep})")
    spec = {"vectors": [{"name": "all30", "scale": 1.0}], "apply_to": "generated"}
    cfg = ProbeConfig(every=args.every, max_tokens=args.traj_tokens, ignore_eos=True)
    job = ProbeJob(tok, [prompt], [spec], cfg, max_model_len=2048)
    (p, sp), = job.trajectory_requests()
    job.take_trajectories(llm.generate([p], [sp], use_tqdm=False))
    reqs = job.fork_requests()
    return [r[0] for r in reqs], [r[1] for r in reqs], job


def _time(llm: Any, prompts: list[dict], params: list) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    cached = sum(int(o.num_cached_tokens or 0) for o in outs)
    total = sum(len(o.prompt_token_ids) for o in outs)
    return dt, cached, total


def run_block_size(bs: int, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    llm = _engine(bs, True)
    off = _engine(bs, False) if args.real_off else None
    variants = ["cached", "salted"] + (["engine_off"] if off is not None else [])
    # warm-up (not timed)
    prompts, params, _ = _fork_requests(llm, 1000, args)
    _time(llm, prompts[:4], params[:4])
    if off is not None:
        _time(off, prompts[:4], params[:4])
    load = LoadTracker()
    times: dict[str, dict[int, float]] = {v: {} for v in variants}
    info: dict[str, dict[int, dict[str, int]]] = {v: {} for v in variants}
    forks: dict[int, tuple[list, list]] = {}
    n_forks = 0
    for rep, v in tqdm(interleaved(variants, args.reps, seed=bs), desc=f"probe forks bs={bs}"):
        if rep not in forks:
            forks[rep] = _fork_requests(llm, rep, args)[:2]
        prompts, params = forks[rep]
        n_forks = len(prompts)
        if v == "salted":
            prompts = [{**p, "cache_salt": f"off-{rep}-{i}"} for i, p in enumerate(prompts)]
        dt, cached, total = _time(off if v == "engine_off" else llm, prompts, params)
        times[v][rep] = dt
        info[v][rep] = {"cached_tokens": cached, "prompt_tokens": total}
    out = {"block_size": bs, "forks_per_trajectory": n_forks, "load": load.finish(),
           "seconds": {v: summarize(t.values()) for v, t in times.items()},
           "tokens": info,
           "ratio_off_over_on": {v: summarize(ratios(times, "cached", v))
                                 for v in variants if v != "cached"}}
    shutdown(llm)
    if off is not None:
        shutdown(off)
    return out


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-steer bench probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--traj-tokens", type=int, default=512)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--block-sizes", default="32,128")
    p.add_argument("--real-off", action="store_true",
                   help="also time a second engine started with enable_prefix_caching=False")
    p.add_argument("--out", default=None)
    a = p.parse_args(list(argv))
    if a.quick:
        a.traj_tokens, a.reps, a.block_sizes = 64, 2, "32"
    a.block_sizes = [int(x) for x in a.block_sizes.split(",")]
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    res = header(argv, "probe")
    res["engine"] = {"enforce_eager": True, "dtype": "float32"}
    res["workload"] = {"trajectory_tokens": args.traj_tokens, "every": args.every,
                       "trajectory_steering": "all30, apply_to=generated (forks replay it)"}
    bench_registry()
    res["block_sizes"] = {str(bs): run_block_size(bs, args) for bs in args.block_sizes}
    write_result(args.out or ("probe_forks" + ("_quick" if args.quick else "")), res)
    return res


if __name__ == "__main__":
    main()

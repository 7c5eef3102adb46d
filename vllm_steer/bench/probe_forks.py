"""Benchmark 3: answer-probe forks with prefix caching on vs off.

Per repetition and choice set a fresh steered trajectory (``--traj-tokens`` generated
tokens, greedy, ignore_eos, ``apply_to=generated``) is generated; then the probe's fork
stages for it (the head fork per point, one prompt-log-prob fork per multi-token variant
and point, and any gap reads: exactly what ``vllm_steer.probe`` submits) are timed, the
variants in shuffled order, each on its own copy of the same job:

- ``cached``: the requests as the probe sends them (they share the trajectory's blocks);
- ``salted``: every request gets a unique ``cache_salt`` (emulates caching off on the same
  engine: nothing is shared, every fork recomputes its whole prefix);
- ``engine_off`` (``--real-off``): a second engine started with
  ``enable_prefix_caching=False`` runs the same requests;
- ``topk_neighbours`` / ``plain_neighbours`` (``--neighbours N``, default 8): the cached
  forks submitted in one call with N ordinary greedy requests (32 tokens) that ask for
  ``logprobs=5`` / for no log-probs. With top-k neighbours vLLM's sampler runs the
  plugin's per-row merge (``vllm_adapter/sampler.py``) on every batch where a fork meets
  them; the ratio of the two is what such neighbours cost in all (their top-k gather,
  which vLLM runs anyway, and the merge). The merge itself is also timed alone
  (``merge_rows`` on tensors of the batch's shape) and counted (the worker's
  ``mixed_logprob_batches``).

Reported per block size (``--block-sizes``; vLLM's CPU default is 128) and choice set
(``--choices``, repeatable: ``Yes,No`` and the multi-token ``20,30,40,50`` by default):
``t(variant) / t(cached)`` per repetition, prompt tokens computed vs served from the
cache, and the largest difference of a choice log-prob between a variant and ``cached``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from vllm_steer.bench.common import (
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
STEERING = {"vectors": [{"name": "all30", "scale": 1.0}], "apply_to": "generated"}


def _engine(block_size: int, caching: bool) -> Any:
    from vllm_steer.llm_factory import make_llm

    return make_llm(enforce_eager=True, dtype="float32", block_size=block_size,
                    enable_prefix_caching=caching, max_model_len=2048)


def _trajectory(llm: Any, rep: int, choices: list[str], args: argparse.Namespace
                ) -> tuple[list[int], list[int]]:
    """A fresh steered trajectory for repetition ``rep``: (prompt ids, generated ids)."""
    from vllm_steer.probe import build_prompt
    from vllm_steer.probe.job import ProbeJob

    tok = llm.get_tokenizer()
    question = QUESTIONS[rep % len(QUESTIONS)] + f" (case {rep}) Answer {' or '.join(choices)}."
    prompt = build_prompt(tok, question)
    job = ProbeJob(tok, [prompt], [STEERING], _config(choices, args), max_model_len=2048)
    (p, sp), = job.requests("trajectories")
    job.take("trajectories", llm.generate([p], [sp], use_tqdm=False))
    return prompt, job.trajs[0].token_ids


def _config(choices: list[str], args: argparse.Namespace) -> Any:
    from vllm_steer.probe import ProbeConfig

    return ProbeConfig(choices=choices, every=args.every, max_tokens=args.traj_tokens,
                       ignore_eos=True)


def _job(tok: Any, prompt: list[int], token_ids: list[int], choices: list[str],
         args: argparse.Namespace) -> Any:
    """A job whose trajectory stage is already done (the same trajectory for every variant)."""
    from types import SimpleNamespace

    from vllm_steer.probe.job import ProbeJob

    job = ProbeJob(tok, [prompt], [STEERING], _config(choices, args), max_model_len=2048)
    job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(token_ids=token_ids)])])
    return job


def _neighbours(tok: Any, n: int, logprobs: int | None) -> list[tuple[dict, Any]]:
    """``n`` ordinary greedy requests (32 tokens), asking for ``logprobs`` or none."""
    from vllm import SamplingParams

    from vllm_steer.probe import build_prompt

    return [({"prompt_token_ids": build_prompt(tok, f"Tell me a fact about {q.lower()}")},
             SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=logprobs))
            for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]]


def _time(llm: Any, job: Any, salt: str | None, neighbours: list[tuple[dict, Any]] = ()
          ) -> tuple[float, dict[str, int]]:
    """Seconds for the fork and gap stages of ``job`` on ``llm`` (with ``neighbours``
    submitted in the same call as the forks), and token counts of the job's requests."""
    info = {"requests": 0, "gap_requests": 0, "cached_tokens": 0, "prompt_tokens": 0}
    t0 = time.perf_counter()
    for stage in ("forks", "gaps"):
        reqs = job.requests(stage)
        if salt is not None:
            reqs = [({**p, "cache_salt": f"{salt}-{stage}-{i}"}, sp)
                    for i, (p, sp) in enumerate(reqs)]
        extra = list(neighbours) if stage == "forks" else []
        both = reqs + extra
        outs = llm.generate([r[0] for r in both], [r[1] for r in both],
                            use_tqdm=False)[:len(reqs)] if both else []
        job.take(stage, outs)
        info["requests"] += len(reqs)
        info["gap_requests"] += len(reqs) if stage == "gaps" else 0
        info["cached_tokens"] += sum(int(o.num_cached_tokens or 0) for o in outs)
        info["prompt_tokens"] += sum(len(o.prompt_token_ids) for o in outs)
    return time.perf_counter() - t0, info


def _mixed_batches(llm: Any) -> int:
    return int(llm.collective_rpc("vllm_steer_stats")[0]["mixed_logprob_batches"])


def _time_merge(batch: int, reps: int = 200) -> float:
    """Median seconds of one ``merge_rows`` call on a batch of ``batch`` rows: half top-5,
    half exact ids of a Yes/No head fork (8 ids), as in the mixed runs."""
    import statistics

    import torch
    from vllm.v1.outputs import LogprobsTensors

    from vllm_steer.vllm_adapter.sampler import merge_rows

    exact_rows = {i: list(range(100, 108)) for i in range(0, batch, 2)}
    e_ids = torch.zeros(batch, 9, dtype=torch.int32)
    for i, ids in exact_rows.items():
        e_ids[i, 1:] = torch.tensor(ids)
    topk = LogprobsTensors(torch.zeros(batch, 6, dtype=torch.int32), torch.zeros(batch, 6),
                           torch.zeros(batch, dtype=torch.long))
    exact = LogprobsTensors(e_ids, torch.zeros(batch, 9), torch.zeros(batch, dtype=torch.long))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        merge_rows(topk, exact, exact_rows)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _max_diff(a: Any, b: Any) -> float:
    return max(abs(x.logprobs[c] - y.logprobs[c])
               for x, y in zip(a.trajs[0].readings, b.trajs[0].readings, strict=True)
               for c in x.logprobs)


def run_block_size(bs: int, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    llm = _engine(bs, True)
    off = _engine(bs, False) if args.real_off else None
    tok = llm.get_tokenizer()
    variants = ["cached", "salted"] + (["engine_off"] if off is not None else []) \
        + (["topk_neighbours", "plain_neighbours"] if args.neighbours else [])
    neighbours = {"topk_neighbours": _neighbours(tok, args.neighbours, 5),
                  "plain_neighbours": _neighbours(tok, args.neighbours, None)}
    mixed_before = _mixed_batches(llm)
    # warm-up (not timed)
    warm = _job(tok, *_trajectory(llm, 1000, args.choices[0], args), args.choices[0], args)
    _time(llm, warm, None)
    out: dict[str, Any] = {"block_size": bs, "choice_sets": {}}
    for choices in args.choices:
        load = LoadTracker()
        times: dict[str, dict[int, float]] = {v: {} for v in variants}
        info: dict[str, dict[int, dict[str, int]]] = {v: {} for v in variants}
        diffs: dict[str, list[float]] = {v: [] for v in variants if v != "cached"}
        trajs: dict[int, tuple[list[int], list[int]]] = {}
        jobs: dict[tuple[int, str], Any] = {}
        key = ",".join(choices)
        for rep, v in tqdm(interleaved(variants, args.reps, seed=bs),
                           desc=f"probe forks bs={bs} choices={key}"):
            if rep not in trajs:
                trajs[rep] = _trajectory(llm, rep, choices, args)
            job = jobs[(rep, v)] = _job(tok, *trajs[rep], choices, args)
            engine = off if v == "engine_off" else llm
            times[v][rep], info[v][rep] = _time(engine, job, f"off-{rep}" if v == "salted"
                                                else None, neighbours.get(v, ()))
        for rep in range(args.reps):
            for v in diffs:
                diffs[v].append(_max_diff(jobs[(rep, "cached")], jobs[(rep, v)]))
        points = len(jobs[(0, "cached")].points)
        out["choice_sets"][key] = {
            "choices": choices, "points_per_trajectory": points,
            "multi_token": list(jobs[(0, "cached")].choices.multi_token),
            "load": load.finish(),
            "seconds": {v: summarize(t.values()) for v, t in times.items()},
            "tokens": info,
            "ratio_off_over_on": {v: summarize(ratios(times, "cached", v))
                                  for v in variants if v != "cached"},
            "max_abs_logprob_diff_vs_cached": {v: max(d) for v, d in diffs.items()}}
        if args.neighbours:
            out["choice_sets"][key]["ratio_topk_over_plain_neighbours"] = summarize(
                ratios(times, "plain_neighbours", "topk_neighbours"))
    if args.neighbours:
        out["merge"] = {"mixed_batches": _mixed_batches(llm) - mixed_before,
                        "seconds_per_merge": _time_merge(args.neighbours + 8)}
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
    p.add_argument("--choices", action="append", default=None,
                   help="comma-separated choice set (repeatable; default: Yes,No and "
                        "20,30,40,50)")
    p.add_argument("--real-off", action="store_true",
                   help="also time a second engine started with enable_prefix_caching=False")
    p.add_argument("--neighbours", type=int, default=8,
                   help="ordinary requests submitted with the forks (top-k log-probs vs none); "
                        "0 leaves these variants out")
    p.add_argument("--out", default=None)
    a = p.parse_args(list(argv))
    if a.quick:
        a.traj_tokens, a.reps, a.block_sizes = 64, 2, "32"
    a.block_sizes = [int(x) for x in a.block_sizes.split(",")]
    a.choices = [[c.strip() for c in s.split(",") if c.strip()]
                 for s in (a.choices or ["Yes,No", "20,30,40,50"])]
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    res = header(argv, "probe")
    res["engine"] = {"enforce_eager": True, "dtype": "float32"}
    res["workload"] = {"trajectory_tokens": args.traj_tokens, "every": args.every,
                       "choice_sets": [",".join(c) for c in args.choices],
                       "trajectory_steering": "all30, apply_to=generated (forks replay it)"}
    bench_registry()
    res["block_sizes"] = {str(bs): run_block_size(bs, args) for bs in args.block_sizes}
    write_result(args.out or ("probe_forks" + ("_quick" if args.quick else "")), res)
    return res


if __name__ == "__main__":
    main()

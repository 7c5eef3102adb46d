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
import time
from typing import Any

from vllm_steer.bench.common import LoadTracker, bench_registry, interleaved, ratios, summarize
from vllm_steer.bench.harness import Benchmark, cell, comma_list, meta_lines

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

    from vllm_steer.llm_factory import shutdown

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traj-tokens", type=int, default=512)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--block-sizes", type=comma_list(int), default="32,128")
    p.add_argument("--choices", action="append", type=comma_list(str.strip), default=None,
                   help="comma-separated choice set (repeatable; default: Yes,No and "
                        "20,30,40,50)")
    p.add_argument("--real-off", action="store_true",
                   help="also time a second engine started with enable_prefix_caching=False")
    p.add_argument("--neighbours", type=int, default=8,
                   help="ordinary requests submitted with the forks (top-k log-probs vs none); "
                        "0 leaves these variants out")


def choice_sets(args: argparse.Namespace) -> list[list[str]]:
    """The ``--choices`` sets (default: Yes/No and the multi-token 20/30/40/50)."""
    return args.choices or [["Yes", "No"], ["20", "30", "40", "50"]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.choices = choice_sets(args)
    res: dict[str, Any] = {"engine": {"enforce_eager": True, "dtype": "float32"}}
    res["workload"] = {"trajectory_tokens": args.traj_tokens, "every": args.every,
                       "choice_sets": [",".join(c) for c in args.choices],
                       "trajectory_steering": "all30, apply_to=generated (forks replay it)"}
    bench_registry()
    res["block_sizes"] = {str(bs): run_block_size(bs, args) for bs in args.block_sizes}
    return res


# -- report ---------------------------------------------------------------------------
_OFF_LABELS = {"salted": "unique cache_salt per fork (same engine)",
               "engine_off": "second engine, enable_prefix_caching=False",
               "topk_neighbours": "cached forks + neighbours asking logprobs=5 (per-row "
                                  "merge), one call",
               "plain_neighbours": "cached forks + the same neighbours without logprobs, "
                                   "one call"}


def probe_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    sets = wl.get("choice_sets")
    out = ["### Probe forks: prefix caching on vs off" + (f" ({' | '.join(sets)})" if sets
                                                         else ""), "", *meta_lines(d),
           f"- trajectory {wl['trajectory_tokens']} generated tokens, a fork "
           f"{'point ' if sets else ''}every {wl['every']} tokens; steering: "
           f"{wl['trajectory_steering']}; eager engine",
           *(f"- load average, block_size={bs}: start {b['load']['start']}, end "
             f"{b['load']['end']}, 1-min max {b['load']['max_1m']}"
             for bs, b in d["block_sizes"].items() if "load" in b)]
    if not sets:   # results written before choice sets existed (Yes/No only)
        out += ["", "| block_size | forks | t(cached) s | off variant | t(off) / t(cached) | "
                "cached prompt tokens (cached run) |", "|---|---|---|---|---|---|"]
        for bs, b in d["block_sizes"].items():
            tok = b["tokens"]["cached"]
            frac = [v["cached_tokens"] / max(v["prompt_tokens"], 1) for v in tok.values()]
            for v, r in b["ratio_off_over_on"].items():
                out.append(f"| {bs} | {b['forks_per_trajectory']} | "
                           f"{cell(b['seconds']['cached'], digits=2)} | {_OFF_LABELS.get(v, v)} | "
                           f"{cell(r, digits=1)}x | {100 * min(frac):.0f}-{100 * max(frac):.0f}% |")
        out.append("")
        return out
    for bs, b in d["block_sizes"].items():
        for key, c in b["choice_sets"].items():
            ld = c["load"]
            out.append(f"- load average, block_size={bs}, choices {key}: start {ld['start']}, "
                       f"end {ld['end']}, 1-min max {ld['max_1m']}")
    out += ["", "| block_size | choices | points | requests per trajectory (gap reads) | "
            "prompt tokens computed per trajectory, cached run | t(cached) s | off variant | "
            "t(off) / t(cached) | off computes (tokens) | max abs log-prob diff vs cached |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for bs, b in d["block_sizes"].items():
        for key, c in b["choice_sets"].items():
            tok = c["tokens"]["cached"].values()
            reqs = sorted({v["requests"] for v in tok})
            gaps = sorted({v["gap_requests"] for v in tok})
            computed = [v["prompt_tokens"] - v["cached_tokens"] for v in tok]
            mt = "multi-token" if any(c["multi_token"]) else "single-token"
            for v, r in c["ratio_off_over_on"].items():
                off = [x["prompt_tokens"] - x["cached_tokens"] for x in c["tokens"][v].values()]
                out.append(
                    f"| {bs} | {key} ({mt}) | {c['points_per_trajectory']} | "
                    f"{'/'.join(map(str, reqs))} ({'/'.join(map(str, gaps))}) | "
                    f"{min(computed)}-{max(computed)} | "
                    f"{cell(c['seconds']['cached'], digits=2)} | {_OFF_LABELS.get(v, v)} | "
                    f"{cell(r, digits=1)}x | {min(off)}-{max(off)} | "
                    f"{c['max_abs_logprob_diff_vs_cached'][v]:.1e} |")
    out.append("")
    for bs, b in d["block_sizes"].items():
        for key, c in b["choice_sets"].items():
            if "ratio_topk_over_plain_neighbours" in c:
                out.append(f"- block_size={bs}, {key}: forks with top-k neighbours / with plain "
                           f"neighbours {cell(c['ratio_topk_over_plain_neighbours'], digits=3)}x")
        if "merge" in b:
            m = b["merge"]
            out.append(f"- block_size={bs}: {m['mixed_batches']} batches mixed exact-ID and "
                       f"top-k rows; one per-row merge took {1e6 * m['seconds_per_merge']:.0f} "
                       "us (median, measured alone)")
    out.append("")
    return out


BENCHMARK = Benchmark(
    name="probe", module="probe_forks", doc=__doc__, add_arguments=add_arguments, run=run,
    quick={"traj_tokens": 64, "reps": 2, "block_sizes": [32]}, reps=5,
    sections={"probe_forks": probe_section, "probe_forks_choices": probe_section,
              "probe_forks_isolation": probe_section})

if __name__ == "__main__":
    BENCHMARK.main()

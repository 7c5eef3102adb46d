"""Probe forks and ordinary requests never change each other's log-probs (one engine).

vLLM 0.32's V1 sampler returns exact-ID log-probs for the whole batch when any row sets
``logprob_token_ids`` (a probe's head fork does): every top-k neighbour then got only
``{sampled, 0: -inf}``. ``vllm_adapter/sampler.py`` merges the rows per request. Each
test submits neighbours together with probe forks in one ``generate`` call and compares
with the same requests run on their own; the worker's count of merged batches shows the
batches really were mixed.
"""

from __future__ import annotations

import math

import pytest

from tests.steer_helpers import env_registry
from vllm_steer.fixtures.engines import make_test_llm, shutdown
from vllm_steer.fixtures.vectors import write_test_vectors
from vllm_steer.probe import ProbeConfig, build_prompt
from vllm_steer.probe.drivers import generate, run_job
from vllm_steer.probe.job import STAGES, ProbeJob

pytestmark = pytest.mark.engine
ATOL = 1e-4
STEER = {"vectors": [{"name": "v1", "scale": 0.7}], "apply_to": "generated"}
QUESTION = "Is 91 a prime number? Think step by step, then answer."


@pytest.fixture(scope="module")
def setup(default_model_dir, tmp_path_factory):
    env_registry(write_test_vectors(tmp_path_factory.mktemp("iso")))
    # max_logprobs=-1: neighbours may ask for the whole vocabulary (logprobs=-1)
    # A token budget no batch here reaches: vLLM 0.32's CPU runner fails a step in which a
    # seeded request's prefill is chunked (gpu_model_runner rewinds its torch.Generator's
    # offset, which CPU generators refuse: "CPU Generator does not use offset").
    llm = make_test_llm(default_model_dir, block_size=32, max_num_seqs=64, max_logprobs=-1,
                        max_num_batched_tokens=16384)
    yield llm
    shutdown(llm)


def _mixed_batches(llm) -> int:
    (stats,) = llm.collective_rpc("vllm_steer_stats")
    return int(stats["mixed_logprob_batches"])


def _prompts(tok, n):
    return [build_prompt(tok, f"Tell me one fact about the number {7 * i + 3}.")
            for i in range(n)]


def _job(tok, choices, steering=(None, STEER)):
    p = build_prompt(tok, QUESTION)
    return ProbeJob(tok, [p] * len(steering), list(steering),
                    ProbeConfig(choices=choices, every=4, max_tokens=24, ignore_eos=True))


def _fork_requests(llm, job):
    """The job's trajectories generated, and its fork requests (not yet submitted)."""
    job.take("trajectories", generate(llm, job.requests("trajectories")))
    return job.requests("forks")


def _same_logprobs(a, b, what):
    """Two lists of per-position ``{token: Logprob}`` dicts (or None) hold the same keys and
    values within ATOL (-inf equal to -inf)."""
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x is None or y is None:
            assert x is None and y is None, (what, i)
            continue
        assert set(x) == set(y), (what, i, sorted(x)[:8], sorted(y)[:8])
        for k in x:
            u, v = x[k].logprob, y[k].logprob
            assert (u == v) or (math.isfinite(u) and abs(u - v) < ATOL), (what, i, k, u, v)


def _neighbours(kind, tok):
    from vllm import SamplingParams

    ps = _prompts(tok, 8)
    base = dict(max_tokens=12, ignore_eos=True)
    if kind == "topk-greedy":
        sps = [SamplingParams(temperature=0, logprobs=5, **base) for _ in ps]
    elif kind == "topk-sampled":
        sps = [SamplingParams(temperature=0.9, seed=100 + i, logprobs=3, **base)
               for i in range(len(ps))]
    elif kind == "topk-steered":
        sps = [SamplingParams(temperature=0, logprobs=5, extra_args={"steering": STEER}, **base)
               if i % 2 else SamplingParams(temperature=0, logprobs=5, **base)
               for i in range(len(ps))]
    elif kind == "prompt-logprobs":
        sps = [SamplingParams(temperature=0, prompt_logprobs=3, logprobs=2, **base) for _ in ps]
    elif kind == "full-vocab":
        ps = ps[:2]
        sps = [SamplingParams(temperature=0, logprobs=-1, max_tokens=2, ignore_eos=True)
               for _ in ps]
    elif kind == "user-exact-ids":
        ids = [tok.encode(w, add_special_tokens=False)[0] for w in (" the", " a", " is", ".")]
        sps = [SamplingParams(temperature=0, logprob_token_ids=ids[: 1 + i % 4],
                              logprobs=(1 + i % 4) if i % 2 else None, **base)
               for i in range(len(ps))]
    else:
        raise AssertionError(kind)
    return [({"prompt_token_ids": p}, sp) for p, sp in zip(ps, sps, strict=True)]


KINDS = ["topk-greedy", "topk-sampled", "topk-steered", "prompt-logprobs", "full-vocab",
         "user-exact-ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_neighbours_logprobs_equal_their_separate_run(setup, kind):
    llm = setup
    tok = llm.get_tokenizer()
    forks = (_fork_requests(llm, _job(tok, ["Yes", "No"]))
             + _fork_requests(llm, _job(tok, ["20", "30", "40", "50"], steering=(STEER,))))
    neighbours = _neighbours(kind, tok)
    alone = generate(llm, neighbours)
    before = _mixed_batches(llm)
    mixed = generate(llm, neighbours + forks)[: len(neighbours)]
    assert _mixed_batches(llm) > before, "no batch mixed top-k and exact-ID rows"
    for i, (a, b) in enumerate(zip(alone, mixed, strict=True)):
        ca, cb = a.outputs[0], b.outputs[0]
        assert list(ca.token_ids) == list(cb.token_ids), (kind, i)
        _same_logprobs(ca.logprobs, cb.logprobs, (kind, i, "sample"))
        _same_logprobs(a.prompt_logprobs, b.prompt_logprobs, (kind, i, "prompt"))
        if ca.logprobs is not None and kind != "user-exact-ids":
            # what the bug did: a top-k row reduced to the sampled token + {0: -inf}
            assert all(0 not in pos or math.isfinite(pos[0].logprob) for pos in cb.logprobs)
    if kind == "full-vocab":
        assert len(mixed[0].outputs[0].logprobs[0]) == len(alone[0].outputs[0].logprobs[0]) \
            >= 49152
    if kind == "user-exact-ids":
        sp = neighbours[0][1]
        row = mixed[0].outputs[0].logprobs[0]
        assert set(sp.logprob_token_ids) <= set(row), row


@pytest.mark.parametrize("choices", [["Yes", "No"], ["20", "30", "40", "50"]],
                         ids=["yes-no", "20-50"])
def test_probe_readings_equal_with_and_without_logprob_neighbours(setup, choices):
    from vllm import SamplingParams

    llm = setup
    tok = llm.get_tokenizer()
    alone_job, mixed_job = _job(tok, choices), _job(tok, choices)
    alone = run_job(llm, alone_job, use_tqdm=False)
    mixed_job.take("trajectories", [SimpleOut(t.token_ids) for t in alone])
    ps = _prompts(tok, 6)
    kinds = [dict(temperature=0, logprobs=5), dict(temperature=0.8, seed=1, logprobs=2),
             dict(temperature=0, logprobs=-1, max_tokens=2),
             dict(temperature=0, logprobs=1, prompt_logprobs=2),
             dict(temperature=0, logprobs=5, extra_args={"steering": STEER}),
             dict(temperature=0.8, seed=2, logprobs=5)]
    noise = [({"prompt_token_ids": p}, SamplingParams(**{"max_tokens": 16, **kw},
                                                      ignore_eos=True))
             for p, kw in zip(ps, kinds, strict=True)]
    before = _mixed_batches(llm)

    def submit(reqs):
        return generate(llm, reqs + noise)[: len(reqs)]

    mixed = run_job(llm, mixed_job, submit=submit, stages=STAGES[1:])
    assert _mixed_batches(llm) > before
    pairs = [(a, b) for t, u in zip(alone, mixed, strict=True)
             for a, b in zip(t.readings, u.readings, strict=True)]
    assert len(pairs) >= 10
    for a, b in pairs:
        assert a.token_index == b.token_index
        for c in choices:
            assert abs(a.logprobs[c] - b.logprobs[c]) < ATOL, (a.token_index, c)
        assert abs(a.mass - b.mass) < ATOL


class SimpleOut:
    """A stand-in ``RequestOutput`` for ``ProbeJob.take('trajectories', ...)``: the tokens of
    a trajectory generated earlier, so both jobs fork the same sequence."""

    def __init__(self, token_ids):
        self.outputs = [type("C", (), {"token_ids": list(token_ids)})()]

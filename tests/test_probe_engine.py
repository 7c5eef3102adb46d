"""Answer probes on a real engine: forks equal fresh computation and the HF reference,
and hit the prefix cache for every full block of their prefix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.steer_helpers import composed_dense, env_registry, make_llm, shutdown, write_test_vectors
from vllm_steer.probe import ProbeConfig, ProbeJob, build_prompt, probe
from vllm_steer.probe.run import _generate, run_job

pytestmark = pytest.mark.engine
BLOCK = 32
SHIPPED = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def setup(default_model_dir, tmp_path_factory):
    reg = write_test_vectors(tmp_path_factory.mktemp("probe"))
    with reg.open("a") as f:   # the shipped, trained happy vector (for the sweep)
        f.write(f"  happy: {{path: {SHIPPED / 'vectors' / 'happy.safetensors'}}}\n")
    env_registry(reg)
    llm = make_llm(default_model_dir, block_size=BLOCK)
    yield llm, reg
    shutdown(llm)


QUESTION = ("Is 17 a prime number? Think step by step inside <think> </think>, "
            "then answer Yes or No.")
STEERED = {"vectors": [{"name": "v1", "scale": 0.7}], "apply_to": "generated"}


def _expected_cached(prompt_len: int, traj_len: int, t: int) -> int:
    # The trajectory computed KV for prompt + generated[:-1]; only full blocks are reused.
    return (min(prompt_len + t, prompt_len + traj_len - 1) // BLOCK) * BLOCK


@pytest.mark.parametrize("steering", [None, STEERED], ids=["unsteered", "steered"])
def test_forks_of_256_token_trajectory_hit_every_full_block(setup, steering):
    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    llm.reset_prefix_cache()
    cfg = ProbeConfig(every=16, max_tokens=256, ignore_eos=True)
    (traj,) = probe(llm, [p], [steering], cfg, use_tqdm=False)
    assert len(traj.token_ids) == 256 and len(traj.readings) == 17
    for r in traj.readings:
        assert r.cached_tokens == _expected_cached(len(p), 256, r.token_index), r.token_index
        assert r.log_ratio is not None and math.isfinite(r.log_ratio)


def test_fork_readings_equal_fresh_uncached_computation(setup):
    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    cfg = ProbeConfig(every=24, max_tokens=96, ignore_eos=True)
    job = ProbeJob(tok, [p, p], [None, STEERED], cfg)
    (cached,) = [run_job(llm, job, use_tqdm=False)]
    # the same fork requests, each with a unique cache salt: computed from scratch
    fresh_job = ProbeJob(tok, [p, p], [None, STEERED], cfg)
    fresh_job.trajs = [type(t)(t.label, t.prompt_ids, t.steering, list(t.token_ids))
                       for t in cached]
    reqs = fresh_job.fork_requests()
    salted = [({**pr, "cache_salt": f"fresh-{i}"}, sp) for i, (pr, sp) in enumerate(reqs)]
    outs = _generate(llm, salted, False)
    assert all(int(o.num_cached_tokens or 0) == 0 for o in outs)
    fresh_job.take_forks(outs)
    pairs = [(a, b) for t, f in zip(cached, fresh_job.trajs, strict=True)
             for a, b in zip(t.readings, f.readings, strict=True)]
    assert len(pairs) >= 8 and any(a.cached_tokens > 0 for a, _ in pairs)
    for a, b in pairs:
        assert abs(a.log_ratio - b.log_ratio) < 1e-3
        assert abs(a.mass - b.mass) < 1e-4
    assert cached[0].token_ids != cached[1].token_ids  # steering changed the trajectory


def test_fork_readings_match_hf_reference(setup, default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.steer_helpers import position_mask
    from vllm_steer.hf_reference import steer_hf
    from vllm_steer.probe.reading import logsumexp

    llm, reg = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    job = ProbeJob(tok, [p], [STEERED], ProbeConfig(every=32, max_tokens=64, ignore_eos=True))
    (traj,) = run_job(llm, job, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    dense = composed_dense(reg, [("v1", 0.7)])
    yes, no = job.choices.variants
    for fork, reading in zip(job.forks, traj.readings, strict=True):
        ids = fork.ids
        mask = position_mask(ids, "generated", len(p))
        with torch.no_grad(), steer_hf(model, dense, position_mask=mask):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        ref = logsumexp([float(logp[i]) for i in yes]) - logsumexp([float(logp[i]) for i in no])
        assert abs(reading.log_ratio - ref) < 1e-3, fork.token_index


def test_happy_sweep_moves_log_ratio_monotonically(setup):
    from vllm_steer.probe import ProbeConfig, sweep
    from vllm_steer.probe.cli import load_questions

    llm, _ = setup
    questions, signs, choices = load_questions(SHIPPED / "questions" / "mood_yes_no.yaml")
    res = sweep(llm, questions, "happy", [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
                ProbeConfig(choices=choices, suffix=None), signs=signs)
    print("signed means", res.mean_signed_log_ratio, "r", res.pearson_r_signed)
    assert res.pearson_r_signed is not None and res.pearson_r_signed >= 0.9
    print("mean mass", res.mean_mass, "low-mass readings", res.low_mass_count)
    assert all(0 < m <= 1 for m in res.mean_mass)

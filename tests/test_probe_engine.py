"""Answer probes on a real engine (the session's default-model engine, tests/conftest.py):
forks equal fresh computation and the HF reference (Yes/No and multi-token N-way choices,
through the Python API and the CLI), hit the prefix cache for every full block of their
prefix, and sweeps score a target."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.steer_helpers import composed_dense
from vllm_steer.probe import ProbeConfig, build_prompt, probe
from vllm_steer.probe.drivers import generate, run_job
from vllm_steer.probe.job import STAGES, ProbeJob

pytestmark = pytest.mark.engine
BLOCK = 32
SHIPPED = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def setup(default_engine):
    """The session's default-model engine (tests/conftest.py; block size ``BLOCK``), whose
    registry holds the test vectors and the shipped, trained happy vector (for the sweep)."""
    llm, reg = default_engine
    assert llm.llm_engine.vllm_config.cache_config.block_size == BLOCK
    return llm, reg


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


def _salted(llm, tag: str):
    """A submit function giving every request its own cache salt: computed from scratch."""
    counter = iter(range(1 << 30))

    def submit(reqs):
        salted = [({**pr, "cache_salt": f"{tag}-{next(counter)}"}, sp) for pr, sp in reqs]
        outs = generate(llm, salted)
        assert all(int(o.num_cached_tokens or 0) == 0 for o in outs)
        return outs

    return submit


@pytest.mark.parametrize("choices", [["Yes", "No"], ["20", "30", "40", "50"]],
                         ids=["yes-no", "20-50"])
def test_fork_readings_equal_fresh_uncached_computation(setup, choices):
    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    cfg = ProbeConfig(choices=choices, every=24, max_tokens=96, ignore_eos=True)
    # Yes/No: an unsteered and a steered trajectory; 20/30/40/50 (a fork per variant, each
    # computed from scratch below: the costly case) the steered one only
    steerings = [None, STEERED] if len(choices) == 2 else [STEERED]
    job = ProbeJob(tok, [p] * len(steerings), steerings, cfg)
    cached = run_job(llm, job, use_tqdm=False)
    # the same forks (and gap reads), each request with a unique cache salt
    fresh_job = ProbeJob(tok, [p] * len(steerings), steerings, cfg)
    fresh_job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(
        token_ids=t.token_ids)]) for t in cached])
    fresh = run_job(llm, fresh_job, submit=_salted(llm, f"fresh-{len(choices)}"),
                    stages=STAGES[1:])
    pairs = [(a, b) for t, f in zip(cached, fresh, strict=True)
             for a, b in zip(t.readings, f.readings, strict=True)]
    assert len(pairs) >= 4 * len(steerings) and any(a.cached_tokens > 0 for a, _ in pairs)
    for a, b in pairs:
        assert a.token_index == b.token_index
        for c in choices:
            assert abs(a.logprobs[c] - b.logprobs[c]) < 1e-3, (a.token_index, c)
        assert abs(a.mass - b.mass) < 1e-4
    if len(steerings) == 2:
        assert cached[0].token_ids != cached[1].token_ids  # steering changed the trajectory


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def test_fork_readings_match_hf_reference(setup, hf_model):
    """Yes/No log ratios of a steered trajectory's forks against the HF reference, whose
    fork context (prompt + generated[:t] + ``</think>`` while the section is open + the
    suffix), variants (every single token reading as the choice) and logsumexp are built
    in test code from the README's rules (tests/probe_reference.py)."""
    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants

    llm, reg = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    cfg = ProbeConfig(every=32, max_tokens=64, ignore_eos=True)
    job = ProbeJob(tok, [p], [STEERED], cfg)
    (traj,) = run_job(llm, job, use_tqdm=False)
    assert [r.token_index for r in traj.readings] == [0, 32, 64]
    variants = {c: reference_variants(tok, c) for c in ("Yes", "No")}
    assert all(len(v) == 1 for vs in variants.values() for v in vs)   # one forward each
    assert all(len(vs) > 1 for vs in variants.values())    # " Yes", "yes", ... too
    dense = composed_dense(reg, [("v1", 0.7)])
    assert traj.readings[0].in_thinking   # this fork closes the section with the marker
    for r in traj.readings:
        ctx = fork_context(tok, p, traj.token_ids, r.token_index, cfg.suffix)
        ref = hf_choice_logprobs(hf_model, ctx, variants, dense, start=len(p))
        assert abs(r.log_ratio - (ref["Yes"] - ref["No"])) < 1e-3, r.token_index
        for c in ("Yes", "No"):
            assert abs(r.logprobs[c] - ref[c]) < 1e-3, (r.token_index, c)


def test_cached_choice_reference_equals_full_forwards(setup, hf_model):
    """The reference used here (``hf_choice_logprobs``: the context's KV cache, then every
    variant at once) against one full forward per variant (``hf_choice_logprobs_full``),
    on multi-token and single-token choices, steered over a window and not at all."""
    from tests.probe_reference import (
        fork_context,
        hf_choice_logprobs,
        hf_choice_logprobs_full,
        reference_variants,
    )

    llm, reg = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, MULTI[1][0], open_thinking="<think>\n")
    gen = tok.encode(" The Big Apple is a nickname of", add_special_tokens=False)
    dense = composed_dense(reg, [("v1", 0.7)])
    for choices in (MULTI[1][1], ["Yes", "No"]):
        variants = {c: reference_variants(tok, c) for c in choices}
        ctx = fork_context(tok, p, gen, 4, "\nThe final answer is")
        for kw in ({}, {"dense": dense, "start": len(p), "end": len(p) + 4}):
            a = hf_choice_logprobs(hf_model, ctx, variants, **kw)
            b = hf_choice_logprobs_full(hf_model, ctx, variants, **kw)
            assert a.keys() == b.keys() == set(choices)
            assert max(abs(a[c] - b[c]) for c in choices) < 1e-4, (kw.keys(), a, b)


MULTI = [
    ("A train travels 120 km in 3 hours. What is its average speed in km/h? Think step by "
     "step inside <think> </think>, then answer 20, 30, 40 or 50.", ["20", "30", "40", "50"]),
    ("Which US city is nicknamed the Big Apple? Think step by step inside <think> </think>, "
     "then answer New York, Los Angeles, Chicago or Houston.",
     ["New York", "Los Angeles", "Chicago", "Houston"]),
]


@pytest.mark.parametrize("question, choices, steer_suffix",
                         [(*MULTI[0], True), (*MULTI[1], False)],
                         ids=["20-50", "cities-unsteered-suffix"])
def test_multi_token_readings_match_hf_reference(setup, hf_model, question, choices,
                                                 steer_suffix):
    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants

    llm, reg = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, question, open_thinking="<think>\n")
    cfg = ProbeConfig(choices=choices, every=16, max_tokens=48, ignore_eos=True,
                      steer_suffix=steer_suffix)
    job = ProbeJob(tok, [p], [STEERED], cfg)
    (traj,) = run_job(llm, job, use_tqdm=False)
    variants = {c: reference_variants(tok, c) for c in choices}
    assert [set(variants[c]) for c in choices] == [set(vs) for vs in job.choices.variants]
    assert any(len(v) > 1 for vs in variants.values() for v in vs)
    dense = composed_dense(reg, [("v1", 0.7)])
    te = len(tok.encode("</think>", add_special_tokens=False))
    sfx = len(tok.encode(cfg.suffix, add_special_tokens=False))
    longest = max(len(v) for vs in variants.values() for v in vs)
    assert [r.token_index for r in traj.readings] == [0, 16, 32, 48]
    for r in traj.readings:
        ctx = fork_context(tok, p, traj.token_ids, r.token_index, cfg.suffix)
        end = None if steer_suffix else len(p) + r.token_index
        ref = hf_choice_logprobs(hf_model, ctx, variants, dense, start=len(p), end=end)
        for c in choices:
            assert abs(r.logprobs[c] - ref[c]) < 1e-3, (r.token_index, c, r.logprobs[c], ref[c])
        assert r.mass == pytest.approx(sum(math.exp(x) for x in ref.values()), rel=2e-3)
        if steer_suffix:
            # a suffix cost: each request computes at most its partial last KV block, the
            # think-end marker, the suffix and the choice tokens, never the whole prefix
            assert r.computed_tokens <= r.requests * (BLOCK - 1 + te + sfx + longest), r
        print(r.token_index, {c: round(x, 4) for c, x in r.logprobs.items()},
              "mass", round(r.mass, 4), "requests", r.requests, "computed", r.computed_tokens)


def test_choice_rows_taken_from_the_prefix_cache_are_read_again(setup, hf_model):
    """" 20" and " 30" share their first token ' '. With the KV block boundary right after
    it, the second fork finds that block cached and vLLM computes no prompt log-prob for
    ' ' -> '3': the job reads it with an extra (gap) request, and the reading still matches
    the HF reference."""
    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants

    llm, _ = setup
    tok = llm.get_tokenizer()
    cfg = ProbeConfig(choices=["20", "30"], suffix="\nThe final answer is")
    p = build_prompt(tok, "Is the speed 20 or 30 km/h? Answer 20 or 30.")
    sfx = len(tok.encode(cfg.suffix, add_special_tokens=False))
    filler = tok.encode(" ok", add_special_tokens=False)
    p = p[:1] + filler * ((BLOCK - 1 - len(p) - sfx) % BLOCK) + p[1:]
    assert (len(p) + sfx + 1) % BLOCK == 0
    llm.reset_prefix_cache()
    job = ProbeJob(tok, [p], [None], cfg, generate=False)
    (traj,) = run_job(llm, job, use_tqdm=False)
    (r,) = traj.readings
    assert r.requests > 1 + 4, "expected a gap read"   # head + 4 variant forks + gaps
    variants = {c: reference_variants(tok, c) for c in cfg.choices}
    ref = hf_choice_logprobs(hf_model, fork_context(tok, p, [], 0, cfg.suffix), variants)
    for c in cfg.choices:
        assert abs(r.logprobs[c] - ref[c]) < 1e-3, (c, r.logprobs[c], ref[c])


def test_single_token_choices_read_the_same_on_forks(setup):
    """Yes/No through the one-fork path and through one prompt-log-prob fork per variant."""
    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    cfg = ProbeConfig(every=16, max_tokens=48, ignore_eos=True)
    (head,) = run_job(llm, ProbeJob(tok, [p], [STEERED], cfg), use_tqdm=False)
    forked_job = ProbeJob(tok, [p], [STEERED], cfg, fork_single_tokens=True)
    forked_job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(
        token_ids=head.token_ids)])])
    (forked,) = run_job(llm, forked_job, use_tqdm=False, stages=STAGES[1:])
    n_variants = sum(len(vs) for vs in forked_job.choices.variants)
    for a, b in zip(head.readings, forked.readings, strict=True):
        assert b.requests >= 1 + n_variants and a.requests == 1
        for c in ("Yes", "No"):
            assert abs(a.logprobs[c] - b.logprobs[c]) < 1e-4, (a.token_index, c)


def test_cli_probe_multi_token_questions_match_hf_reference(setup, hf_model, tmp_path):
    """``vllm-steer probe`` on the multiple-choice questions (the module's engine is passed in
    instead of starting another), its JSON checked against the HF reference."""
    import argparse
    import json

    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants
    from vllm_steer.probe.cli import run_probe

    llm, reg = setup
    tok = llm.get_tokenizer()
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"questions: {SHIPPED / 'questions' / 'multiple_choice.yaml'}\n"
        "limit: 2\nopen_thinking: \"<think>\\n\"\n"
        "probe: {every: 16, max_tokens: 32, ignore_eos: true}\n"
        "runs:\n  - {label: unsteered, steering: null}\n"
        "  - {label: v1, steering: {vectors: [{name: v1, scale: 0.7}], apply_to: generated}}\n")
    args = argparse.Namespace(config=str(exp), out=str(tmp_path / "out"), limit=None,
                              model=None, registry=None)
    assert run_probe(args, llm=llm) == 0
    data = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert [q["trajectories"][0]["readings"][0]["logprobs"].keys() for q in data["questions"]] \
        == [{"20": 0, "30": 0, "40": 0, "50": 0}.keys(),
            {"New York": 0, "Los Angeles": 0, "Chicago": 0, "Houston": 0}.keys()]
    dense = composed_dense(reg, [("v1", 0.7)])
    for qi, q in enumerate(data["questions"]):
        assert (tmp_path / "out" / f"probe_q{qi}.png").stat().st_size > 0
        choices = list(q["variants"])
        variants = {c: reference_variants(tok, c) for c in choices}
        assert {c: sorted(tuple(v["token_ids"]) for v in q["variants"][c]) for c in choices} \
            == variants
        for t in q["trajectories"]:
            steered = t["steering"] is not None
            for r in t["readings"]:
                ctx = fork_context(tok, t["prompt_ids"], t["token_ids"], r["token_index"],
                                   q["probe"]["suffix"])
                ref = hf_choice_logprobs(hf_model, ctx, variants, dense if steered else None,
                                         start=len(t["prompt_ids"]))
                for c in choices:
                    assert abs(r["logprobs"][c] - ref[c]) < 1e-3, (qi, t["label"], c)


def test_cli_sweep_of_an_n_way_question_with_a_target(setup, tmp_path):
    """``vllm-steer sweep`` on four-way mood questions, scored as the log-odds of "happy"."""
    import argparse
    import json

    from vllm_steer.probe.cli import run_sweep

    llm, _ = setup
    args = argparse.Namespace(config=str(SHIPPED / "experiments" / "sweep_mood_four_way.yaml"),
                              out=str(tmp_path), model=None, registry=None, vector=None,
                              scales=None, target=None)
    assert run_sweep(args, llm=llm) == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert res["target"] == "happy" and res["choices"] == ["happy", "sad", "angry", "bored"]
    print("mean log-odds", res["mean_log_odds"], "r", res["pearson_r"], "mass", res["mean_mass"])
    assert all(abs(sum(p.values()) - 1) < 1e-6 for p in res["mean_probs"])
    assert all(0 < m <= 1 for m in res["mean_mass"])
    assert res["pearson_r"] is not None and res["pearson_r"] >= 0.9
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_happy_sweep_moves_log_ratio_monotonically(setup):
    from vllm_steer.probe import ProbeConfig, sweep
    from vllm_steer.probe.questions import load_questions

    llm, _ = setup
    qs = load_questions(SHIPPED / "questions" / "mood_yes_no.yaml")
    res = sweep(llm, qs.texts, "happy", [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
                ProbeConfig(choices=["Yes", "No"], suffix=None), signs=qs.signs("Yes"))
    print("signed means", res.mean_signed_log_odds, "r", res.pearson_r_signed)
    assert res.pearson_r_signed is not None and res.pearson_r_signed >= 0.99
    print("mean mass", res.mean_mass, "low-mass readings", res.low_mass_count)
    assert all(0 < m <= 1 for m in res.mean_mass)


# -- live probes through the Python API (probe/live_run.live_generate) -----------------------
@pytest.mark.parametrize("choices, extra", [
    (["Yes", "No"], {}), (["20", "30", "40", "50"], {}),
    (["Yes", "No"], {"trigger": "steps", "every": 24, "align": "block"}),
    (["20", "30", "40", "50"], {"trigger": "steps", "every": None, "align": "block"})],
    ids=["yes-no", "20-50", "yes-no-steps-aligned", "20-50-steps-aligned"])
def test_live_readings_equal_the_offline_probe_of_the_same_trajectory(setup, choices, extra):
    """Forks submitted while the requests generate (two prompts, n=2 sampled) read what
    the offline probe reads on the finished trajectories (the same points: every N tokens
    or reasoning steps, exact or aligned), at a suffix cost."""
    from vllm import SamplingParams

    from vllm_steer.probe.live_drivers import live_generate

    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    steps = extra.get("trigger") == "steps"
    n_tok = 96 if steps else 40
    sp = SamplingParams(max_tokens=n_tok, temperature=0.8, seed=3, n=2, ignore_eos=True)
    probe_cfg = {"choices": choices, "every": 8, **extra}
    res = live_generate(llm, [p, p[:-1]], sp, probe_cfg, steering=STEERED)
    te = len(tok.encode("</think>", add_special_tokens=False))
    sfx = len(tok.encode("\nThe final answer is", add_special_tokens=False))
    triggers = set()
    for r, prompt in zip(res, [p, p[:-1]], strict=True):
        assert sorted(r.readings) == [0, 1] and not r.stops
        for c in r.output.outputs:
            gen = list(c.token_ids)
            live = r.readings[c.index]
            if not steps:
                assert [x["token_index"] for x in live] == [0, 8, 16, 24, 32, 40]
            job = ProbeJob(tok, [prompt], [STEERED], ProbeConfig(**probe_cfg, max_tokens=n_tok),
                           block_size=BLOCK)
            job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=gen)])])
            (traj,) = run_job(llm, job, use_tqdm=False, stages=STAGES[1:])
            assert len(live) == len(traj.readings)
            for a, b in zip(live, traj.readings, strict=True):
                assert a["token_index"] == b.token_index and a["in_thinking"] == b.in_thinking
                assert (a["trigger"], a["marker"], a["trigger_index"]) == \
                    (b.trigger, b.marker, b.trigger_index)
                triggers.add(a["trigger"])
                for ch in choices:
                    assert abs(a["logprobs"][ch] - b.logprobs[ch]) < 1e-3, (a, ch)
                longest = job.choices.max_len
                assert a["computed_tokens"] <= a["requests"] * (BLOCK - 1 + te + sfx + longest)
            assert max(x["cached_tokens"] for x in live) >= BLOCK   # the live prefix, cached
    if steps:   # sampled text with blank lines: steps fired (and the fallback, for Yes/No)
        assert "step" in triggers, triggers


def test_live_early_exit_appends_the_settled_answer(setup):
    from vllm import SamplingParams

    from vllm_steer.probe.live_drivers import live_generate

    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    sp = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    (full,) = live_generate(llm, [p], sp, {"every": 4})
    from tests.probe_reference import threshold_between

    threshold = threshold_between(max(x["probs"].values()) for x in full.readings[0]
                                  if x["mass"] >= 0.05)
    stop = {"threshold": threshold, "consecutive": 1, "complete": True}
    (early,) = live_generate(llm, [p], sp, {"every": 4, "stop_when": stop})
    rec = early.stops[0]
    first = next(x for x in full.readings[0] if max(x["probs"].values()) >= threshold
                 and x["mass"] >= 0.05)
    assert rec.point.token_index == first["token_index"]
    out = early.output.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "vllm_steer:probe_settled"
    assert list(out.token_ids)[-len(rec.answer_ids):] == rec.answer_ids
    assert len(out.token_ids) - len(rec.answer_ids) < 96
    assert tok.decode(rec.answer_ids).endswith(rec.choice)
    assert list(out.token_ids)[:first["token_index"]] == \
        list(full.output.outputs[0].token_ids)[:first["token_index"]]


# -- fork placement: computed tokens from vLLM's counters ---------------------------------------
def _tail_tokens(tok, thinking: bool, suffix: str) -> int:
    return (len(tok.encode("</think>", add_special_tokens=False)) if thinking else 0) \
        + len(tok.encode(suffix, add_special_tokens=False))


@pytest.mark.parametrize("choices, align", [(["Yes", "No"], "prefix"),
                                            (["20", "30", "40", "50"], "base"),
                                            (["Yes", "No"], "none")],
                         ids=["yes-no-prefix", "20-50-base", "yes-no-exact"])
def test_aligned_forks_compute_only_what_the_cache_cannot_supply(setup, choices, align):
    """Each reading's prompt tokens computed, from vLLM's per-request ``num_cached_tokens``:
    a prefix-aligned Yes/No fork computes its think-end marker and suffix only; a
    base-aligned multi-token reading computes its base's last block once (the first fork
    scheduled) and each read-context fork only its context tokens (the others find the base
    in the cache, in the same engine step). Exact forks recompute the partial last block."""
    llm, _ = setup
    tok = llm.get_tokenizer()
    p = build_prompt(tok, QUESTION, open_thinking="<think>\n")
    llm.reset_prefix_cache()
    cfg = ProbeConfig(choices=choices, every=16, max_tokens=128, ignore_eos=True, align=align)
    job = ProbeJob(tok, [p], [STEERED], cfg, block_size=BLOCK)
    (traj,) = run_job(llm, job, use_tqdm=False)
    inner = [r for r in traj.readings if r.trigger not in ("start", "end")]
    assert len(inner) >= 3
    paths = sum(len(ctx) for ctx, _ in job.reader.paths)
    for r in inner:
        tail = _tail_tokens(tok, r.in_thinking, cfg.suffix)
        partial = (len(p) + r.token_index) % BLOCK
        if align == "prefix":
            assert partial == 0 and r.requests == 1 and r.computed_tokens == tail, r
        elif align == "base":
            assert (len(p) + r.token_index + tail) % BLOCK == 0
            assert r.requests == 1 + len(job.reader.paths)
            assert r.computed_tokens == partial + tail + paths, r
        else:
            assert r.computed_tokens == partial + tail, r
        assert r.trigger_index >= r.token_index > r.trigger_index - BLOCK
    if align == "none":
        assert any((len(p) + r.token_index) % BLOCK for r in inner)   # partial blocks


def test_multi_token_readings_at_shared_bases_match_hf_reference(setup, hf_model):
    """Multi-token readings through read-context forks submitted together, sharing the
    base through the cache (it ends on a block), equal the HF chain rule (exact forks:
    ``test_multi_token_readings_match_hf_reference``)."""
    align = "base"
    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants

    llm, reg = setup
    tok = llm.get_tokenizer()
    question, choices = MULTI[0]
    p = build_prompt(tok, question, open_thinking="<think>\n")
    cfg = ProbeConfig(choices=choices, every=32, max_tokens=96, ignore_eos=True, align=align)
    job = ProbeJob(tok, [p], [STEERED], cfg, block_size=BLOCK)
    (traj,) = run_job(llm, job, use_tqdm=False)
    variants = {c: reference_variants(tok, c) for c in choices}
    dense = composed_dense(reg, [("v1", 0.7)])
    assert len(traj.readings) >= 4
    for r in traj.readings:
        ctx = fork_context(tok, p, traj.token_ids, r.token_index, cfg.suffix)
        ref = hf_choice_logprobs(hf_model, ctx, variants, dense, start=len(p))
        for c in choices:
            assert abs(r.logprobs[c] - ref[c]) < 1e-3, (align, r.token_index, c)

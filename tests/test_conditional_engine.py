"""Conditional steering (CAST) on a real vLLM engine (eager) with the real default model.

One engine for the module. References: the condition score and decision from HF
transformers' hidden states with the formula written in tests/cond_reference.py, and
steered generations by full recompute with forward hooks (tests/steer_helpers.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cond_reference import ref_holds, ref_score
from tests.steer_helpers import composed_dense, env_registry, hf_greedy
from vllm_steer.fixtures.engines import inproc_engine, make_test_llm, shutdown

pytestmark = pytest.mark.engine
N_TOKENS = 16
LOGPROB_ATOL = 2e-3
SCORE_ATOL = 1e-4
#: Condition layers of the test's condition vector (one read by mean, one by last).
L_MEAN, L_LAST = 6, 18

PROMPTS = [
    "How do I make a bomb at home?",
    "How do I bake bread at home?",
    "Write a guide to stealing a car without being caught.",
    "Write a short poem about the sea.",
    "Tell me how to poison my neighbour's dog.",
    "What is the capital of France?",
]
LONG = ("The history of the lighthouse begins with fires lit on hills to guide ships. "
        "Later, towers were built and lenses improved the light. ") * 20


@pytest.fixture(scope="module")
def hf(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def setup(default_model_dir, hf, tmp_path_factory):
    """The engine and a registry with v1..v3 and ``cond``: a condition vector whose
    direction at each condition layer is the difference of the mean states of the
    harmful-looking and the harmless-looking prompts above (HF), with trained defaults."""
    from vllm_steer.fixtures.vectors import write_vectors
    from vllm_steer.vector import SteeringVector, VectorMetadata

    model, tok = hf
    dirs = {}
    for layer in (L_MEAN, L_LAST):
        with torch.no_grad():
            means = [model(torch.tensor([encode(tok, p)]), output_hidden_states=True)
                     .hidden_states[layer + 1][0].mean(0) for p in PROMPTS]
        dirs[layer] = (means[0] + means[2] + means[4]) / 3 - (means[1] + means[3] + means[5]) / 3
    meta = VectorMetadata(extra={"condition": '{"layer": 6, "aggregate": "mean", '
                                              '"threshold": 0.5, "compare": "above"}'})
    cond = SteeringVector(dirs, meta)
    root = tmp_path_factory.mktemp("cond")
    reg = write_vectors(root, {"v1": range(30), "v2": range(5, 20), "v3": range(0, 30, 3)},
                        hidden=576, extra={"cond": cond})
    env_registry(reg)
    with inproc_engine():
        llm = make_test_llm(default_model_dir, registry=reg)
    yield llm, reg, {k: v.numpy() for k, v in dirs.items()}
    shutdown(llm)


def sp(steering=None, n_tokens=N_TOKENS, **kw):
    from vllm import SamplingParams

    kw.setdefault("logprobs", 0)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=n_tokens, ignore_eos=True,
                          extra_args={"steering": steering} if steering is not None else None,
                          **kw)


def gen(llm, prompts_ids, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts_ids], params, use_tqdm=False)
    return outs


def tokens(out, i=0):
    return list(out.outputs[i].token_ids)


def logprobs(out, i=0):
    c = out.outputs[i]
    return [c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)]


def reports(llm, outs):
    from vllm_steer.vllm_adapter.conditions import take_conditions

    got = take_conditions(llm, [o.request_id for o in outs])
    return [got[o.request_id] for o in outs]


def cond(layer=L_MEAN, aggregate="mean", threshold=0.5, compare="above"):
    return {"name": "cond", "layer": layer, "aggregate": aggregate, "threshold": threshold,
            "compare": compare}


def split_threshold(scores):
    """A threshold with at least one score on each side, every score >= 1e-3 away."""
    s = sorted(scores)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(s, s[1:], strict=False)]
    width, mid = max(gaps)
    assert width > 2e-3, s
    return mid


@pytest.mark.parametrize("layer,aggregate", [(L_MEAN, "mean"), (L_LAST, "last"),
                                             (L_LAST, "mean"), (L_MEAN, "last")])
def test_scores_and_decisions_match_reference(setup, hf, layer, aggregate):
    """Mean and last, in one batch with a prompt long enough for chunked prefill (the
    engine's token budget is 256)."""
    llm, _, dirs = setup
    model, tok = hf
    ids = [encode(tok, p) for p in PROMPTS] + [encode(tok, LONG)]
    assert len(ids[-1]) > 2 * 256
    ref = [ref_score(model, p, layer, dirs[layer], aggregate) for p in ids]
    thr = split_threshold(ref)
    outs = gen(llm, ids, sp({"vectors": [{"name": "v1"}], "condition": cond(
        layer, aggregate, thr)}, n_tokens=2))
    for p, r, rep in zip(ids, ref, reports(llm, outs), strict=True):
        (one,) = rep
        c = one["conditions"][0]
        assert abs(c["score"] - r) < SCORE_ATOL, (len(p), c["score"], r)
        assert c["holds"] == ref_holds(r, thr, "above") == one["holds"]
        assert (c["layer"], c["aggregate"], c["threshold"]) == (layer, aggregate, thr)
    assert {rep[0]["holds"] for rep in reports(llm, gen(llm, ids, sp(
        {"vectors": [{"name": "v1"}], "condition": cond(layer, aggregate, thr)},
        n_tokens=1)))} == {True, False}


@pytest.mark.parametrize("aggregate", ["mean", "last"])
def test_cached_prefix(setup, hf, aggregate):
    """The same prompt twice: the second request's prefix is in the cache. A mean
    condition computes the whole prompt again (its hit is capped at 0); a last condition
    keeps the hit. Both read the reference's score."""
    llm, _, dirs = setup
    model, tok = hf
    p = encode(tok, LONG)[:200]
    ref = ref_score(model, p, L_MEAN, dirs[L_MEAN], aggregate)
    spec = {"vectors": [{"name": "v1"}], "condition": cond(L_MEAN, aggregate, 0.0)}
    first = gen(llm, [p], sp(spec, n_tokens=1))
    second = gen(llm, [p], sp(spec, n_tokens=1))
    if aggregate == "mean":
        assert second[0].num_cached_tokens == 0
    else:
        assert second[0].num_cached_tokens >= 192
    for outs in (first, second):
        (one,) = reports(llm, outs)[0]
        assert abs(one["conditions"][0]["score"] - ref) < SCORE_ATOL


def test_gated_generations_match_reference(setup, hf):
    """The rule holds: the generated tokens are steered by ``vectors``; it does not: by
    ``else_vectors``, or, without them, token for token as unsteered."""
    llm, reg, dirs = setup
    model, tok = hf
    ids = [encode(tok, p) for p in PROMPTS[:4]]
    ref = [ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean") for p in ids]
    thr = split_threshold(ref)
    then = [{"name": "v2", "scale": 1.5}]
    other = [{"name": "v3", "scale": 2.0}]
    with_else = {"vectors": then, "else_vectors": other, "condition": cond(threshold=thr)}
    no_else = {"vectors": then, "condition": cond(threshold=thr)}
    outs = gen(llm, ids * 3, [sp(with_else)] * 4 + [sp(no_else)] * 4 + [sp()] * 4)
    holds = [r[0]["holds"] for r in reports(llm, outs[:8])]
    assert holds == [ref_holds(r, thr, "above") for r in ref] * 2
    d_then = composed_dense(reg, [("v2", 1.5)])
    d_else = composed_dense(reg, [("v3", 2.0)])
    for k, p in enumerate(ids):
        want, want_lp = hf_greedy(model, p, d_then if holds[k] else d_else, "generated",
                                  N_TOKENS)
        assert tokens(outs[k]) == want, (k, holds[k])
        assert np.max(np.abs(np.array(logprobs(outs[k])) - want_lp)) < LOGPROB_ATOL
        plain = outs[8 + k]
        if holds[k]:
            assert tokens(outs[4 + k]) == want
        else:   # identical to the unsteered request in the same batch
            assert tokens(outs[4 + k]) == tokens(plain)
            assert logprobs(outs[4 + k]) == logprobs(plain)


def test_prompt_steering_is_read_by_the_condition(setup, hf):
    """``prompt_vectors`` steer the prompt unconditionally; the condition reads the
    stream after that steering (at layers up to and including its layer)."""
    llm, reg, dirs = setup
    model, tok = hf
    p = encode(tok, PROMPTS[0])
    d_prompt = composed_dense(reg, [("v1", 3.0)])
    before = ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean")
    after = ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean", prompt_dense=d_prompt)
    assert abs(before - after) > 2e-3   # far beyond SCORE_ATOL
    spec = {"vectors": [{"name": "v2"}], "prompt_vectors": [{"name": "v1", "scale": 3.0}],
            "condition": cond(threshold=min(before, after) - 0.05)}
    (out,) = gen(llm, [p], sp(spec))
    (one,) = reports(llm, [out])[0]
    assert abs(one["conditions"][0]["score"] - after) < SCORE_ATOL
    assert one["holds"]
    # generation: prompt positions steered by v1 x3, generated ones by v2
    from tests import hf_reference
    from tests.steer_helpers import position_mask

    ids, got = list(p), []
    d_then = composed_dense(reg, [("v2", 2.0)])   # the registry's default scale for v2
    for _ in range(N_TOKENS):
        x = torch.tensor([ids])
        with hf_reference.add_dense(model, d_prompt, position_mask(ids, "prompt", len(p))), \
                hf_reference.add_dense(model, d_then, position_mask(ids, "generated", len(p))):
            logits = model(x).logits
        got.append(int(logits[0, -1].argmax()))
        ids.append(got[-1])
    assert tokens(out) == got


def test_mixed_batch_equals_separate_runs(setup, hf):
    """Every kind of neighbour in one batch: unsteered, unconditional, conditioned (held,
    not held, else), conditioned differently (another layer, last, an any-rule), a replay
    with a decision. Each equals its own run alone."""
    llm, _, dirs = setup
    model, tok = hf
    ids = [encode(tok, p) for p in PROMPTS]
    ref = [ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean") for p in ids]
    thr = split_threshold(ref)
    specs = [
        None,
        {"vectors": [{"name": "v1"}]},
        {"vectors": [{"name": "v2"}], "condition": cond(threshold=thr)},
        {"vectors": [{"name": "v2"}], "else_vectors": [{"name": "v3"}],
         "condition": cond(threshold=thr, compare="below")},
        {"vectors": [{"name": "v3"}], "condition": {"any": [
            cond(L_LAST, "last", 0.99), cond(L_MEAN, "mean", thr)]}},
        {"vectors": [{"name": "v1", "scale": -1.0}], "decision": False,
         "else_vectors": [{"name": "v2"}]},
    ]
    batch_ids = [ids[k % len(ids)] for k in range(2 * len(specs))]
    batch_specs = specs + specs[::-1]
    mixed = gen(llm, batch_ids, [sp(s) for s in batch_specs])
    for k, (p, s) in enumerate(zip(batch_ids, batch_specs, strict=True)):
        (alone,) = gen(llm, [p], sp(s))
        assert tokens(mixed[k]) == tokens(alone), (k, s)
        assert np.max(np.abs(np.array(logprobs(mixed[k])) - logprobs(alone))) < LOGPROB_ATOL
        if s is not None and "condition" in s:
            a, b = reports(llm, [mixed[k]])[0][0], reports(llm, [alone])[0][0]
            assert a["holds"] == b["holds"]
            assert [c["score"] for c in a["conditions"]] == pytest.approx(
                [c["score"] for c in b["conditions"]], abs=SCORE_ATOL)


def test_any_and_all_rules(setup, hf):
    llm, _, dirs = setup
    model, tok = hf
    ids = [encode(tok, p) for p in PROMPTS]
    r1 = [ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean") for p in ids]
    r2 = [ref_score(model, p, L_LAST, dirs[L_LAST], "last") for p in ids]
    t1, t2 = split_threshold(r1), split_threshold(r2)
    for mode in ("any", "all"):
        rule = {mode: [cond(L_MEAN, "mean", t1), cond(L_LAST, "last", t2, "below")]}
        outs = gen(llm, ids, sp({"vectors": [{"name": "v1"}], "condition": rule}, n_tokens=1))
        for k, rep in enumerate(reports(llm, outs)):
            a, b = ref_holds(r1[k], t1, "above"), ref_holds(r2[k], t2, "below")
            assert [c["holds"] for c in rep[0]["conditions"]] == [a, b]
            assert rep[0]["holds"] == ((a or b) if mode == "any" else (a and b))


def test_n_greater_than_one(setup, hf):
    """``n = 2`` (vLLM runs each choice as its own request): a report per choice, each
    choice as its own request (seed + index) would be."""
    llm, _, dirs = setup
    model, tok = hf
    p = encode(tok, PROMPTS[0])
    ref = ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean")
    spec = {"vectors": [{"name": "v2"}], "condition": cond(threshold=ref - 0.01)}
    (out,) = gen(llm, [p], sp(spec, n=2, temperature=0.8, seed=5))
    rep = reports(llm, [out])[0]
    assert [r["index"] for r in rep] == [0, 1]
    for r in rep:
        assert r["holds"] and abs(r["conditions"][0]["score"] - ref) < SCORE_ATOL
    for i in (0, 1):
        (alone,) = gen(llm, [p], sp(spec, temperature=0.8, seed=5 + i))
        assert tokens(out, i) == tokens(alone), i


def test_replays_never_share_kv_across_decisions(setup, hf):
    """A replay of a conditioned request (a probe fork) carries its decision: with the
    trajectory's decision it continues the trajectory, and replays with that decision
    share KV with each other; a replay with the other decision shares nothing with them
    and is steered by the other program. (Replays never share the trajectory's own
    blocks: its salt holds the condition, theirs the decision.)"""
    llm, reg, dirs = setup
    model, tok = hf
    p = encode(tok, PROMPTS[2])
    ref = ref_score(model, p, L_MEAN, dirs[L_MEAN], "mean")
    spec = {"vectors": [{"name": "v2"}], "else_vectors": [{"name": "v3"}],
            "condition": cond(threshold=ref - 0.01)}
    (traj,) = gen(llm, [p], sp(spec, n_tokens=48))
    assert reports(llm, [traj])[0][0]["holds"]
    seq = p + tokens(traj)
    cut = len(p) + 40
    same = {"vectors": spec["vectors"], "else_vectors": spec["else_vectors"],
            "decision": True, "split_position": len(p)}
    other = {**same, "decision": False}
    (a,) = gen(llm, [seq[:cut]], sp(same, n_tokens=8))
    assert a.num_cached_tokens == 0 and tokens(a) == tokens(traj)[40:48]
    (a2,) = gen(llm, [seq[:cut + 4]], sp(same, n_tokens=4))
    assert a2.num_cached_tokens >= 32 and tokens(a2) == tokens(traj)[44:48]
    (b,) = gen(llm, [seq[:cut]], sp(other, n_tokens=8))
    assert b.num_cached_tokens == 0
    want, _ = hf_greedy(model, seq[:cut], composed_dense(reg, [("v3", 1.0)]), "all", 8,
                        start=len(p))
    assert tokens(b) == want


def test_training_on_the_engine_equals_training_on_hf(setup, hf):
    """``train_condition`` through the engine's capture and with HF forward passes: the
    same directions, the same layer/comparison/threshold and F1s, for mean and last."""
    from vllm_steer.extract import train_condition
    from vllm_steer.extract.dataset import build_prompt_sets

    llm, _, _ = setup
    model, tok = hf
    sets = build_prompt_sets(tok, PROMPTS[0::2] + [LONG[:300]], PROMPTS[1::2] + [LONG[300:600]])
    for aggregate in ("mean", "last"):
        got = train_condition(llm, tok, sets, [L_MEAN, L_LAST], method="mean_diff",
                              aggregate=aggregate, holdout=0.25, seed=0, progress=False)
        ref = train_condition(model, tok, sets, [L_MEAN, L_LAST], method="mean_diff",
                              aggregate=aggregate, holdout=0.25, seed=0, progress=False)
        for layer in (L_MEAN, L_LAST):
            cos = torch.nn.functional.cosine_similarity(got.vector.directions[layer],
                                                        ref.vector.directions[layer], dim=0)
            assert float(cos) >= 0.9999, (aggregate, layer, float(cos))
        assert (got.layer, got.compare, got.threshold) == (ref.layer, ref.compare,
                                                          ref.threshold)
        assert got.f1_train == ref.f1_train and got.f1_heldout == ref.f1_heldout

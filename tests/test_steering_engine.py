"""The serving hook on a real vLLM engine (eager mode) with the real default model.

The engine is the session's default-model engine (tests/conftest.py), shared with the
capture, default-model and probe modules. Reference: HF transformers on the same weights
with forward hooks (tests/steer_helpers.py), greedy with HF's KV cache (checked here
against a full recompute per token).
"""

from __future__ import annotations

import pytest

from tests.ops_reference import OPS_CASES, run_ops_cases
from tests.steer_helpers import (
    THINK_END,
    THINK_START,
    composed_dense,
    hf_greedy,
)

pytestmark = pytest.mark.engine
N_TOKENS = 32
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module")
def setup(default_engine):
    """The session's default-model engine (tests/conftest.py): its own engine-core process,
    so the slot test reads the workers' counters after the engine freed finished requests
    (an in-process core does that only at its next step)."""
    return default_engine


@pytest.fixture(scope="module")
def hf(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def sp(steering=None, n=N_TOKENS, **kw):
    from vllm import SamplingParams

    extra = {"steering": steering} if steering is not None else kw.pop("extra_args", None)
    kw.setdefault("logprobs", 0)
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=extra, **kw)


def gen(llm, prompts_ids, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def sampled_logprobs(out) -> list[float]:
    c = out.outputs[0]
    return [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.\n",
    "Q: What is 17 times 3?\nA:",
]


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def think_prompt(tok):
    return (encode(tok, "Question: is the sky blue? Think first.\n") + encode(tok, THINK_START)
            + encode(tok, "\nThe sky scatters blue light, so it looks blue.\n")
            + encode(tok, THINK_END) + encode(tok, "\nAnswer:"))


@pytest.mark.parametrize("mode, start", [("thinking", 0), ("generated", 0), ("all", 5)])
def test_cached_hf_reference_equals_full_recompute(hf, tmp_path, mode, start):
    """The reference below (``hf_greedy``: HF's KV cache, one token per step) against the
    same greedy run recomputing every step in full (``hf_greedy_full``)."""
    from tests.steer_helpers import hf_greedy_full
    from vllm_steer.fixtures.vectors import write_test_vectors

    model, tok = hf
    dense = composed_dense(write_test_vectors(tmp_path), [("v1", 3.0), ("v2", -0.5)])
    p = think_prompt(tok) if mode == "thinking" else encode(tok, PROMPTS[1])
    markers = (encode(tok, THINK_START), encode(tok, THINK_END))
    cached = hf_greedy(model, p, dense, mode, 12, start, markers)
    full = hf_greedy_full(model, p, dense, mode, 12, start, markers)
    assert cached[0] == full[0]
    assert max(abs(a - b) for a, b in zip(cached[1], full[1], strict=True)) < 1e-4
    assert cached[0] != hf_greedy(model, p, None, mode, 12)[0]   # the vectors steer


@pytest.mark.parametrize("mode", ["all", "prompt", "generated"])
def test_matches_hf_reference(setup, hf, mode):
    llm, reg = setup
    model, tok = hf
    spec = {"vectors": [{"name": "v1", "scale": 1.0}, {"name": "v2", "scale": -0.5}],
            "apply_to": mode}
    dense = composed_dense(reg, [("v1", 1.0), ("v2", -0.5)])
    ids = [encode(tok, p) for p in PROMPTS]
    got, outs = gen(llm, ids, sp(spec))
    plain, _ = gen(llm, ids, sp())
    changed = 0
    for p, g, o, u in zip(ids, got, outs, plain, strict=True):
        ref, ref_lp = hf_greedy(model, p, dense, mode, N_TOKENS)
        assert g == ref, (mode, tok.decode(g), tok.decode(ref))
        lp = sampled_logprobs(o)
        assert max(abs(a - b) for a, b in zip(lp, ref_lp, strict=True)) < LOGPROB_ATOL
        changed += g != u
    assert changed >= 2, "the test vectors should change most greedy outputs"


def test_start_position_matches_reference(setup, hf):
    llm, reg = setup
    model, tok = hf
    p = encode(tok, PROMPTS[1])
    start = len(p) - 3
    spec = {"vectors": [{"name": "v3", "scale": 2.0}], "start_position": start}
    # in one batch: from start_position on, the same vector on every token, unsteered
    got, outs = gen(llm, [p, p, p], [sp(spec), sp({"vectors": spec["vectors"]}), sp()])
    ref, ref_lp = hf_greedy(model, p, composed_dense(reg, [("v3", 2.0)]), "all", N_TOKENS,
                            start)
    assert got[0] == ref, (tok.decode(got[0]), tok.decode(ref))
    assert max(abs(a - b) for a, b in zip(sampled_logprobs(outs[0]), ref_lp, strict=True)) \
        < LOGPROB_ATOL
    # it steers, and not every token: differs from unsteered and from steering all
    assert got[0] != got[2] and got[0] != got[1]


@pytest.mark.parametrize("mode", ["thinking", "answer"])
def test_thinking_modes_steer_exactly_the_marked_tokens(setup, hf, mode):
    llm, reg = setup
    model, tok = hf
    p = think_prompt(tok)
    markers = (encode(tok, THINK_START), encode(tok, THINK_END))
    dense = composed_dense(reg, [("v1", 3.0)])
    spec = {"vectors": [{"name": "v1", "scale": 3.0}], "apply_to": mode}
    # in one batch: the mode, the same vector on every token, unsteered
    got, outs = gen(llm, [p, p, p], [sp(spec), sp({**spec, "apply_to": "all"}), sp()])
    ref, ref_lp = hf_greedy(model, p, dense, mode, N_TOKENS, markers=markers)
    assert got[0] == ref
    assert max(abs(a - b) for a, b in zip(sampled_logprobs(outs[0]), ref_lp, strict=True)) \
        < LOGPROB_ATOL
    # and it is not the same as steering everything or nothing
    assert got[0] != got[1] and got[0] != got[2]


def test_thinking_prompt_logprobs_match_masked_reference(setup, hf):
    """Per-position check inside the prompt: prompt logprobs of the thinking mode."""
    import torch

    from tests.hf_reference import add_dense
    from tests.steer_helpers import position_mask

    llm, reg = setup
    model, tok = hf
    p = think_prompt(tok)
    markers = (encode(tok, THINK_START), encode(tok, THINK_END))
    dense = composed_dense(reg, [("v1", 3.0)])
    params = sp({"vectors": [{"name": "v1", "scale": 3.0}], "apply_to": "thinking"}, n=1,
                prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
    got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:], strict=True)]
    mask = position_mask(p, "thinking", len(p), markers=markers)
    assert 0 < int(mask.sum()) < len(p)
    with torch.no_grad(), add_dense(model, dense, mask):
        logp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
    ref = [float(logp[i, t]) for i, t in enumerate(p[1:])]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < LOGPROB_ATOL


def test_mixed_batch_isolation(setup, hf):
    llm, _ = setup
    _, tok = hf
    prompts = [encode(tok, t) for t in PROMPTS * 2]
    specs = [
        {"vectors": [{"name": "v1"}]},
        None,
        {"vectors": [{"name": "v2", "scale": 1.5}], "apply_to": "generated"},
        {"vectors": [{"name": "v1", "scale": 2.0}], "apply_to": "prompt"},
        {"vectors": [{"name": "v1"}, {"name": "v2"}, {"name": "v3", "scale": -1}]},
        None,
    ]
    mixed, _ = gen(llm, prompts, [sp(s) for s in specs])
    # every other request changes its spec (or loses it); each request keeps its output
    rotated = specs[1:] + specs[:1]
    for i in range(len(prompts)):
        others = [rotated[j] if j != i else specs[i] for j in range(len(prompts))]
        again, _ = gen(llm, prompts, [sp(s) for s in others])
        assert again[i] == mixed[i], i
    # and equals the request run alone
    for i in range(len(prompts)):
        alone, _ = gen(llm, [prompts[i]], sp(specs[i]))
        assert alone[0] == mixed[i], i
    assert len({tuple(m) for m in mixed}) >= 4


def _cached(out) -> int:
    return int(out.num_cached_tokens or 0)


def test_prefix_cache_never_shared_across_steering(setup, hf):
    llm, _ = setup
    _, tok = hf
    p = encode(tok, "Here is a long story about a lighthouse keeper and the sea. " * 10)
    assert len(p) >= 96  # three full 32-token blocks
    steer_a = {"vectors": [{"name": "v1"}]}
    steer_b = {"vectors": [{"name": "v2"}]}

    def run(spec):
        toks, outs = gen(llm, [p], sp(spec, n=8))
        return toks[0], _cached(outs[0])

    llm.reset_prefix_cache()
    fresh_a, c = run(steer_a)
    assert c == 0
    llm.reset_prefix_cache()
    fresh_b, _ = run(steer_b)
    llm.reset_prefix_cache()
    plain, _ = run(None)
    assert len({tuple(fresh_a), tuple(fresh_b), tuple(plain)}) == 3

    # unsteered first, then steered with the same prompt: no reuse, steered result
    a1, c = run(steer_a)
    assert c == 0 and a1 == fresh_a
    # identical spec: reuses every full block
    a2, c = run(steer_a)
    assert c >= 64 and a2 == fresh_a
    # identical content by another route (path instead of name) shares too
    a3, c = run({"vectors": [{"path": "v1.safetensors"}]})
    assert c >= 64 and a3 == fresh_a
    # a different vector: no reuse
    b1, c = run(steer_b)
    assert c == 0 and b1 == fresh_b
    # same vector, other scale: no reuse
    _, c = run({"vectors": [{"name": "v1", "scale": 1.0001}]})
    assert c == 0
    # reverse order: steered first, then unsteered
    llm.reset_prefix_cache()
    run(steer_a)
    u, c = run(None)
    assert c == 0 and u == plain
    u2, c = run(None)
    assert c >= 64 and u2 == plain


def test_slots_are_freed_after_thousands_of_distinct_specs(setup):
    llm, _ = setup
    n = 2000
    params = [sp({"vectors": [{"name": "v3", "scale": 0.001 * (i + 1)}]}, n=2, logprobs=None)
              for i in range(n)]
    prompts = [{"prompt_token_ids": [1, 2, 3 + (i % 50)]} for i in range(n)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == n and all(len(o.outputs[0].token_ids) == 2 for o in outs)
    (stats,) = llm.collective_rpc("vllm_steer_stats")
    assert stats["live_requests"] == 0 and stats["live_digests"] == 0
    assert stats["resident"] == 0 and stats["free_slots"] == stats["num_slots"] - 1


BAD = [
    ({"steering": {"vectors": [{"name": "nope"}]}}, "steering.vectors[0].name", "unknown vector"),
    ({"steering": {"vectors": [{"path": "../registry.yaml"}]}}, "steering.vectors[0].path",
     "not inside"),
    ({"steering": {"vectors": [{"name": "wide"}]}}, "steering.vectors[0]", "hidden size"),
    ({"steering": {"vectors": [{"name": "v1", "scale": float("nan")}]}},
     "steering.vectors[0].scale", "finite"),
    ({"steering": {"vectors": [{"name": "v1", "scale": float("inf")}]}},
     "steering.vectors[0].scale", "finite"),
    ({"steering": {"vectors": [{"name": "v1", "layers": [30]}]}},
     "steering.vectors[0].layers", "out of range"),
    ({"steering": {"vectors": [{"name": "v1"}], "apply_to": "middle"}}, "steering.apply_to",
     "not one of"),
    ({"steering": '{"vectors": [{"name": "v1"}'}, "steering", "malformed JSON"),
    ({"steering": {"vectors": [{"name": "v1"}] * 17}}, "steering.vectors", "at most"),
    ({"steer": "v1", "steer_scale": "lots"}, "steer_scale", "number"),
    ({"steer": "nope", "steer_scale": 2.0}, "steer", "unknown vector"),
    ({"steer": "v1", "steer_layers": [31]}, "steer_layers", "out of range"),
    ({"_vllm_steer": {"digest": "x"}}, "_vllm_steer", "reserved"),
]


@pytest.mark.parametrize("extra, field, message", BAD)
def test_bad_input_is_refused_and_engine_keeps_serving(setup, hf, extra, field, message):
    from vllm.exceptions import VLLMValidationError

    llm, _ = setup
    _, tok = hf
    p = encode(tok, PROMPTS[0])
    before, _ = gen(llm, [p], sp({"vectors": [{"name": "v1"}]}, n=8))
    with pytest.raises(VLLMValidationError, match=message) as ei:
        gen(llm, [p], sp(n=8, extra_args=extra))
    assert ei.value.parameter == field
    after, _ = gen(llm, [p], sp({"vectors": [{"name": "v1"}]}, n=8))
    assert after == before


# -- interventions beyond addition: ablate, clamp, normalize (reference: tests/ops_reference) ---
def test_ops_match_hf_reference_in_a_mixed_batch(setup, hf):
    """Each op against the reference, next to an unsteered request; each request equals
    itself run alone (no cross-talk through the projection tables)."""
    llm, reg = setup
    model, tok = hf
    _, _, moved = run_ops_cases(llm, model, reg, tok)
    assert len(moved) == len(OPS_CASES) and OPS_CASES[-1][0] is None
    print("ops moved log-probs by", [round(m, 3) for m in moved])
    assert all(m > 0.05 for m in moved[:-1]), moved   # every op changes the model


def test_op_changes_are_distinct_cache_salts_and_bad_ops_are_refused(setup, hf):
    from vllm.exceptions import VLLMValidationError

    llm, _ = setup
    _, tok = hf
    p = encode(tok, "Here is a long story about a lighthouse keeper and the sea. " * 10)
    llm.reset_prefix_cache()
    gen(llm, [p], sp({"vectors": [{"name": "v1", "op": "ablate"}]}, n=4))
    for spec in ({"vectors": [{"name": "v1", "op": "ablate", "strength": 0.9}]},
                 {"vectors": [{"name": "v1", "op": "clamp"}]},
                 {"vectors": [{"name": "v1", "op": "clamp", "value": 0.5}]},
                 {"vectors": [{"name": "v1"}]},
                 {"vectors": [{"name": "v1", "op": "ablate"}], "normalize": True}):
        _, outs = gen(llm, [p], sp(spec, n=4))
        assert _cached(outs[0]) == 0, spec          # never shares the ablated KV blocks
    _, outs = gen(llm, [p], sp({"vectors": [{"name": "v1", "op": "ablate"}]}, n=4))
    assert _cached(outs[0]) >= 64                    # the identical recipe does
    bad = [({"vectors": [{"name": "v1", "op": "ablate", "scale": 2.0}]},
            "steering.vectors[0].scale"),
           ({"vectors": [{"name": "v1", "op": "ablate", "strength": 1.5}]},
            "steering.vectors[0].strength"),
           ({"vectors": [{"name": "v1", "op": "clamp", "value": "nan"}]},
            "steering.vectors[0].value"),
           ({"vectors": [{"name": "v1", "op": "twist"}]}, "steering.vectors[0].op"),
           ({"vectors": [{"name": "v1"}], "normalize": "maybe"}, "steering.normalize"),
           # this engine runs with max_projections 1: two ablations on one layer do not fit
           ({"vectors": [{"name": "v1", "op": "ablate"}, {"name": "v3", "op": "ablate"}]},
            "steering.vectors")]
    for spec, field in bad:
        with pytest.raises(VLLMValidationError) as ei:
            gen(llm, [p], sp(spec, n=2))
        assert ei.value.parameter == field, (spec, str(ei.value))
    with pytest.raises(VLLMValidationError) as ei:
        gen(llm, [p], sp(n=2, extra_args={"steer": "v1", "steer_op": "ablate",
                                          "steer_scale": 2.0}))
    assert ei.value.parameter == "steer_scale"
    # the flat shorthand carries ops too
    flat, _ = gen(llm, [p], sp(n=4, extra_args={"steer": "v1", "steer_op": "ablate"}))
    full, _ = gen(llm, [p], sp({"vectors": [{"name": "v1", "op": "ablate"}]}, n=4))
    assert flat == full

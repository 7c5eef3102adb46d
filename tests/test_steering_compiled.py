"""The serving hook in vLLM's default compiled mode (torch.compile / inductor) on the
default model. (That the hook is part of vLLM's compile-cache key is checked on a tiny
model: tests/test_compile_cache_key.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.arch_check import Case, check_against_hf, run_cases
from tests.ops_reference import OPS_CASES, run_ops_cases
from tests.steer_helpers import THINK_END, THINK_START, composed_dense, env_registry
from tests.vllm_cache import fresh_cache_root
from vllm_steer.fixtures.engines import make_test_llm, shutdown
from vllm_steer.fixtures.vectors import write_test_vectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]
N_TOKENS = 32



@pytest.fixture(scope="module")
def setup(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    # a fresh compile cache: the graph is compiled here, never loaded from an earlier run
    os.environ["VLLM_CACHE_ROOT"] = str(fresh_cache_root(root / "vllm_cache"))
    env_registry(write_test_vectors(root))
    llm = make_test_llm(default_model_dir, enforce_eager=False)
    yield llm, Path(os.environ["VLLMSTEER_REGISTRY"])
    shutdown(llm)
    os.environ.pop("VLLM_CACHE_ROOT", None)


@pytest.fixture(scope="module")
def hf(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def test_compiled_matches_hf_reference(setup, hf):
    """Every apply_to mode and start_position in one compiled batch with unsteered
    neighbours, teacher-forced against HF hooks (tests/arch_check.py): greedy tokens equal
    (no near ties allowed), sampled and prompt log-probs within 2e-3, and each steered
    request moved by more than the tolerance could hide."""
    llm, reg, *_ = setup
    model, tok = hf
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    think = (enc("Is the sky blue?\n") + enc(THINK_START) + enc("\nIt scatters blue light.\n")
             + enc(THINK_END) + enc("\nAnswer:"))
    poem = enc("Write a short poem about the sea.\n")
    parts = [("v1", 1.5), ("v3", -1.0)]
    cases = [Case(poem, parts, mode, prompt_logprobs=True)
             for mode in ("all", "prompt", "generated")]
    cases += [Case(poem, parts, "all", prompt_logprobs=True, start=len(poem) - 3),
              Case(think, parts, "thinking", prompt_logprobs=True),
              Case(think, parts, "answer", prompt_logprobs=True),
              Case(poem, []), Case(think, [], prompt_logprobs=True)]
    outs = run_cases(llm, cases, n_tokens=N_TOKENS)
    rep = check_against_hf(model, reg, cases, outs, 30, 576,
                           (enc(THINK_START), enc(THINK_END)))
    print("compiled: max log-prob error", rep.max_lp_err, "prompt", rep.max_prompt_lp_err,
          "effects", [round(e, 3) for e in rep.effects])
    assert rep.near_ties == 0
    for case, effect in zip(cases, rep.effects, strict=True):
        if case.parts:
            assert effect > 0.05, (case.mode, case.start, effect)


def test_compiled_ops_match_hf_reference(setup, hf):
    """ablate, clamp and normalize traced into the compiled graph, mixed with add and
    unsteered requests in one batch, each equal to itself run alone."""
    llm, reg, *_ = setup
    model, tok = hf
    _, _, moved = run_ops_cases(llm, model, reg, tok)
    assert len(moved) == len(OPS_CASES) and OPS_CASES[-1][0] is None
    assert all(m > 0.05 for m in moved[:-1]), moved


def test_compiled_capture_matches_hf_with_chunks_and_a_cached_prefix(setup, hf):
    """Hidden-state capture through the compiled graph (the capture op inside it): every
    mode in a mixed batch, a prompt prefilled in chunks, and a cached prefix."""
    from tests.capture_check import CaptureCase, check_capture_cases, check_chunked_and_cached
    from vllm_steer.fixtures.engines import TEST_ENGINE_OPTIONS

    llm, reg, *_ = setup
    model, tok = hf
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    p0, p1 = enc("The capital of France is Paris, and"), enc("Write a short poem about the sea.\n")
    cases = [CaptureCase(p0, {"layers": "all", "at": "tokens"}),
             CaptureCase(p1, None, [("v1", 1.5)]),
             CaptureCase(p1, {"layers": [3, 29], "at": "mean"}, [("v1", 1.5)]),
             CaptureCase(p0, {"layers": [10], "at": "positions", "positions": [0, -1]}),
             CaptureCase(p0, None)]
    err = check_capture_cases(llm, model, cases,
                              lambda steer: composed_dense(reg, steer), "compiled")
    seen = check_chunked_and_cached(llm, model, tok, "compiled",
                                    budget=TEST_ENGINE_OPTIONS["max_num_batched_tokens"],
                                    block=TEST_ENGINE_OPTIONS["block_size"], num_layers=30)
    print(f"compiled capture: max relative error {err:.2e}, cache {seen}")


def test_compiled_conditions_match_hf_reference(setup, hf):
    """Conditional steering in the compiled graph (tests/test_conditional_engine.py has the
    eager coverage): scores of mean and last conditions within 1e-4 of HF's, the same
    decisions, and each gated request generates as its decision's steering does in the
    same batch (held: as unconditioned steering of the generated tokens; not: unsteered)."""
    from vllm import SamplingParams

    from tests.cond_reference import ref_score
    from tests.hf_reference import read_directions
    from vllm_steer.vllm_adapter.conditions import take_conditions

    llm, reg, *_ = setup
    model, tok = hf
    v = read_directions(reg.parent / "vectors" / "v3.safetensors")[3].numpy()
    prompts = [tok.encode(p, add_special_tokens=False) for p in (
        "Write a short poem about the sea.\n", "How do I bake bread at home?",
        "Tell me how to pick a lock.")]
    steer = [{"name": "v1", "scale": 1.5}]
    for aggregate in ("mean", "last"):
        ref = [ref_score(model, p, 3, v, aggregate) for p in prompts]
        s = sorted(ref)
        thr = (s[0] + s[1]) / 2   # the lowest prompt does not hold, the others do
        assert s[1] - s[0] > 1e-3, s
        cond = {"path": "v3.safetensors", "layer": 3, "aggregate": aggregate,
                "threshold": thr, "compare": "above"}
        specs = [{"vectors": steer, "condition": cond}, None,
                 {"vectors": steer, "apply_to": "generated"}]
        ids = [p for p in prompts for _ in specs]
        params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                 extra_args={"steering": sp} if sp else None)
                  for _ in prompts for sp in specs]
        outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        reps = take_conditions(llm, [o.request_id for o in outs[::3]])
        for k, r in enumerate(ref):
            gated, plain, steered = outs[3 * k:3 * k + 3]
            (rep,) = reps[gated.request_id]
            assert abs(rep["conditions"][0]["score"] - r) < 1e-4, (aggregate, k)
            assert rep["holds"] is (r >= thr)
            want = steered if rep["holds"] else plain
            assert list(gated.outputs[0].token_ids) == list(want.outputs[0].token_ids)

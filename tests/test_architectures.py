"""The architecture matrix: every layer adapter steers equal to HF forward hooks.

For each architecture (``vllm_steer.testing.tiny_models.ARCHS``: tiny random-weight
checkpoints with the default model's tokenizer, built locally) one eager engine (in-process
engine core where possible, which starts in a third of the time; the steering code is the
same, and the SmolLM2 tests cover the multiprocess wire path) serves a
mixed batch — ``all``, ``generated`` with two composed vectors, ``thinking`` and
``answer`` with prompt log-probs (exact positions), and unsteered requests — checked
token for token and log-prob for log-prob against HF transformers with hooks on the
same weights. Compiled mode: tests/test_architectures_compiled.py.
"""

from __future__ import annotations

import pytest

from tests.arch_check import (
    Case,
    check_against_hf,
    run_cases,
    serve_arch,
    think_ids,
)
from tests.steer_helpers import THINK_END, THINK_START
from vllm_steer.testing.tiny_models import ARCHS, HIDDEN, LAYERS

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, default_model_dir, tmp_path_factory):
    yield from serve_arch(request.param, default_model_dir,
                          tmp_path_factory.mktemp(f"arch-{request.param}"))


def matrix_cases(tok) -> list[Case]:
    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    p0, p1 = enc("The capital of France is"), enc("Once upon a time there was a")
    return [
        Case(p0, [("a", 1.0)], "all"),
        Case(p0, []),
        Case(p1, [("a", -1.5), ("b", 1.0)], "generated"),
        Case(think_ids(tok, THINK_START, THINK_END, closed=False), [("a", 1.0)], "thinking",
             prompt_logprobs=True),
        Case(think_ids(tok, THINK_START, THINK_END, closed=True), [("b", 1.0)], "answer",
             prompt_logprobs=True),
        Case(p1, []),
    ]


def test_steering_matches_hf_hooks(arch):
    name, llm, hf, tok, reg = arch
    cases = matrix_cases(tok)
    outs = run_cases(llm, cases)
    markers = (tok.encode(THINK_START, add_special_tokens=False),
               tok.encode(THINK_END, add_special_tokens=False))
    rep = check_against_hf(hf, reg, cases, outs, LAYERS, HIDDEN, markers)
    print(f"{name}: max log-prob error {rep.max_lp_err:.2e} (prompt {rep.max_prompt_lp_err:.2e}),"
          f" near ties {rep.near_ties}, steering moved log-probs by up to "
          f"{rep.steered_effect:.2f} nats")
    # the vectors change the model: a test that steering applies at all
    assert rep.steered_effect > 0.5
    # isolation in the same batch: steered neighbours did not touch unsteered requests
    # (check_against_hf compared them to the unsteered HF model), and differ from them
    assert list(outs[0].outputs[0].token_ids) != list(outs[1].outputs[0].token_ids)
    # finished requests release their slots on the engine's next step
    run_cases(llm, [Case(cases[1].prompt, [])], n_tokens=1)
    (stats,) = llm.collective_rpc("vllm_steer_stats")
    assert stats["live_requests"] == 0
    assert stats["adapter"] == ARCHS[name].adapter


#: (spec, reference mask mode): two op mixes and an unsteered neighbour.
ARCH_OPS_CASES = [
    ({"vectors": [{"name": "a", "op": "clamp", "value": 3.0}], "normalize": True}, "all"),
    ({"vectors": [{"name": "b", "op": "ablate", "strength": 0.7}, {"name": "a", "scale": 0.5}]},
     "all"),
    (None, None),
]


def check_arch_ops(llm, hf, tok, reg) -> list[float]:
    """ablate/clamp/normalize through the architecture's adapter vs the ops reference, in
    one batch with an unsteered request, each equal to itself run alone."""
    from tests.ops_reference import run_ops_batch

    p = tok.encode("The capital of France is", add_special_tokens=False)
    _, moved = run_ops_batch(llm, hf, reg.parent / "vectors", [p] * len(ARCH_OPS_CASES),
                             ARCH_OPS_CASES, 12)
    return moved


def test_ops_match_hf_hooks(arch):
    name, llm, hf, tok, reg = arch
    moved = check_arch_ops(llm, hf, tok, reg)
    print(f"{name}: ops moved log-probs by {[round(m, 2) for m in moved]}")
    assert all(m > 0.05 for m in moved[:-1]), moved

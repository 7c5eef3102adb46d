"""The architecture matrix: every layer adapter steers equal to HF forward hooks.

For each architecture (``vllm_steer.fixtures.tiny_models.ARCHS``: tiny random-weight
checkpoints with the default model's tokenizer, built locally) one eager engine (in-process
engine core where possible, which starts in a third of the time; the steering code is the
same, and the SmolLM2 tests cover the multiprocess wire path) serves a
mixed batch — ``all``, ``generated`` with two composed vectors, ``thinking`` and
``answer`` with prompt log-probs (exact positions), and unsteered requests — checked
token for token and log-prob for log-prob against HF transformers with hooks on the
same weights. Compiled mode: tests/test_architectures_compiled.py.

First, per architecture, *unsteered* vLLM against HF (``test_unsteered_matches_hf``): steering
is judged against HF only where vLLM itself agrees with it, and a future vLLM that stops
agreeing shows up there, not as a steering failure. Configurations on which vLLM 0.32
itself differs (``tiny_models.VLLM_DIFFERS``, with the cause) are served too: their
unsteered test is an expected failure (strict: it fails the run once vLLM agrees, so the
"vLLM itself differs" rows of docs/architectures.md cannot go stale) and their steering
tests are skipped.
"""

from __future__ import annotations

import pytest

from tests.arch_check import (
    LOGPROB_ATOL,
    Case,
    check_against_hf,
    run_cases,
    serve_arch,
    think_ids,
    unsteered_gap,
)
from tests.steer_helpers import THINK_END, THINK_START
from vllm_steer.fixtures.tiny_models import ARCHS, HIDDEN, LAYERS, VLLM_DIFFERS, tiny_arch

pytestmark = [pytest.mark.engine, pytest.mark.slow]


#: One architecture per layer adapter kind: ``make test-fast`` runs these (marker ``fast``).
FAST = {"residual_pair": "llama", "stream": "gpt2", "stream_first": "stablelm",
        "hf_batched": "olmo2"}
assert {ARCHS[n].adapter for n in FAST.values()} == set(FAST) == \
    {a.adapter for a in ARCHS.values()}, "the fast tier must cover every adapter kind"


@pytest.fixture(scope="module", params=[
    pytest.param(n, marks=pytest.mark.fast) if n in FAST.values() else n
    for n in sorted(ARCHS) + sorted(VLLM_DIFFERS)])
def arch(request, default_model_dir, tmp_path_factory):
    yield from serve_arch(request.param, default_model_dir,
                          tmp_path_factory.mktemp(f"arch-{request.param}"))


def unsteered_prompts(tok) -> list[list[int]]:
    """The matrix's prompts (two plain, the longer one with a closed thinking section)."""
    cases = matrix_cases(tok)
    return [cases[0].prompt, cases[2].prompt, cases[4].prompt]


def check_unsteered(name: str, llm, hf, tok, request) -> None:
    """Unsteered vLLM equals HF within LOGPROB_ATOL, greedy token for token; on a config in
    ``VLLM_DIFFERS`` that is an expected (strict) failure, reported with its cause. First,
    the checkpoint's config keys that HF ignores but vLLM reads are exactly the flagged ones
    (``TinyArch.ignored_keys``)."""
    from vllm_steer.hf_ignored_keys import ignored_config_keys

    spec = tiny_arch(name)
    # config keys HF ignores but vLLM reads are flagged (as `vllm-steer doctor --model` does)
    flags = ignored_config_keys(hf.name_or_path)
    for flag in flags:
        print(f"{name}: flagged config key {flag}")
    assert [f.key for f in flags] == list(spec.ignored_keys), (name, [str(f) for f in flags])
    differs = spec.vllm_differs
    if differs:
        request.applymarker(pytest.mark.xfail(strict=True,
                                              reason=f"vLLM itself differs: {differs}"))
    gap = unsteered_gap(llm, hf, unsteered_prompts(tok))
    print(f"{name}: unsteered vLLM vs HF: max log-prob error {gap.max_lp_err:.2e} (prompt "
          f"{gap.max_prompt_lp_err:.2e}), greedy mismatches {gap.greedy_mismatches}")
    assert gap.worst < LOGPROB_ATOL and gap.greedy_mismatches == 0, (
        f"{name}: unsteered vLLM differs from HF by {gap.worst:.3g} nats "
        f"({gap.greedy_mismatches} greedy mismatches)")


def skip_if_vllm_differs(name: str) -> None:
    if differs := tiny_arch(name).vllm_differs:
        pytest.skip(f"steering cannot be judged against HF: vLLM itself differs ({differs})")


def test_unsteered_matches_hf(arch, request):
    name, llm, hf, tok, _ = arch
    check_unsteered(name, llm, hf, tok, request)


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
    skip_if_vllm_differs(name)
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
    skip_if_vllm_differs(name)
    moved = check_arch_ops(llm, hf, tok, reg)
    print(f"{name}: ops moved log-probs by {[round(m, 2) for m in moved]}")
    assert all(m > 0.05 for m in moved[:-1]), moved


def check_arch_capture(arch) -> float:
    """Hidden-state capture (every mode, steered and not, with neighbours that capture
    nothing) equals HF block outputs on this architecture's adapter."""
    from tests.capture_check import check_capture_cases, matrix_capture_cases
    from tests.steer_helpers import composed_dense

    name, llm, hf, tok, reg = arch
    return check_capture_cases(llm, hf, matrix_capture_cases(tok, LAYERS),
                               lambda steer: composed_dense(reg, steer, LAYERS, HIDDEN),
                               tag=f"arch-{name}")


def test_capture_matches_hf_block_outputs(arch):
    skip_if_vllm_differs(arch[0])
    err = check_arch_capture(arch)
    print(f"{arch[0]}: capture max relative error {err:.2e}")

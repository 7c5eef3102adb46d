"""The architecture matrix in vLLM's default compiled mode (torch.compile / inductor), one
architecture per layer adapter: the steering wrapper is traced into each model's graph.

Same batch and HF reference as tests/test_architectures.py.
"""

from __future__ import annotations

import pytest

from tests.arch_check import check_against_hf, run_cases, serve_arch
from tests.steer_helpers import THINK_END, THINK_START
from tests.test_architectures import check_arch_ops, check_unsteered, matrix_cases
from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS
from vllm_steer.vllm_adapter.engine import vllm_config

pytestmark = [pytest.mark.engine, pytest.mark.slow]
#: residual_pair (with MoE), stream, stream_first, hf_batched (Transformers backend)
COMPILED = ["qwen3_moe", "gpt2", "stablelm", "olmo2"]


@pytest.fixture(scope="module", params=COMPILED)
def arch(request, default_model_dir, tmp_path_factory):
    yield from serve_arch(request.param, default_model_dir,
                          tmp_path_factory.mktemp(f"compiled-{request.param}"),
                          enforce_eager=False)


def test_compiled_unsteered_matches_hf(arch, request):
    name, llm, hf, tok, _ = arch
    check_unsteered(name, llm, hf, tok, request)


def test_compiled_steering_matches_hf_hooks(arch):
    name, llm, hf, tok, reg = arch
    # vLLM 0.32 on the CPU defaults to DYNAMO_TRACE_ONCE (2); anything but NONE (0) compiles
    assert int(vllm_config(llm).compilation_config.mode) > 0
    cases = matrix_cases(tok)
    outs = run_cases(llm, cases)
    markers = (tok.encode(THINK_START, add_special_tokens=False),
               tok.encode(THINK_END, add_special_tokens=False))
    rep = check_against_hf(hf, reg, cases, outs, LAYERS, HIDDEN, markers)
    print(f"{name} (compiled): max log-prob error {rep.max_lp_err:.2e}, near ties "
          f"{rep.near_ties}, steering moved log-probs by up to {rep.steered_effect:.2f} nats")
    assert rep.steered_effect > 0.5


def test_compiled_ops_match_hf_hooks(arch):
    name, llm, hf, tok, reg = arch
    moved = check_arch_ops(llm, hf, tok, reg)
    assert all(m > 0.05 for m in moved[:-1]), (name, moved)


def test_compiled_capture_matches_hf_block_outputs(arch):
    from tests.test_architectures import check_arch_capture

    err = check_arch_capture(arch)
    print(f"{arch[0]} (compiled): capture max relative error {err:.2e}")

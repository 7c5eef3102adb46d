"""Tensor parallel: steered output with tensor_parallel_size=2 equals size 1.

Uses a tiny random-weight llama (steering math does not depend on trained weights)
whose head counts divide by 2. Pipeline parallel is not tested: vLLM 0.32's CPU runner
fails with it regardless of the plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.capture_check import (
    REL_TOL,
    CaptureCase,
    expected,
    hf_blocks,
    rel_err,
    run_capture_cases,
)
from tests.steer_helpers import composed_dense, env_registry
from vllm_steer import SteeringVector
from vllm_steer.testing.engines import make_test_llm, shutdown

pytestmark = [pytest.mark.engine, pytest.mark.slow]
HIDDEN, LAYERS = 128, 4


@pytest.fixture(scope="module")
def tiny(default_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tp")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=1024, initializer_range=0.3,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(5)
    (root / "vectors").mkdir()
    SteeringVector({i: 2.0 * torch.randn(HIDDEN, generator=g) for i in range(LAYERS)}).save(
        root / "vectors" / "t.safetensors")
    (root / "registry.yaml").write_text("vectors: {t: vectors/t.safetensors}\n")
    env_registry(root / "registry.yaml")
    return str(root / "model"), tok


def _captures(tok) -> list[CaptureCase]:
    """Hidden-state captures run under TP: every block output of every prompt position,
    and a steered mean, in one batch with a neighbour that captures nothing."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    p = enc("The capital of France is Paris, and the capital of Italy is")
    return [CaptureCase(p, {"layers": "all", "at": "tokens"}),
            CaptureCase(p, None, [("t", 1.0)]),
            CaptureCase(p, {"layers": [0, LAYERS - 1], "at": "mean", "start": 3}, [("t", 1.0)])]


def _run(model_dir, tok, tp, backend="mp", captures=None):
    """(steered tokens, their log-probs, unsteered tokens) with ``backend`` as vLLM's
    ``distributed_executor_backend`` (also used by tests/test_steering_ray.py). With a
    ``captures`` list, the capture batch (``_captures``) runs too and its
    ``(cases, records)`` is appended to it."""
    from vllm import SamplingParams

    prompts = ["The capital of France is", "Once upon a time", "def fib(n):"]
    specs = [{"vectors": [{"name": "t"}]}, None,
             {"vectors": [{"name": "t", "scale": -1.5}], "apply_to": "generated"}]
    llm = make_test_llm(model_dir, tensor_parallel_size=tp, max_model_len=512,
                        distributed_executor_backend=backend)
    try:
        params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0,
                                 extra_args={"steering": s} if s else None) for s in specs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        plain = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                     ignore_eos=True), use_tqdm=False)
        if captures is not None:
            cases = _captures(tok)
            captures.append((cases, run_capture_cases(llm, cases, f"tp{tp}")[1]))
    finally:
        shutdown(llm)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(o.outputs[0].token_ids)]
           for o in outs]
    return toks, lps, [list(o.outputs[0].token_ids) for o in plain]


def test_tp2_equals_tp1(tiny, monkeypatch):
    model_dir, tok = tiny
    caps: list = []
    t1, lp1, plain1 = _run(model_dir, tok, 1, captures=caps)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    t2, lp2, _ = _run(model_dir, tok, 2, captures=caps)
    assert t1 == t2
    for a, b in zip(lp1, lp2, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    # steering did something in both runs (request 0 steered everywhere, 1 unsteered)
    assert t1[0] != plain1[0] and t1[1] == plain1[1]
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    # hidden-state capture under TP=2 (recorded on rank 0) equals HF block outputs, as TP=1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reg = Path(os.environ["VLLMSTEER_REGISTRY"])
    for tp, (cases, recs) in zip((1, 2), caps, strict=True):
        assert sorted(recs) == [0, 2], (tp, sorted(recs))
        for k, rec in recs.items():
            case = cases[k]
            delta = composed_dense(reg, case.steer, LAYERS, HIDDEN) if case.steer else None
            mask = torch.ones(1, len(case.prompt), dtype=torch.bool) if case.steer else None
            err = rel_err(rec["values"], expected(hf_blocks(hf, case.prompt, delta, mask), rec))
            assert err < REL_TOL, (tp, k, err)

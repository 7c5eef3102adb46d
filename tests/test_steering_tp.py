"""Tensor parallel: steered output with tensor_parallel_size=2 equals size 1, with vLLM's
multiprocessing executor and with its Ray executor.

Uses a tiny random-weight llama (steering math does not depend on trained weights)
whose head counts divide by 2; the TP=1 run (mp executor) is shared by both tests.
Pipeline parallel is not tested: vLLM 0.32's CPU runner fails with it regardless of the
plugin.

Ray: the test starts a private local Ray cluster (``ray.init``) and shuts it down. On
vLLM's CPU platform, which has no Ray device key, ``tests/ray_cpu_shim.py`` (test-only)
gives it one; the engine core runs in this process so that the shim reaches the executor.
Under Ray the plugin's default transport is ``inline``: the test checks that each worker
received the vectors with the requests and never read the store. Multi-node use:
docs/multinode.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests import ray_cpu_shim
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
from vllm_steer.fixtures.engines import inproc_engine, make_test_llm, shutdown
from vllm_steer.steering.store import default_store_root

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.serial]
HIDDEN, LAYERS = 128, 4
REPO = Path(__file__).resolve().parents[1]


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


@dataclass
class Run:
    steered: list[list[int]]        # tokens of the mixed batch (steered and unsteered)
    logprobs: list[list[float]]     # their log-probs
    plain: list[list[int]]          # the same prompts, all unsteered
    worker_stats: list[dict]        # vllm_steer_stats of every worker
    captures: tuple | None = None   # (cases, records) of the capture batch, if it ran


def _run(model_dir, tp, backend="mp", inproc=False, tok=None) -> Run:
    """One engine with ``backend`` as vLLM's ``distributed_executor_backend``: a mixed
    batch (steered everywhere, unsteered, steered on generated tokens), then all unsteered;
    with ``tok``, also the capture batch (``_captures``)."""
    from vllm import SamplingParams

    prompts = ["The capital of France is", "Once upon a time", "def fib(n):"]
    specs = [{"vectors": [{"name": "t"}]}, None,
             {"vectors": [{"name": "t", "scale": -1.5}], "apply_to": "generated"}]
    with inproc_engine(inproc):
        llm = make_test_llm(model_dir, tensor_parallel_size=tp, max_model_len=512,
                            distributed_executor_backend=backend)
    try:
        params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0,
                                 extra_args={"steering": s} if s else None) for s in specs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        plain = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                     ignore_eos=True), use_tqdm=False)
        caps = None
        if tok is not None:
            cases = _captures(tok)
            caps = (cases, run_capture_cases(llm, cases, f"tp{tp}")[1])
        stats = llm.collective_rpc("vllm_steer_stats")
    finally:
        shutdown(llm)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(o.outputs[0].token_ids)]
           for o in outs]
    return Run(toks, lps, [list(o.outputs[0].token_ids) for o in plain], stats, caps)


@pytest.fixture(scope="module")
def tp1(tiny) -> Run:
    return _run(tiny[0], 1, tok=tiny[1])


def _assert_equal_to_tp1(run: Run, tp1: Run) -> None:
    assert run.steered == tp1.steered
    for a, b in zip(tp1.logprobs, run.logprobs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    assert run.plain == tp1.plain
    # steering did something (request 0 steered everywhere, 1 unsteered), in both runs
    assert tp1.steered[0] != tp1.plain[0] and tp1.steered[1] == tp1.plain[1]
    assert len(run.worker_stats) == 2 and all(s is not None for s in run.worker_stats)


def test_tp2_equals_tp1(tiny, tp1, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    tp2 = _run(tiny[0], 2, tok=tiny[1])
    _assert_equal_to_tp1(tp2, tp1)
    # hidden-state capture under TP=2 (recorded on rank 0) equals HF block outputs, as TP=1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    reg = Path(os.environ["VLLMSTEER_REGISTRY"])
    for tp, (cases, recs) in ((1, tp1.captures), (2, tp2.captures)):
        assert sorted(recs) == [0, 2], (tp, sorted(recs))
        for k, rec in recs.items():
            case = cases[k]
            delta = composed_dense(reg, case.steer, LAYERS, HIDDEN) if case.steer else None
            mask = torch.ones(1, len(case.prompt), dtype=torch.bool) if case.steer else None
            err = rel_err(rec["values"], expected(hf_blocks(hf, case.prompt, delta, mask), rec))
            assert err < REL_TOL, (tp, k, err)


def ray_unsupported_reason() -> str | None:
    """Why vLLM cannot run its Ray executor with TP=2 here (even with the CPU shim), or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'vllm-steer[ray]')"
    from vllm.platforms import current_platform

    if ray_cpu_shim.needed():
        return None
    if not current_platform.ray_device_key:
        return (f"vLLM's {current_platform.device_name!r} platform does not support the Ray "
                "executor: current_platform.ray_device_key is empty")
    if current_platform.device_count() < 2:
        return (f"tensor parallel 2 over Ray needs 2 {current_platform.ray_device_key}s, "
                f"{current_platform.device_count()} here")
    return None


@pytest.fixture()
def ray_cluster(tmp_path, monkeypatch):
    """A private local Ray cluster with two device slots (CPU: the shim's logical GPUs).

    ``VLLMSTEER_HOME`` is a fresh directory, set before Ray starts so its workers see the
    same one; yields it. Ray's session files live in a short temporary directory (its
    sockets' paths must stay under the Unix limit), removed afterwards."""
    reason = ray_unsupported_reason()
    if reason:
        pytest.skip(reason)
    import ray
    from vllm.platforms import current_platform

    home = tmp_path / "home"
    monkeypatch.setenv("VLLMSTEER_HOME", str(home))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    shim = ray_cpu_shim.needed()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    runtime_env: dict = {"env_vars": {"PYTHONPATH": pythonpath}}
    if shim:
        ray_cpu_shim.apply()
        runtime_env["worker_process_setup_hook"] = "tests.ray_cpu_shim.apply"
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        ray.init(num_cpus=2, num_gpus=2 if shim else current_platform.device_count(),
                 include_dashboard=False, runtime_env=runtime_env, _temp_dir=temp)
        yield home
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if shim:
            ray_cpu_shim.remove()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_tp2_equals_tp1(tiny, tp1, ray_cluster):
    """TP=2 over Ray (workers are Ray actors) steers exactly like TP=1, with the vectors
    sent inline: every worker composed them from the requests, none read the store, and
    the front end wrote nothing to it."""
    run = _run(tiny[0], 2, backend="ray", inproc=True)
    _assert_equal_to_tp1(run, tp1)
    for s in run.worker_stats:
        assert s["inline_vectors"] >= 1 and s["store_reads"] == 0, s
    # the engine's store would be this one (the fixture's data home): nothing was written
    assert default_store_root() == ray_cluster.resolve() / "store"
    assert not default_store_root().exists()

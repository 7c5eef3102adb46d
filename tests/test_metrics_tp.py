"""The plugin's Prometheus metrics under tensor parallelism (``--tensor-parallel-size 2``),
read through a real Prometheus: per-rank gauges, requests counted once.

A module of its own so that ``tests/test_metrics.py``'s server is stopped before this one
starts: a vLLM worker polled by the metrics refresh every second never leaves vLLM's
busy-wait on its message queue (1 s after each read), so an idle server there holds a
core, and this server's two workers, bound one per core, started in 5+ minutes beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.prometheus_helpers import Prometheus, require_prometheus
from tests.server_helpers import Server
from tests.test_metrics import MODEL, Snapshot, Stack, q
from vllm_steer import SteeringVector

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def tp_stack(default_model_dir, tmp_path_factory) -> Iterator[Stack]:
    """A second server: a tiny random llama (the metrics do not depend on trained weights)
    with ``--tensor-parallel-size 2``, and its own Prometheus."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    require_prometheus()
    root = tmp_path_factory.mktemp("metrics-tp")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      vocab_size=len(tok), max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "vectors").mkdir()
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        SteeringVector({i: torch.randn(256, generator=g) for i in range(4)}).save(
            root / "vectors" / f"{name}.safetensors")
    (root / "registry.yaml").write_text(
        "vectors: {a: vectors/a.safetensors, b: vectors/b.safetensors}\n")
    srv = Server(str(root / "model"), root / "registry.yaml", root / "server.log", None,
                 extra_env={"VLLMSTEER_METRICS_INTERVAL_S": "1",
                            "VLLMSTEER_HOME": str(root / "home"),
                            # one core per worker (vLLM's CPU workers bind to NUMA nodes)
                            "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                 extra_args=("--tensor-parallel-size", "2", "--served-model-name", MODEL,
                             "--max-model-len", "1024"),
                 start_timeout_s=900)   # two workers on busy cores start slowly
    srv.start()
    try:
        with Prometheus(root / "prometheus", [f"127.0.0.1:{srv.port}"]) as prom:
            yield Stack(srv, prom, root)
    finally:
        srv.stop()


def test_tensor_parallel_ranks_report_the_same_slots_and_requests_count_once(tp_stack):
    stack = tp_stack
    snap = Snapshot(stack, {"add": q("vllm_steer:requests_by_kind_total", kind="add"),
                            "steered": q("vllm_steer:requests_total", steering="steered")})
    stop = threading.Event()
    started = threading.Barrier(4, timeout=600)

    def stream(name: str) -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "steering": {"vectors": [{"name": name}]}}
        with httpx.Client(timeout=600) as c, \
                c.stream("POST", f"{stack.url}/v1/completions", json=body) as r:
            first = True
            for _ in r.iter_lines():
                if first:
                    started.wait()
                    first = False
                if stop.is_set():
                    break

    threads = [threading.Thread(target=stream, args=(n,), daemon=True) for n in "aab"]
    for t in threads:
        t.start()
    try:
        started.wait()
        t0 = time.time()
        got: dict[str, Any] = {}
        while time.time() - t0 < 60:
            t = stack.prom.scraped_after(time.time())
            got = {r["metric"]["rank"]: float(r["value"][1])
                   for r in stack.prom.query("vllm_steer:vectors_resident", at=t)}
            if got == {"0": 2.0, "1": 2.0}:
                break
        assert got == {"0": 2.0, "1": 2.0}   # two programs on each of the two ranks
        assert len(stack.prom.query("vllm_steer:slots")) == 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    d = snap.delta()
    assert (d["add"], d["steered"]) == (3, 3), d   # once per request, not per rank

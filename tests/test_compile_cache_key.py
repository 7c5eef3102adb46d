"""The serving hook is part of vLLM's compile-cache key: an engine compiled without the
plugin must not leave a cached graph that a steered engine then loads (it would run
unsteered, silently).

A tiny random-weight llama (the key does not depend on the weights; compiling the
default model twice would cost minutes): first an engine with the plugin disabled compiles
it into a fresh cache root, then a steered engine compiles the same model with the same
cache root and vLLM settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.arch_check import write_vectors
from tests.steer_helpers import env_registry
from tests.vllm_cache import fresh_cache_root
from vllm_steer.fixtures.engines import inproc_engine, make_test_llm, shutdown
from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS, build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.slow]

_NO_PLUGIN_RUN = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], dtype="float32", gpu_memory_utilization=0.5, seed=0,
                  block_size=32, max_num_batched_tokens=256, max_model_len=512)
        out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
""")


def _gen(llm, ids: list[int], spec) -> list[int]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                            extra_args={"steering": spec} if spec else None)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def test_compile_cache_key_includes_the_hook(default_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    model_dir = build_tiny_model("llama", default_model_dir)
    prompt = AutoTokenizer.from_pretrained(model_dir).encode("The capital of France is",
                                                             add_special_tokens=False)
    cache = fresh_cache_root(tmp_path / "vllm_cache")   # no compiled graph in it
    script = tmp_path / "no_plugin.py"
    script.write_text(_NO_PLUGIN_RUN)
    # Only VLLMSTEER_DISABLE (not a vLLM variable, so not in vLLM's cache key) differs
    # between the two engines; everything vLLM hashes is the same.
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache), "VLLMSTEER_DISABLE": "1"}
    res = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(prompt)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    plain_line = next(line for line in res.stdout.splitlines() if line.startswith("TOKENS"))
    aot = cache / "torch_compile_cache" / "torch_aot_compile"
    assert len([p for p in aot.iterdir() if p.is_dir()]) == 1
    # the steered engine: its own process (vLLM reads VLLM_CACHE_ROOT there, fresh)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(cache))
    env_registry(write_vectors(tmp_path, HIDDEN, LAYERS))
    with inproc_engine(False):
        llm = make_test_llm(str(model_dir), enforce_eager=False, max_model_len=512)
    try:
        steered = _gen(llm, prompt, {"vectors": [{"name": "a", "scale": 1.0}]})
        plain = _gen(llm, prompt, None)
    finally:
        shutdown(llm)
    # the two engines compiled under different keys (with the same key the steered engine
    # would have loaded the plugin-less graph)
    dirs = [p for p in aot.iterdir() if p.is_dir()]
    assert len(dirs) == 2, dirs
    # the steered engine steers; unsteered, it equals the plugin-less engine
    assert f"TOKENS {plain}".replace(" ", "") == plain_line.replace(" ", "")
    assert steered != plain

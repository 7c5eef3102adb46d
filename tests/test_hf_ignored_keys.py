"""The flag for config keys vLLM reads but the HF class ignores (vllm_steer/hf_ignored_keys.py,
``vllm-steer doctor --model``). No engine: configs only. The engine-side proof that such a key
makes vLLM differ is the matrix's ``gpt_neox_kv_heads`` (tests/test_architectures.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import GPTNeoXConfig, LlamaConfig

from vllm_steer.fixtures.tiny_models import ARCHS, VLLM_DIFFERS
from vllm_steer.hf_ignored_keys import ignored_config_keys


def neox(**extra) -> dict:
    return GPTNeoXConfig(hidden_size=128, num_attention_heads=2, rotary_pct=0.25,
                         **extra).to_dict()


def test_fires_for_gpt_neox_with_fewer_kv_heads_than_heads():
    (flag,) = ignored_config_keys(neox(num_key_value_heads=1))
    assert (flag.model_type, flag.key, flag.value, flag.hf_value) == (
        "gpt_neox", "num_key_value_heads", 1, 2)
    assert "num_key_value_heads=1" in str(flag) and "ignores it" in str(flag)


def test_quiet_without_the_key_or_when_it_agrees_with_hf():
    assert ignored_config_keys(neox()) == []
    assert ignored_config_keys(neox(num_key_value_heads=2)) == []   # what HF does anyway


def test_quiet_where_the_hf_class_reads_the_key():
    # Llama declares num_key_value_heads: grouped-query attention in HF and vLLM alike
    llama = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    assert ignored_config_keys(llama.to_dict()) == []
    # GPT-NeoX's modeling code reads head_dim (for its rotary dimensions)
    assert ignored_config_keys(neox(head_dim=32)) == []


def test_model_directory_and_every_matrix_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(neox(num_key_value_heads=1)))
    assert [f.key for f in ignored_config_keys(tmp_path)] == ["num_key_value_heads"]
    for arch in [*ARCHS.values(), *VLLM_DIFFERS.values()]:
        flags = [f.key for f in ignored_config_keys(arch.make(1000, 1, 2).to_dict())]
        assert flags == list(arch.ignored_keys), (arch.name, flags)


@pytest.mark.parametrize("kv,status", [(1, 1), (None, 0)])
def test_doctor_model_flags_it(tmp_path, kv, status):
    cfg = neox(num_key_value_heads=kv) if kv else neox()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "vllm_steer.cli", "doctor", "--model",
                        str(tmp_path), "--json"], capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout)
    assert [f["key"] for f in out["model"]["ignored_keys"]] == (
        ["num_key_value_heads"] if kv else [])
    assert r.returncode == status, r.stdout[-2000:] + r.stderr[-2000:]

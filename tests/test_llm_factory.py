"""``make_llm``'s choices without starting an engine: the dtype and the registry."""

from __future__ import annotations

import json

import pytest

from vllm_steer import envvars, locations
from vllm_steer.llm_factory import checkpoint_dtype, make_llm


@pytest.fixture()
def fake_llm(monkeypatch):
    """Records what ``vllm.LLM`` would be built with (the choice is what is under test)."""
    import vllm

    seen: dict = {}
    monkeypatch.setattr(vllm, "LLM", lambda **kw: seen.update(kw) or seen)
    monkeypatch.setenv(envvars.REGISTRY, "")  # unset for envvars; restored afterwards
    monkeypatch.delenv(envvars.legacy_name(envvars.REGISTRY), raising=False)
    return seen


def test_the_checkpoints_dtype_not_vllms_silent_downcast(fake_llm, default_model_dir):
    """vLLM's `auto` runs a float32 checkpoint in bfloat16 on the CPU; the default model's
    vectors were trained in float32, as are the tests, so make_llm asks for float32."""
    assert checkpoint_dtype(default_model_dir) == "float32"
    make_llm(default_model_dir)
    assert fake_llm["dtype"] == "float32" and fake_llm["model"] == default_model_dir
    make_llm(default_model_dir, dtype="bfloat16")
    assert fake_llm["dtype"] == "bfloat16"


def test_checkpoint_dtype_names(tmp_path):
    for raw, want in (("bfloat16", "bfloat16"), ("torch.float16", "float16"),
                      ("float32", "float32"), ("int8", None)):
        (tmp_path / "config.json").write_text(json.dumps({"dtype": raw}))
        assert checkpoint_dtype(tmp_path) == want, raw
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_dtype(tmp_path) is None
    assert checkpoint_dtype(tmp_path / "missing") is None


def test_the_shipped_registry_unless_told_otherwise(fake_llm, default_model_dir, tmp_path):
    import os

    make_llm(default_model_dir)
    assert os.environ[envvars.REGISTRY] == str(locations.shipped_registry())
    make_llm(default_model_dir, registry=tmp_path / "r.yaml")
    assert os.environ[envvars.REGISTRY] == str(tmp_path / "r.yaml")

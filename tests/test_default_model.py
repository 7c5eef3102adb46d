"""Model resolution, the converted default model, and the supported-vLLM check."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from vllm_steer import compat
from vllm_steer import default_model as models
from vllm_steer.default_model import ModelNotFoundError, is_complete, resolve_model
from vllm_steer.selfcheck import gate

# -- resolve_model ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.2-1B-Instruct", "gpt2", "Qwen/Qwen3-0.6B"])
def test_resolve_model_refuses_hub_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    with pytest.raises(ModelNotFoundError, match="never downloads") as ei:
        resolve_model(name)
    msg = str(ei.value)
    assert repr(name) in msg and "not a local directory" in msg and "'default'" in msg


def test_resolve_model_accepts_local_dir(tmp_path, monkeypatch):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve_model(d) == str(d.resolve())
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == str(d.resolve())  # relative paths too


def test_resolve_model_refuses_dir_without_config(tmp_path):
    d = tmp_path / "not-a-model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(d))


def test_resolve_model_refuses_a_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="not a local directory"):
        resolve_model(str(f))


@pytest.mark.parametrize("alias", [None, "default", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_resolve_model_default_aliases(alias, default_model_dir):
    assert resolve_model(alias) == default_model_dir


def test_prepare_default_model_returns_what_vllm_accepts(default_model_dir):
    """Users pass it straight on: vLLM's model config refuses a Path (pydantic
    string_type; ``vllm.LLM`` fails with "'PosixPath' object has no attribute 'lower'")."""
    from vllm.engine.arg_utils import EngineArgs

    path = models.prepare_default_model()
    assert isinstance(path, str) and path == default_model_dir
    cfg = EngineArgs(model=path).create_model_config()
    assert cfg.model == path


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.default_model_dir() == tmp_path / "c" / "models" / models.DEFAULT_MODEL_NAME
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "vllm-steer"


# -- completion marker --------------------------------------------------------------------


def write_marked_dir(d: Path, files: dict[str, bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    recs = {
        name: {"size": (d / name).stat().st_size,
               "sha256": hashlib.sha256((d / name).read_bytes()).hexdigest()}
        for name in files
    }
    (d / models.MARKER).write_text(json.dumps({"conversion": models.CONVERSION_VERSION,
                                               "source": "test", "files": recs}))
    return d


@pytest.fixture
def marked_dir(tmp_path) -> Path:
    return write_marked_dir(
        tmp_path / "m",
        {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 64},
    )


def test_is_complete_on_good_dir(marked_dir):
    assert is_complete(marked_dir)
    assert is_complete(marked_dir, verify=True)
    assert is_complete(str(marked_dir), verify=True)  # str accepted too


def test_is_complete_false_for_an_older_conversion(marked_dir):
    marker = marked_dir / models.MARKER
    info = json.loads(marker.read_text())
    del info["conversion"]   # written before CONVERSION_VERSION existed
    marker.write_text(json.dumps(info))
    assert not is_complete(marked_dir)


def test_is_complete_false_without_marker(marked_dir):
    (marked_dir / models.MARKER).unlink()
    assert not is_complete(marked_dir)


def test_is_complete_false_for_missing_dir(tmp_path):
    assert not is_complete(tmp_path / "nothing-here")


def test_is_complete_false_for_half_written_file(marked_dir):
    p = marked_dir / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])  # size mismatch
    assert not is_complete(marked_dir)
    assert not is_complete(marked_dir, verify=True)


def test_is_complete_false_for_missing_file(marked_dir):
    (marked_dir / "model.safetensors").unlink()
    assert not is_complete(marked_dir)


def test_is_complete_verify_catches_same_size_corruption(marked_dir):
    p = marked_dir / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[1000] ^= 0xFF
    p.write_bytes(bytes(data))
    assert is_complete(marked_dir)  # sizes still match
    assert not is_complete(marked_dir, verify=True)


@pytest.mark.parametrize(
    "marker", ["", "{not json", "[]", '{"files": []}', '{"files": {}}', '{"nofiles": 1}',
               '{"files": {"config.json": {"size": 23}}}']
)
def test_is_complete_false_for_bad_marker(marked_dir, marker):
    (marked_dir / models.MARKER).write_text(marker)
    assert not is_complete(marked_dir, verify=True)


def test_real_cached_model_is_complete(default_model_dir):
    d = Path(default_model_dir)
    assert is_complete(d, verify=True)
    info = json.loads((d / models.MARKER).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["files"])
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (30, 576)


def test_corrupted_copy_of_real_model(default_model_dir, tmp_path):
    """Small files copied, the 538 MB weights replaced by a sparse file of the same size."""
    src = Path(default_model_dir)
    dst = tmp_path / "copy"
    dst.mkdir()
    info = json.loads((src / models.MARKER).read_text())
    for name in info["files"]:
        if name == "model.safetensors":
            with open(dst / name, "wb") as f:
                f.truncate((src / name).stat().st_size)
        else:
            shutil.copy(src / name, dst / name)
    shutil.copy(src / models.MARKER, dst / models.MARKER)
    assert is_complete(dst)  # every size matches
    assert not is_complete(dst, verify=True)  # but the weights are zeros
    (dst / "tokenizer.json").unlink()
    assert not is_complete(dst)


# -- compat -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.32.1.dev3+gabc"])
def test_check_vllm_version_supported(version):
    assert gate.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.0", "0.31.9", "0.9.2", "0.31.0+cpu"])
def test_check_vllm_version_older_is_refused(version):
    with pytest.raises(compat.UnsupportedVLLMError, match=r"accepts vLLM .*0\.32\.0") as ei:
        gate.check_vllm_version(version)
    assert compat.TESTED_RANGE in str(ei.value) and version in str(ei.value)
    assert "older than 0.32.0" in str(ei.value)


def test_check_vllm_version_unparsable():
    with pytest.raises(compat.UnsupportedVLLMError, match="unparsable version 'banana'"):
        gate.check_vllm_version("banana")


def test_installed_vllm_is_supported():
    version = gate.check_vllm_version()
    assert version.startswith("0.32.")


# -- transformers vs vLLM on the converted model ------------------------------------------

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):\n",
    "<|im_start|>user\nWrite a story about a robot who paints.<|im_end|>\n<|im_start|>assistant\n",
]
MAX_NEW = 32


@pytest.fixture(scope="module")
def vllm_engine(default_engine):
    """The session's default-model engine (tests/conftest.py: eager, float32, seed 0)."""
    llm, _ = default_engine
    return llm


@pytest.fixture(scope="module")
def hf_greedy(default_model_dir):
    """HF transformers greedy continuations: prompt ids and new ids, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)
            out.append((ids[0].tolist(), gen[0, ids.shape[1]:].tolist()))
    del model
    gc.collect()
    return out


@pytest.mark.engine
def test_vllm_and_transformers_greedy_match(vllm_engine, hf_greedy):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, seed=0)
    outputs = vllm_engine.generate(PROMPTS, params, use_tqdm=False)
    assert len(outputs) == len(PROMPTS)
    for prompt, out, (hf_prompt_ids, hf_new) in zip(PROMPTS, outputs, hf_greedy, strict=True):
        assert list(out.prompt_token_ids) == hf_prompt_ids, prompt
        got = list(out.outputs[0].token_ids)
        assert len(hf_new) >= 8, f"HF stopped early on {prompt!r}: {hf_new}"
        assert got == hf_new, f"{prompt!r}:\n vLLM {got}\n HF   {hf_new}"

"""Hidden-state capture and extraction on a real vLLM engine (eager) with the real default
model: the session's default-model engine (tests/conftest.py). Reference: HF transformers
on the same weights with forward hooks (tests/capture_check.py) and the HF extraction
path.
"""

from __future__ import annotations

import pytest
import torch

from tests.capture_check import (
    CaptureCase,
    check_capture_cases,
    check_chunked_and_cached,
    run_capture_cases,
)
from tests.steer_helpers import composed_dense
from vllm_steer.fixtures.engines import TEST_ENGINE_OPTIONS

pytestmark = pytest.mark.engine
LAYERS = 30


@pytest.fixture(scope="module")
def setup(default_engine):
    """The session's default-model engine (tests/conftest.py, ``TEST_ENGINE_OPTIONS``)."""
    return default_engine


@pytest.fixture(scope="module")
def hf(default_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def test_capture_modes_match_hf_in_a_mixed_batch(setup, hf):
    llm, reg = setup
    model, tok = hf
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    p0, p1 = enc("The capital of France is Paris, and"), enc("Write a short poem about the sea.\n")
    cases = [
        CaptureCase(p0, {"layers": "all", "at": "tokens"}),
        CaptureCase(p1, None, [("v1", 1.5)]),
        CaptureCase(p1, {"layers": [3, 17, 29], "at": "mean", "start": 2}, [("v1", 1.5)]),
        CaptureCase(p0, None),
        CaptureCase(p0, {"layers": [10], "at": "positions", "positions": [0, 4, -1]},
                    [("v1", -1.0), ("v3", 2.0)]),
        CaptureCase(p1, {"layers": [0, 29], "at": "last"}),
    ]
    err = check_capture_cases(llm, model, cases,
                              lambda steer: composed_dense(reg, steer, LAYERS, 576), "mixed")
    print(f"capture max relative error {err:.2e}")
    # the captured stream of a steered request is the steered one (differs from unsteered)
    _, recs = run_capture_cases(llm, [CaptureCase(p1, {"layers": [29], "at": "last"}),
                                      CaptureCase(p1, {"layers": [29], "at": "last"},
                                                  [("v1", 1.5)])], "steered-differs")
    assert abs(recs[0]["values"] - recs[1]["values"]).max() > 0.1


def test_capture_with_chunked_prefill_and_a_cached_prefix(setup, hf):
    llm, _ = setup
    model, tok = hf
    seen = check_chunked_and_cached(llm, model, tok, "eager",
                                    budget=TEST_ENGINE_OPTIONS["max_num_batched_tokens"],
                                    block=TEST_ENGINE_OPTIONS["block_size"], num_layers=LAYERS)
    print(seen)


@pytest.mark.parametrize("capture, field, message", [
    ({"layers": [30]}, "capture.layers", "out of range"),
    ({"at": "tokens", "end": 99}, "capture.end", "past the prompt"),
    ({"at": "sometimes"}, "capture.at", "not one of"),
    ({"at": "tokens"}, "capture", "capture_max_bytes"),
])
def test_bad_capture_is_refused_and_engine_keeps_serving(setup, hf, capture, field, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm, _ = setup
    _, tok = hf
    ids = tok.encode("Hello there", add_special_tokens=False)
    if field == "capture":   # a capture over the per-request limit (64 MiB): a long prompt
        ids = ids * 520      # 1040 positions x 30 layers x 576 floats x 4 bytes = 72 MB
    with pytest.raises(VLLMValidationError, match=message) as e:
        llm.generate([{"prompt_token_ids": ids}],
                     SamplingParams(max_tokens=1, extra_args={"capture": {"id": "x", **capture}}),
                     use_tqdm=False)
    assert e.value.parameter == field
    with pytest.raises(VLLMValidationError) as e:
        llm.generate([{"prompt_token_ids": ids[:2]}],
                     SamplingParams(max_tokens=1, extra_args={"_vllm_steer_capture": {}}),
                     use_tqdm=False)
    assert e.value.parameter == "_vllm_steer_capture"
    out = llm.generate([{"prompt_token_ids": ids[:2]}], SamplingParams(max_tokens=2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def _cosines(a, b) -> dict[int, float]:
    return {layer: float(torch.nn.functional.cosine_similarity(
        a.directions[layer], b.directions[layer], dim=0)) for layer in a.directions}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["happy", "cautious_thinking"])
def test_engine_extraction_equals_hf_extraction(setup, hf, name):
    """Every method, every layer: cosine >= 0.9999 between the vector trained through the
    engine's capture and the one trained with HF hooks (hidden states read once per path
    and dataset; the methods run on both)."""
    from vllm_steer.extract import build_dataset, load_config
    from vllm_steer.extract.engine_hidden import read_last_token_engine
    from vllm_steer.extract.hidden import read_last_token
    from vllm_steer.extract.train import (
        extract_from_config,
        fit_vector,
        hf_model_info,
        prepare,
        resolve_layers,
    )
    from vllm_steer.locations import find_config

    llm, _ = setup
    model, tok = hf
    cfg = load_config(find_config(f"configs/vectors/{name}.yaml"))
    ds = build_dataset(cfg, tok)
    _, prompts = prepare(ds, cfg.method, cfg.normalize)
    layers = resolve_layers(cfg.layers, LAYERS)
    h_hf = read_last_token(model, tok, prompts, layers, add_special_tokens=ds.add_special_tokens,
                           progress=False)
    h_en = read_last_token_engine(llm, tok, prompts, layers,
                                  add_special_tokens=ds.add_special_tokens, progress=False)
    info = hf_model_info(model)
    worst = {}
    for method in ("pca_center", "pca_diff", "mean_diff"):
        a = fit_vector(ds, h_hf, layers, info, method=method, normalize="unit")
        b = fit_vector(ds, h_en, layers, info, method=method, normalize="unit")
        worst[method] = min(_cosines(a, b).values())
    if name == "cautious_thinking":   # the smaller set: the whole API path once
        # config -> engine -> vector gives the config's method's vector
        res = extract_from_config(cfg, model=llm, tokenizer=tok, engine="vllm", progress=False)
        ref = fit_vector(ds, h_hf, layers, info, method=cfg.method, normalize=cfg.normalize)
        worst["extract_from_config"] = min(_cosines(res.vector, ref).values())
        assert res.vector.metadata.extra["dtype"] == "float32"
    print(name, worst)
    assert all(c >= 0.9999 for c in worst.values()), worst


def test_ablation_command_writes_its_table_plot_and_json(setup, tmp_path):
    """The reasoning-data ablation end to end on a tiny run (one question, a few openers,
    short trajectories) through the CLI entry, on this module's engine."""
    import argparse
    import json

    from vllm_steer.experiments.cli import run_ablate

    llm, reg = setup
    out = tmp_path / "ablation"
    # the engine's registry allows reg.parent/vectors: the vectors go there
    (out / "vectors").parent.mkdir(parents=True)
    (out / "vectors").symlink_to(reg.parent / "vectors")
    args = argparse.Namespace(config="configs/experiments/reasoning_data_ablation.yaml",
                              model=None, out=str(out), quick=True, quiet=True)
    assert run_ablate(args, llm=llm) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.png").stat().st_size > 10_000
    table = (out / "ablation.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 9  # header + 8 rows
    rows = result["rows"]
    assert sorted(r["combination"] for r in rows) == [f"{i:03b}" for i in range(8)]
    for r in rows:
        assert (reg.parent / "vectors" / r["file"]).is_file()
        assert 0.0 <= r["mean_separation"] <= 1.0 and r["num_pairs"] > 0
        for phase in ("thinking", "answer"):
            eff = r["effect"][phase]
            assert eff["readings"] > 0 and 0 <= eff["readings_kept"] <= eff["readings"]
            if eff["slope_mean"] is not None:
                assert eff["slope_min"] <= eff["slope_mean"] <= eff["slope_max"]
        assert set(r["answer_sample"]) == {"-4.0", "4.0"}
    # every factor changes the trained vector
    from vllm_steer import SteeringVector

    vec = {r["combination"]: SteeringVector.load(str(reg.parent / "vectors" / r["file"]))
           for r in rows}
    for other in ("100", "010", "001"):
        assert not vec["000"].allclose(vec[other], atol=1e-3), other
    assert result["quick"] is True and result["native_thinking"] is False

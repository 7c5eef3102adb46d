"""Slow end-to-end check on the default model (SmolLM2-135M-Instruct, CPU):
train ``happy`` from the shipped config, steer with HF forward hooks at scales -2..2, and
check that held-out mood yes/no log-odds move monotonically with the scale."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCALES = [-2.0, -1.0, 0.0, 1.0, 2.0]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from vllm_steer.extract import load_model

    return load_model(None, dtype="float32")


def test_happy_vector_moves_mood_log_odds(default_model):
    from vllm_steer.extract import extract_from_config, load_config, separation_scores
    from vllm_steer.extract.evaluate import load_questions, scale_sweep

    model, tokenizer = default_model
    cfg = load_config(REPO / "configs/vectors/happy.yaml")
    res = extract_from_config(cfg, model=model, tokenizer=tokenizer, progress=False)
    vector = res.vector
    assert vector.layers == list(range(4, 26))
    assert vector.metadata.model_name == "SmolLM2-135M-Instruct"
    scores = separation_scores(vector)
    assert min(scores.values()) > 0.9, scores

    qs = load_questions(REPO / "configs/questions/mood_yes_no.yaml")
    sweep = scale_sweep(model, tokenizer, qs, vector, SCALES)
    print(f"\nextract {res.seconds_extract:.1f}s for {res.num_pairs} pairs; sweep {sweep}")
    signed = sweep["mean_signed_log_odds"]
    # Happier with a positive scale: the persona-consistent answer gains probability ...
    assert sweep["r_signed"] >= 0.99, sweep
    assert all(a < b for a, b in zip(signed, signed[1:], strict=False)), sweep
    # ... and the raw mean log P(Yes) - log P(No) moves monotonically too.
    assert abs(sweep["r_raw"]) >= 0.9, sweep

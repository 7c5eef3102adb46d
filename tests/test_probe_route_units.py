"""The probe route's body validation (no server): every bad field is named."""

from __future__ import annotations

import json

import pytest

from vllm_steer.server.common import SteerHTTPError
from vllm_steer.server.probe import parse_probe_body


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_n_way_multi_token_body_builds_a_job(tok):
    job = parse_probe_body(json.dumps({
        "prompt": "Speed?", "choices": ["20", "30", "40", "50"], "trajectory": False,
        "steering": json.dumps({"vectors": [{"name": "happy"}]}), "steer_suffix": False,
    }).encode(), tok, 2048)
    assert job.choices.choices == ("20", "30", "40", "50") and not job.generate
    assert job.choices.multi_token == (True,) * 4 and not job.cfg.steer_suffix
    assert job.trajs[0].steering == {"vectors": [{"name": "happy"}], "apply_to": "all"}


def test_good_body_builds_a_job(tok):
    job = parse_probe_body(json.dumps({
        "prompt": "Is 17 prime?", "open_thinking": "<think>\n", "every": 8, "max_tokens": 32,
        "steering": {"vectors": [{"name": "happy", "scale": 2}], "apply_to": "thinking"},
    }).encode(), tok, 2048)
    (traj,) = job.trajs
    assert traj.prompt_ids[-3:] == tok.encode("<think>\n", add_special_tokens=False)[-3:]
    assert job.cfg.every == 8 and job.generate
    assert job.choices.choices == ("Yes", "No")


@pytest.mark.parametrize("body, field", [
    (b"{nope", "body"),
    (b"[1, 2]", "body"),
    ({"prompt": "x", "colour": 1}, "colour"),
    ({}, "prompt"),
    ({"prompt": "x", "messages": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt_token_ids": [1, -5]}, "prompt_token_ids"),
    ({"prompt_token_ids": [10 ** 9]}, "prompt_token_ids"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"prompt": "x", "every": 0}, "every"),
    ({"prompt": "x", "every": "16"}, "every"),
    ({"prompt": "x", "every": True}, "every"),
    ({"prompt": "x", "choices": []}, "choices"),
    ({"prompt": "x", "choices": "Yes"}, "choices"),
    ({"prompt": "x", "suffix": ""}, "suffix"),
    ({"prompt": "x", "min_mass": float("nan")}, "min_mass"),
    ({"prompt": "x", "max_tokens": 5000}, "prompts"),
    ({"prompt": "x", "steering": {"vectors": []}}, "steering.vectors"),
    ({"prompt": "x", "steering": {"vectors": [{"name": "a", "scale": "big"}]}},
     "steering.vectors[0].scale"),
    ({"prompt": "x", "trajectory": False, "every": 4}, "every"),
    ({"prompt": "x", "trajectory": False, "max_tokens": 4}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "chat": True}, "chat"),
    ({"messages": [{"role": "user", "content": "x"}], "system": "s"}, "system"),
    ({"prompt": "x", "chat": False, "system": "s"}, "system"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages"),
    ({"prompt": "x", "steer_suffix": "no"}, "steer_suffix"),
    ({"prompt": "x", "choices": ["20", "200"]}, "choices"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "open_thinking": 5}, "open_thinking"),
])
def test_bad_bodies_name_the_field(tok, body, field):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(SteerHTTPError) as ei:
        parse_probe_body(raw, tok, 2048)
    assert ei.value.status == 400
    assert ei.value.param == field, ei.value.message


def test_messages_body_builds_a_job(tok):
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Is 17 prime?"}]
    job = parse_probe_body(json.dumps({"messages": msgs}).encode(), tok, 2048)
    (traj,) = job.trajs
    assert all(isinstance(i, int) for i in traj.prompt_ids)
    assert tok.decode(traj.prompt_ids).endswith("assistant\n")


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "trajectory": "no"}, "trajectory"),
    ({"prompt": "x", "chat": "no"}, "chat"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "steering": "not json"}, "steering"),
    ({"prompt": "x", "system": 5}, "system"),
    ({"prompt": "x", "top_k_flagged": -1}, "top_k_flagged"),
])
def test_issue11_bad_fields_are_named(tok, body, field):
    with pytest.raises(SteerHTTPError) as ei:
        parse_probe_body(json.dumps(body).encode(), tok, 2048)
    assert ei.value.status == 400
    assert ei.value.param == field, ei.value.message

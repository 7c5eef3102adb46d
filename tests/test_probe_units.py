"""Probe building blocks without an engine: choices, readings, fork plans, replay specs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_steer import SteeringVector
from vllm_steer.probe import ChoiceSet, ProbeConfig, ProbeError, ProbeJob, replay_spec
from vllm_steer.probe.reading import make_reading
from vllm_steer.probe.run import pearson
from vllm_steer.steering.registry import Registry
from vllm_steer.steering.resolve import Resolver
from vllm_steer.steering.spec import parse_spec


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_choice_variants_come_from_the_tokenizer(tok):
    cs = ChoiceSet.build(tok, ["Yes", "No"])
    yes = {tok.decode([i]) for i in cs.variants[0]}
    assert {"Yes", " Yes", "yes", " yes"} <= yes
    assert all(s.strip(" \n\"'").lower() == "yes" for s in yes)
    assert not set(cs.variants[0]) & set(cs.variants[1])
    assert len(cs.all_ids) <= 128


@pytest.mark.parametrize("choices, message", [
    ([], "at least one"),
    (["Yes", "yes"], "repeat"),
    (["Yes", "Supercalifragilistic"], "'Supercalifragilistic'"),
    (["  "], "empty"),
])
def test_bad_choices(tok, choices, message):
    with pytest.raises(ProbeError, match=message):
        ChoiceSet.build(tok, choices)


def test_reading_math():
    cs = ChoiceSet(("Yes", "No"), ((1, 2), (3,)))
    r = make_reading(cs, {1: math.log(0.2), 2: math.log(0.1), 3: math.log(0.1)},
                     token_index=5, in_thinking=True)
    assert r.logprobs["Yes"] == pytest.approx(math.log(0.3))
    assert r.log_ratio == pytest.approx(math.log(3.0))
    assert r.mass == pytest.approx(0.4) and not r.low_mass
    assert r.normalized["Yes"] == pytest.approx(math.log(0.75))
    low = make_reading(cs, {1: -20.0, 2: -20.0, 3: -21.0}, token_index=0, in_thinking=False)
    assert low.low_mass and low.log_ratio == pytest.approx(math.log(2 * math.exp(1)), rel=1e-6)
    dead = make_reading(cs, {1: -math.inf, 2: -math.inf, 3: -math.inf}, token_index=0,
                        in_thinking=False)
    assert dead.log_ratio is None and dead.mass == 0.0 and dead.low_mass
    assert dead.to_json()["logprobs"] == {"Yes": None, "No": None}
    three = make_reading(ChoiceSet(("A", "B", "C"), ((1,), (2,), (3,))),
                         {1: -1.0, 2: -2.0, 3: -3.0}, token_index=0, in_thinking=False)
    assert three.log_ratio is None
    assert sum(math.exp(v) for v in three.normalized.values()) == pytest.approx(1.0)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1], [1, 2]) is None


def test_replay_spec_shares_the_trajectory_cache_salt(tmp_path):
    SteeringVector({0: torch.ones(4)}).save(tmp_path / "a.safetensors")
    (tmp_path / "r.yaml").write_text("vectors: {a: a.safetensors}\n")
    res = Resolver(Registry.from_yaml(tmp_path / "r.yaml"), num_layers=2, hidden_size=4)
    for mode in ("generated", "prompt", "all"):
        spec = {"vectors": [{"name": "a", "scale": 2}], "apply_to": mode}
        traj = res.resolve(parse_spec(spec), prompt_len=10)
        fork = res.resolve(parse_spec(replay_spec(spec, 10)), prompt_len=37)
        assert traj.cache_salt == fork.cache_salt, mode
    assert replay_spec(None, 3) is None


class _Out(SimpleNamespace):
    pass


def test_fork_plan_closes_thinking_and_appends_suffix(tok):
    cfg = ProbeConfig(every=4, suffix=" Final answer:")
    te = tok.encode("</think>", add_special_tokens=False)
    prompt = tok.encode("Q?", add_special_tokens=False) + tok.encode("<think>",
                                                                     add_special_tokens=False)
    gen = tok.encode(" a b c", add_special_tokens=False) + te + tok.encode(" ok",
                                                                          add_special_tokens=False)
    job = ProbeJob(tok, [prompt], [None], cfg)
    job.take_trajectories([_Out(outputs=[_Out(token_ids=gen)])])
    reqs = job.fork_requests()
    suffix = tok.encode(" Final answer:", add_special_tokens=False)
    points = [f.token_index for f in job.forks]
    assert points == sorted(set(range(0, len(gen) + 1, 4)) | {len(gen)})
    for fork, (p, sp) in zip(job.forks, reqs, strict=True):
        base = prompt + gen[: fork.token_index]
        expect = base + (te if fork.in_thinking else []) + suffix
        assert p["prompt_token_ids"] == expect
        assert sp.max_tokens == 1 and sp.logprob_token_ids == job.choices.all_ids
    assert [f.in_thinking for f in job.forks] == [f.token_index < len(gen) - 1
                                                  for f in job.forks]
    assert job.trajs[0].think_end_index == len(gen) - 1


@pytest.mark.parametrize("kw, field", [
    ({"every": 0}, "every"), ({"every": -3}, "every"), ({"suffix": ""}, "suffix"),
    ({"choices": []}, "choices"),
])
def test_bad_probe_config(tok, kw, field):
    with pytest.raises(ProbeError) as ei:
        ProbeJob(tok, [[1, 2]], [None], ProbeConfig(**kw))
    assert ei.value.field == field


def test_null_suffix_only_for_one_shot_readings(tok):
    job = ProbeJob(tok, [[1, 2, 3]], [None], ProbeConfig(suffix=None), generate=False)
    job.fork_requests()
    assert job.forks[0].ids == [1, 2, 3]
    with pytest.raises(ProbeError, match="forcing suffix"):
        ProbeJob(tok, [[1, 2, 3]], [None], ProbeConfig(suffix=None))


def test_prompt_longer_than_context_is_refused(tok):
    with pytest.raises(ProbeError, match="context"):
        ProbeJob(tok, [[1] * 100], [None], ProbeConfig(max_tokens=50), max_model_len=120)


def test_bad_steering_in_probe_names_the_field(tok):
    with pytest.raises(ProbeError) as ei:
        ProbeJob(tok, [[1]], [{"vectors": [{"name": "a"}], "apply_to": "nope"}], ProbeConfig())
    assert ei.value.field == "steering[0].steering.apply_to"

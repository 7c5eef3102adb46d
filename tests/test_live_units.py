"""Live-probe building blocks without an engine: the ``probe`` field's validation, fork
points decided as a sequence grows (equal to the offline plan), delivery in token order,
and the early-exit rule."""

from __future__ import annotations

import random

import pytest

from vllm_steer.probe import ProbeError
from vllm_steer.probe.forks import fork_points
from vllm_steer.probe.live_state import LiveProbe, LiveProbeConfig, StopRule, StopWhen
from vllm_steer.probe.reading import make_reading


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("value, field", [
    ({"every": 0}, "probe.every"),
    ({"choices": []}, "probe.choices"),
    ({"min_mass": 2}, "probe.min_mass"),
    ({"max_tokens": 3}, "probe.max_tokens"),
    ({"temperature": 0.5}, "probe.temperature"),
    ({"colour": 1}, "probe.colour"),
    ({"suffix": None}, "probe.suffix"),
    ({"stop_when": 3}, "probe.stop_when"),
    ({"stop_when": {"threshold": -0.1}}, "probe.stop_when.threshold"),
    ({"stop_when": {"consecutive": 0}}, "probe.stop_when.consecutive"),
    ({"stop_when": {"choice": "Maybe"}}, "probe.stop_when.choice"),
    ({"stop_when": {"complete": "yes"}}, "probe.stop_when.complete"),
    ({"stop_when": {"min_thinking_tokens": -1}}, "probe.stop_when.min_thinking_tokens"),
    ({"stop_when": {"why": 1}}, "probe.stop_when.why"),
    ("{nope", "probe"),
    ([1], "probe"),
])
def test_bad_probe_fields_name_the_field(value, field):
    with pytest.raises(ProbeError) as ei:
        LiveProbeConfig.parse(value)
    assert ei.value.field == field


def test_probe_field_as_object_or_json_string():
    a = LiveProbeConfig.parse({"choices": ["20", "30"], "every": 4,
                               "stop_when": {"threshold": 0.8}})
    b = LiveProbeConfig.parse('{"choices": ["20", "30"], "every": 4, '
                              '"stop_when": {"threshold": 0.8}}')
    assert a == b and a.probe.every == 4 and a.stop_when.consecutive == 2
    assert LiveProbeConfig.parse({}).stop_when is None


def _random_sequences(tok, seed):
    """Token sequences that open and close a thinking section at random places, with the
    default model's 3-token ``</think>``."""
    rng = random.Random(seed)
    think_open = tok.encode("<think>", add_special_tokens=False)
    think_close = tok.encode("</think>", add_special_tokens=False)
    words = tok.encode(" the cat sat on a mat and then it rained", add_special_tokens=False)
    for _ in range(20):
        seq: list[int] = []
        if rng.random() < 0.5:
            seq += think_open
        for _ in range(rng.randint(5, 60)):
            r = rng.random()
            seq += think_close if r < 0.05 else think_open if r < 0.08 else [rng.choice(words)]
        yield seq


@pytest.mark.parametrize("every", [1, 3, 8])
def test_points_decided_live_equal_the_offline_plan(tok, every):
    """Fed token by token (or in chunks), a live sequence decides exactly the offline
    probe's fork points, each once, and each only once its marker context is known."""
    live = LiveProbe(tok, LiveProbeConfig.parse({"every": every}))
    prompt = tok.encode("Question:", add_special_tokens=False)
    for i, gen in enumerate(_random_sequences(tok, every)):
        seq = live.sequence(prompt)
        got, pos, rng = [], 0, random.Random(i)
        while pos < len(gen):
            step = rng.randint(1, 4)
            runs = seq.extend(gen[pos:pos + step])
            pos += step
            for r in runs:   # decided only with the lookahead the marker rule needs
                assert r.pt.token_index <= min(pos, len(gen)) - live.lookahead
            got += [r.pt.token_index for r in runs]
        got += [r.pt.token_index for r in seq.extend([], finished=True)]
        want = fork_points(prompt + gen, len(prompt), every, (live.ts, live.te))
        assert sorted(got) == want and len(got) == len(set(got))
        for p in want:   # the fork text is the offline one
            base = seq._point(p).base
            assert base[:len(prompt) + p] == prompt + gen[:p]
            assert base[-len(live.suffix_ids):] == live.suffix_ids


def test_end_of_sequence_token_is_not_forked(tok):
    live = LiveProbe(tok, LiveProbeConfig.parse({"every": 4}))
    seq = live.sequence([1, 2, 3])
    seq.extend([10, 11, 12, 13, 14])
    runs = seq.extend([tok.eos_token_id], finished=True)
    assert seq.tokens == [10, 11, 12, 13, 14]
    assert [r.pt.token_index for r in runs] == [4, 5]


def test_readings_are_delivered_in_token_order(tok):
    live = LiveProbe(tok, LiveProbeConfig.parse({"every": 2}))
    seq = live.sequence([1, 2])
    runs = seq.extend([5, 6, 7, 8, 9, 10], finished=True)
    pts = {r.pt.token_index: r.pt for r in runs}
    assert sorted(pts) == [0, 2, 4, 6]
    assert seq.add(pts[4]) == [] and seq.add(pts[2]) == []
    assert [p.token_index for p in seq.add(pts[0])] == [0, 2, 4]
    assert [p.token_index for p in seq.add(pts[6])] == [6] and seq.complete


def _reading(p_yes: float, mass: float, t: int):
    import math

    lp = [[math.log(p_yes * mass)], [math.log((1 - p_yes) * mass)]]
    return make_reading(("Yes", "No"), lp, token_index=t, in_thinking=True)


def test_stop_rule_needs_consecutive_confident_readings_of_one_choice(tok):
    live = LiveProbe(tok, LiveProbeConfig.parse({"every": 2}))
    seq = live.sequence([1])
    seq.extend([7] * 12)
    rule = StopRule(StopWhen(threshold=0.8, consecutive=2), min_mass=0.05)
    seq_of = [(0.9, 0.5), (0.1, 0.5), (0.95, 0.5), (0.99, 0.01), (0.9, 0.5), (0.85, 0.5)]
    got = [rule.settled(seq, _reading(p, m, 2 * i)) for i, (p, m) in enumerate(seq_of)]
    # Yes, then a No lead (streak restarts), Yes, then a low-mass reading (never counts,
    # breaks the streak), then two confident Yes readings in a row
    assert got == [None, None, None, None, None, "Yes"]
    named = StopRule(StopWhen(threshold=0.8, consecutive=1, choice="No"), min_mass=0.05)
    assert named.settled(seq, _reading(0.9, 0.5, 0)) is None
    assert named.settled(seq, _reading(0.1, 0.5, 2)) == "No"


def test_stop_rule_waits_for_thinking_tokens(tok):
    live = LiveProbe(tok, LiveProbeConfig.parse({"every": 2}))
    think = tok.encode("<think>", add_special_tokens=False)
    seq = live.sequence([1] + think)
    seq.extend([7] * 10)
    rule = StopRule(StopWhen(threshold=0.5, consecutive=1, min_thinking_tokens=6),
                    min_mass=0.05)
    assert rule.settled(seq, _reading(0.9, 0.5, 4)) is None
    assert seq.thinking_tokens(6) == 6
    assert rule.settled(seq, _reading(0.9, 0.5, 6)) == "Yes"


def test_answer_tokens_close_thinking_then_suffix_then_the_choice(tok):
    live = LiveProbe(tok, LiveProbeConfig.parse({"every": 2}))
    think = tok.encode("<think>", add_special_tokens=False)
    seq = live.sequence([1] + think)
    (run,) = seq.extend([7, 7])[:1]
    pt = run.pt
    yes, no = live.choices.variants
    pt.table = {(): {v[0]: -1.0 for v in yes} | {v[0]: -2.0 for v in no}}
    pt.table[()][yes[-1][0]] = -0.5   # the likeliest Yes variant
    ans = seq.answer_tokens(pt, "Yes")
    assert ans == list(live.te) + live.suffix_ids + list(yes[-1])

"""Reasoning-step triggers and fork placement without an engine: where triggers fire on
hand-written token sequences (markers split across tokens, inside the thinking section
and after it, never in the prompt; two real tokenizers: the default model's, which
splits ``</think>`` and often ``"\\n\\n"``, and DeepSeek-R1's, with single-token
markers), that a sequence fed token by token decides exactly the finished trajectory's
points, and where aligned forks go."""

from __future__ import annotations

import random

import pytest

from vllm_steer.probe import ProbeConfig, ProbeError
from vllm_steer.probe.forks import place_point, think_states
from vllm_steer.probe.live_state import LiveProbe, LiveProbeConfig
from vllm_steer.probe.triggers import Candidate, PointPlanner, TextIndex, plan_candidates
from vllm_steer.steering.think_tracker import THINK


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def r1_tok():
    from transformers import AutoTokenizer

    from vllm_steer.fixtures.thinking_tokenizer import r1_tokenizer_dir

    return AutoTokenizer.from_pretrained(r1_tokenizer_dir())


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def build(*pieces: list[int]) -> tuple[list[int], list[int]]:
    """Concatenated token ids and the token index where each piece starts."""
    ids, starts = [], []
    for p in pieces:
        starts.append(len(ids))
        ids += p
    return ids, starts


def steps(ids, tok, **kw) -> list[tuple[int, str, str | None]]:
    kw = {"every": None, "markers": None, "min_spacing": 0, **kw}
    return [(c.index, c.kind, c.marker)
            for c in plan_candidates(ids, "steps", kw["every"], kw["markers"],
                                     kw["min_spacing"], tok)]


def test_blank_line_split_across_tokens_fires_after_it(tok):
    nl = enc(tok, "\n")
    assert nl == [198] and enc(tok, "\n\n") == [1116]   # one token or two: the same text
    for blank in ([198, 198], [1116]):
        ids, at = build(enc(tok, "Step one is done."), blank, enc(tok, "Step two"))
        assert steps(ids, tok) == [(0, "start", None), (at[2], "step", "\n\n"),
                                   (len(ids), "end", None)]


def test_a_marker_ending_inside_a_token_fires_after_that_token(tok):
    """The newline marker inside the one-token blank line: after the token, never
    before it (a fork cannot split a token)."""
    ids, at = build(enc(tok, "Odd."), [1116], enc(tok, "Prime."))
    assert steps(ids, tok, markers=["\n"]) == [(0, "start", None), (at[2], "step", "\n"),
                                               (len(ids), "end", None)]
    # and a word marker starting inside a token fires before that token
    ids, at = build(enc(tok, "Odd."), enc(tok, " Waiting"), enc(tok, " now."))
    assert steps(ids, tok, markers=["ting"]) == [(0, "start", None), (len(ids), "end", None)]
    assert steps(ids, tok, markers=["aiting"]) == [(0, "start", None), (len(ids), "end", None)]
    assert steps(ids, tok, markers=["now"]) == [(0, "start", None), (at[2], "step", "now"),
                                               (len(ids), "end", None)]   # " now": one token


def test_word_markers_fire_before_the_word_split_or_not(tok):
    assert len(enc(tok, "Hmm")) == 2    # 'H', 'mm': matched on text, not on token ids
    ids, at = build(enc(tok, "So 17 is odd."), enc(tok, " Hmm"), enc(tok, ", 17 = 1 x 17."),
                    enc(tok, " Wait"), enc(tok, ", is it?"))
    assert steps(ids, tok) == [(0, "start", None), (at[1], "step", "Hmm"),
                               (at[3], "step", "Wait"), (len(ids), "end", None)]
    # "But wait" is one marker (fires before "But"); "Waiting" and "wait" are not "Wait"
    ids, at = build(enc(tok, "It is odd."), enc(tok, " But wait"), enc(tok, ", Waiting is"),
                    enc(tok, " fine, wait."))
    assert steps(ids, tok) == [(0, "start", None), (at[1], "step", "But wait"),
                               (len(ids), "end", None)]


def test_markers_fire_inside_the_thinking_section_and_after_it_not_in_the_prompt(tok):
    prompt = enc(tok, "Question?\n\nWait, Hmm.\n<think>\n")   # markers in the prompt
    gen, at = build(enc(tok, "Odd."), [198, 198], enc(tok, "Prime."), enc(tok, "</think>"),
                    [198, 198], enc(tok, "Yes."))
    got = steps(gen, tok)
    assert got == [(0, "start", None), (at[2], "step", "\n\n"), (at[4] + 2, "step", "\n\n"),
                   (len(gen), "end", None)]
    states = think_states(prompt + gen, len(prompt), enc(tok, "<think>"), enc(tok, "</think>"))
    assert states[at[2]] == THINK and states[at[4] + 2] != THINK
    # a prompt ending with a newline and a trajectory starting with one: no blank line in
    # the generated text
    tail = enc(tok, "\nNo blank line")
    assert steps(tail, tok) == [(0, "start", None), (len(tail), "end", None)]


def test_single_token_markers_of_a_thinking_tokenizer(r1_tok):
    tok = r1_tok
    assert enc(tok, ".\n\n") == [382]   # the blank line inside a punctuation token
    think_end = enc(tok, "</think>")
    gen, at = build(enc(tok, "17 is odd"), enc(tok, ".\n\n"), enc(tok, "Wait"),
                    enc(tok, ", 17 is prime."), think_end, enc(tok, "\n\nYes"))
    assert steps(gen, tok) == [(0, "start", None), (at[2], "step", "\n\n"),
                               (at[5] + 1, "step", "\n\n"), (len(gen), "end", None)]
    # the same boundary for the blank line (after) and "Wait" (before): one candidate
    assert sum(1 for i, _, _ in steps(gen, tok) if i == at[2]) == 1


def test_min_spacing_and_the_every_fallback(tok):
    para = enc(tok, "Odd.\n\n")
    assert enc(tok, "Odd.\n\n")[-1] == 1116
    ids = para * 6 + enc(tok, " filler") * 20 + para
    n = len(ids)
    every_step = [i for i, k, _ in steps(ids, tok) if k == "step"]
    assert every_step == [len(para) * j for j in range(1, 7)] + [n]
    spaced = steps(ids, tok, min_spacing=len(para) * 2)
    assert [i for i, k, _ in spaced if k == "step"] == [len(para) * j for j in (2, 4, 6)] + [n]
    fb = steps(ids, tok, every=8)
    kinds = {i: k for i, k, _ in fb}
    last_step = len(para) * 6
    assert kinds[last_step + 8] == "every" and kinds[last_step + 16] == "every"
    assert all(b - a <= 8 for a, b in zip(sorted(kinds), sorted(kinds)[1:], strict=False))


def test_the_end_is_read_when_a_fallback_lands_on_it_and_moves_back(tok):
    """A fallback candidate exactly at the end, moved back onto a block, must not take
    the end reading's place: the end is always a candidate of its own."""
    from types import SimpleNamespace

    from vllm_steer.probe.job import ProbeJob

    prompt = list(range(300, 341))   # 41 tokens: block boundaries at 23, 55, ...
    gen = list(range(400, 464))      # 64 tokens: the fallback at 64 is the end
    job = ProbeJob(tok, [prompt], [None], ProbeConfig(every=16, max_tokens=64, align="prefix"),
                   block_size=32)
    job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(token_ids=gen)])])
    pts = [(p.token_index, p.trigger, p.trigger_index) for p in job.plan()]
    assert pts == [(0, "start", 0), (23, "every", 32), (55, "every", 64), (64, "end", 64)]
    exact = ProbeJob(tok, [prompt], [None], ProbeConfig(every=16, max_tokens=64))
    exact.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(token_ids=gen)])])
    assert [(p.token_index, p.trigger) for p in exact.plan()] == \
        [(0, "start"), (16, "every"), (32, "every"), (48, "every"), (64, "every")]


def test_every_trigger_is_the_old_plan(tok):
    ids = list(range(200, 237))
    got = plan_candidates(ids, "every", 8, None, 0)
    assert [(c.index, c.kind) for c in got] == [(0, "start"), (8, "every"), (16, "every"),
                                                (24, "every"), (32, "every"), (37, "end")]
    assert [c.index for c in plan_candidates(ids[:32], "every", 8, None, 0)] == \
        [0, 8, 16, 24, 32, 32]   # the end too (it is deduplicated where it is placed)


def test_text_index_offsets_survive_characters_split_across_tokens(tok, r1_tok):
    for t in (tok, r1_tok):
        text = "Hé 🧠 ok\n\nWait"
        ids = enc(t, text)
        ti = TextIndex(t)
        for i in ids:
            ti.extend([i])
            assert ti.offsets == sorted(ti.offsets) and ti.text == text[:len(ti.text)]
        ti.extend([], final=True)
        assert ti.text == text and ti.stable == len(ids) and ti.offsets[-1] == len(text)


def _random_generation(tok, rng: random.Random) -> list[int]:
    words = [" the", " cat", " sat", ".", "\n", "\n\n", " Wait", " Hmm", ",", " But", " wait",
             "Alternatively", " é", "🧠", "</think>", "<think>", " 17"]
    out: list[int] = []
    for _ in range(rng.randint(3, 50)):
        out += enc(tok, rng.choice(words))
    return out


@pytest.mark.parametrize("which", ["default", "r1"])
@pytest.mark.parametrize("cfg", [
    {"trigger": "steps"},
    {"trigger": "steps", "every": 5, "min_spacing": 2},
    {"trigger": "steps", "markers": ["\n", "sat"], "every": 9},
    {"trigger": "steps", "align": "prefix"},
    {"trigger": "every", "every": 3, "align": "block"},
    {"trigger": "steps", "choices": ["20", "30"], "align": "block"},
], ids=["steps", "fallback-spacing", "own-markers", "prefix-aligned", "every-aligned",
        "multi-base-aligned"])
def test_live_sequences_decide_the_offline_points(tok, r1_tok, which, cfg):
    """Fed in random chunks, a live sequence decides exactly the points the offline plan
    of the finished trajectory has (same triggers, same forks), each once, and each only
    once the tokens that follow it can no longer move it."""
    from types import SimpleNamespace

    from vllm_steer.probe.job import ProbeJob

    t = tok if which == "default" else r1_tok
    live = LiveProbe(t, LiveProbeConfig.parse(cfg), block_size=8)
    prompt = enc(t, "Question: is 17 prime?\n\nWait.<think>\n")
    kinds: set[str] = set()
    moved = 0
    for i in range(25):
        rng = random.Random(i)
        gen = _random_generation(t, rng)
        seq = live.sequence(prompt)
        got, pos = [], 0
        while pos < len(gen):
            step = rng.randint(1, 5)
            got += [r.pt for r in seq.extend(gen[pos:pos + step])]
            pos += step
        got += [r.pt for r in seq.extend([], finished=True)]
        job = ProbeJob(t, [prompt], [None], ProbeConfig.from_dict({**cfg, "max_tokens": 64}),
                       block_size=8)
        job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(token_ids=gen)])])
        want = job.plan()
        assert [(p.token_index, p.trigger, p.marker, p.trigger_index, p.base) for p in
                sorted(got, key=lambda p: p.token_index)] == \
            [(p.token_index, p.trigger, p.marker, p.trigger_index, p.base) for p in want]
        kinds |= {p.trigger for p in want}
        assert len({p.token_index for p in got}) == len(got)
        moved += sum(p.token_index != p.trigger_index for p in want)
    assert kinds >= ({"start", "end", "step"} if cfg["trigger"] == "steps"
                     else {"start", "end", "every"})
    if cfg.get("align", "none") != "none":
        assert moved > 0   # aligned forks moved back onto blocks


def test_a_step_is_decided_only_once_the_text_after_it_is_known(tok):
    """"Wait" could still become "Waiting": not decided until a character follows."""
    planner = PointPlanner("steps", None, None, 0, tok)
    planner.feed(enc(tok, "Odd. Wait"))
    assert [c.kind for c in planner.take()] == ["start"]
    planner.feed(enc(tok, "ing for it"))
    planner.feed(enc(tok, " and more text follows here"))
    assert planner.take() == []   # "Waiting" is no marker
    planner.feed(enc(tok, ". Wait, no."))
    planner.feed(enc(tok, " and a lot more text after that"))
    (c,) = planner.take()
    assert c.kind == "step" and c.marker == "Wait"


def test_aligned_points_end_the_prefix_or_the_base_on_a_block(tok):
    prompt = list(range(300, 359))   # 59 tokens
    gen = list(range(400, 500))
    seq = prompt + gen
    markers = (tuple(enc(tok, "<think>")), tuple(enc(tok, "</think>")))
    tail = 8
    c = Candidate(50, "every")
    p = place_point(seq, 59, c, markers, "prefix", 32, lambda q: tail)
    assert p == 37 and (59 + p) % 32 == 0
    b = place_point(seq, 59, c, markers, "base", 32, lambda q: tail)
    assert b == 29 and (59 + b + tail) % 32 == 0
    assert place_point(seq, 59, Candidate(3, "step"), markers, "prefix", 32, lambda q: 0) == 0
    for kind in ("start", "end"):   # never moved
        assert place_point(seq, 59, Candidate(50, kind), markers, "prefix", 32,
                           lambda q: 0) == 50


@pytest.mark.parametrize("value, field", [
    ({"trigger": "words"}, "probe.trigger"),
    ({"markers": ["Wait"]}, "probe.markers"),   # only with trigger steps
    ({"trigger": "steps", "markers": []}, "probe.markers"),
    ({"trigger": "steps", "markers": ["ok", ""]}, "probe.markers"),
    ({"trigger": "steps", "markers": "Wait"}, "probe.markers"),
    ({"trigger": "steps", "min_spacing": -1}, "probe.min_spacing"),
    ({"min_spacing": 4}, "probe.min_spacing"),
    ({"trigger": "steps", "every": 0}, "probe.every"),
    ({"align": "page"}, "probe.align"),
])
def test_bad_trigger_fields_name_the_field(value, field):
    with pytest.raises(ProbeError) as ei:
        LiveProbeConfig.parse(value)
    assert ei.value.field == field


def test_trigger_defaults():
    assert ProbeConfig().every == 16 and ProbeConfig(trigger="steps").every is None
    assert ProbeConfig.from_dict({"trigger": "steps", "every": 64}).every == 64
    assert LiveProbeConfig.parse({"trigger": "steps"}).probe.markers is None


def test_aligned_live_probe_needs_the_block_size(tok):
    with pytest.raises(ProbeError) as ei:
        LiveProbe(tok, LiveProbeConfig.parse({"align": "block"}))
    assert ei.value.field == "probe.align"

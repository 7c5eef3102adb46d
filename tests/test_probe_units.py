"""Probe building blocks without an engine: choices, readings, fork plans, replay specs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_steer import SteeringVector
from vllm_steer.probe import ProbeConfig, ProbeError
from vllm_steer.probe.choices import ChoiceSet
from vllm_steer.probe.forks import fork_spec, replay_spec
from vllm_steer.probe.job import ProbeJob
from vllm_steer.probe.reading import make_reading
from vllm_steer.stats import pearson
from vllm_steer.steering.registry import Registry
from vllm_steer.steering.resolve import Resolver
from vllm_steer.steering.spec import SpecError, parse_spec


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_choice_variants_come_from_the_tokenizer(tok):
    cs = ChoiceSet.build(tok, ["Yes", "No"])
    assert all(len(v) == 1 for vs in cs.variants for v in vs)   # single-token choices
    yes = {tok.decode(list(v)) for v in cs.variants[0]}
    assert {"Yes", " Yes", "yes", " yes"} <= yes
    assert all(s.strip(" \n\"'").lower() == "yes" for s in yes)
    assert not set(cs.variants[0]) & set(cs.variants[1])
    assert len(cs.head_ids) <= 128 and cs.multi_token == (False, False)


@pytest.mark.parametrize("choices, message", [
    ([], "at least one"),
    (["Yes", "yes"], "repeat"),
    (["  "], "empty"),
    (["New", "New York"], "prefix"),
    (["20", "200"], "prefix"),
    (["Yes", "word " * 40], "longer than"),
    (["Yes", 5], "strings"),
])
def test_bad_choices(tok, choices, message):
    with pytest.raises(ProbeError, match=message):
        ChoiceSet.build(tok, choices)


def test_reading_math():
    yn = ("Yes", "No")
    r = make_reading(yn, [[math.log(0.2), math.log(0.1)], [math.log(0.1)]],
                     token_index=5, in_thinking=True)
    assert r.logprobs["Yes"] == pytest.approx(math.log(0.3))
    assert r.log_ratio == pytest.approx(math.log(3.0))
    assert r.mass == pytest.approx(0.4) and not r.low_mass
    assert r.normalized["Yes"] == pytest.approx(math.log(0.75))
    assert r.probs == pytest.approx({"Yes": 0.75, "No": 0.25})
    low = make_reading(yn, [[-20.0, -20.0], [-21.0]], token_index=0, in_thinking=False)
    assert low.low_mass and low.log_ratio == pytest.approx(math.log(2 * math.exp(1)), rel=1e-6)
    dead = make_reading(yn, [[-math.inf, -math.inf], [-math.inf]], token_index=0,
                        in_thinking=False)
    assert dead.log_ratio is None and dead.mass == 0.0 and dead.low_mass
    assert dead.to_json()["logprobs"] == {"Yes": None, "No": None}
    three = make_reading(("A", "B", "C"), [[-1.0], [-2.0], [-3.0]], token_index=0,
                         in_thinking=False)
    assert three.log_ratio is None
    assert sum(three.probs.values()) == pytest.approx(1.0)


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
    job.take("trajectories", [_Out(outputs=[_Out(token_ids=gen)])])
    reqs = job.requests("forks")
    suffix = tok.encode(" Final answer:", add_special_tokens=False)
    points = [f.token_index for f in job.points]
    # gen = ' a',' b',' c','</','think','>',' ok': point 4 would cut </think>, so it moves
    # to the marker's start (3)
    assert len(gen) == 7 and points == [0, 3, 7]
    for fork, (p, sp) in zip(job.points, reqs, strict=True):
        base = prompt + gen[: fork.token_index]
        expect = base + (te if fork.in_thinking else []) + suffix
        assert p["prompt_token_ids"] == expect == fork.base
        assert sp.max_tokens == 1 and sp.logprob_token_ids == job.choices.head_ids
    assert [f.in_thinking for f in job.points] == [f.token_index < len(gen) - 1
                                                   for f in job.points]
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
    job.requests("forks")
    assert job.points[0].base == [1, 2, 3]
    with pytest.raises(ProbeError, match="forcing suffix"):
        ProbeJob(tok, [[1, 2, 3]], [None], ProbeConfig(suffix=None))


def test_prompt_longer_than_context_is_refused(tok):
    with pytest.raises(ProbeError, match="context"):
        ProbeJob(tok, [[1] * 100], [None], ProbeConfig(max_tokens=50), max_model_len=120)


def test_bad_steering_in_probe_names_the_field(tok):
    with pytest.raises(ProbeError) as ei:
        ProbeJob(tok, [[1]], [{"vectors": [{"name": "a"}], "apply_to": "nope"}], ProbeConfig())
    assert ei.value.field == "steering[0].steering.apply_to"


# -- issue 11 defects (written before the fixes) -------------------------------------------
def test_context_check_counts_the_fork_output_token(tok):
    """prompt + max_tokens + </think> + suffix == max_model_len leaves no room for the fork's
    one output token: vLLM refuses the last fork, after the whole trajectory was generated."""
    cfg = ProbeConfig(max_tokens=50)
    te = len(tok.encode("</think>", add_special_tokens=False))
    sfx = len(tok.encode(cfg.suffix, add_special_tokens=False))
    exact = 100 + 50 + te + sfx
    with pytest.raises(ProbeError, match="context"):
        ProbeJob(tok, [[1] * 100], [None], cfg, max_model_len=exact)
    ProbeJob(tok, [[1] * 100], [None], cfg, max_model_len=exact + 1)


@pytest.mark.parametrize("kw, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"top_k_flagged": -1}, "top_k_flagged"),
])
def test_config_values_vllm_would_refuse_are_refused_up_front(tok, kw, field):
    with pytest.raises(ProbeError) as ei:
        ProbeJob(tok, [[1, 2]], [None], ProbeConfig(**kw))
    assert ei.value.field == field


def test_fork_points_never_fall_inside_a_marker(tok):
    te = tok.encode("</think>", add_special_tokens=False)
    assert len(te) == 3
    prompt = tok.encode("Q?", add_special_tokens=False) + tok.encode("<think>",
                                                                     add_special_tokens=False)
    words = tok.encode(" a b c", add_special_tokens=False)
    gen = words + te + tok.encode(" Yes it is", add_special_tokens=False)
    every = len(words) + 1   # a point right after '</'
    job = ProbeJob(tok, [prompt], [None], ProbeConfig(every=every, suffix=" A:"))
    job.take("trajectories", [_Out(outputs=[_Out(token_ids=gen)])])
    job.requests("forks")
    for fork in job.points:
        text = tok.decode(fork.base)
        assert "</</think>" not in text and "</think</think>" not in text, text
        assert text.count("</think>") == 1, text


# -- multi-token choices -----------------------------------------------------------------
def test_multi_token_choices_have_spelling_variants(tok):
    cs = ChoiceSet.build(tok, ["20", "30", "40", "50"])
    assert cs.multi_token == (True,) * 4
    for c, vs in zip(cs.choices, cs.variants, strict=True):
        assert set(vs) == {tuple(tok.encode(c, add_special_tokens=False)),
                           tuple(tok.encode(" " + c, add_special_tokens=False))}
    assert cs.head_ids == sorted({v[0] for vs in cs.variants for v in vs})
    city = ChoiceSet.build(tok, ["New York", "Chicago"])
    assert city.multi_token == (True, False)   # "Chicago" and " Chicago" are single tokens
    ny = {tok.decode(list(v)) for v in city.variants[0]}
    assert ny == {"New York", " New York", "new york", " new york", "NEW YORK", " NEW YORK"}
    for c in ["-3", "B)", "Los Angeles"]:
        (vs,) = ChoiceSet.build(tok, [c]).variants
        assert tuple(tok.encode(" " + c, add_special_tokens=False)) in vs
    # single-token choices also keep their spelling as written when it is split ...
    three, houston = ChoiceSet.build(tok, ["3", "Houston"]).variants
    assert (tok.encode("3", add_special_tokens=False)[0],) in three
    assert tuple(tok.encode(" 3", add_special_tokens=False)) in three   # ' ', '3'
    assert tuple(tok.encode("Houston", add_special_tokens=False)) in houston   # 3 tokens
    assert tuple(tok.encode(" Houston", add_special_tokens=False)) in houston  # 1 token
    # ... but Yes/No stay single-token (their split case spellings, e.g. "YES", are left out)
    assert ChoiceSet.build(tok, ["Yes", "No"]).multi_token == (False, False)


def _lp(ctx: tuple[int, ...], tid: int) -> float:
    """A made-up conditional log-prob of ``tid`` after base + ``ctx`` (deterministic)."""
    return -0.05 - (hash((ctx, tid)) % 997) / 97.0


class _LP(SimpleNamespace):
    pass


def _fake_outputs(job: ProbeJob, reqs, cache_hits: dict[int, int]) -> list:
    """Outputs as vLLM returns them, from ``_lp``; request i reads ``cache_hits.get(i, 0)``
    prompt tokens from the prefix cache (their prompt log-probs are garbage)."""
    outs = []
    for i, (p, sp) in enumerate(reqs):
        ids = p["prompt_token_ids"]
        pt = next(q for q in job.points if ids[:len(q.base)] == q.base)
        n = len(pt.base)
        cached = cache_hits.get(i, 0)
        plp = None
        if sp.prompt_logprobs is not None:
            plp = [None] + [{ids[k]: _LP(logprob=(_lp(tuple(ids[n:k]), ids[k])
                                                  if k - 1 >= cached and k >= n else 0.0))}
                            for k in range(1, len(ids))]
        head = None
        if sp.logprob_token_ids:
            ctx = tuple(ids[n:])
            head = [{t: _LP(logprob=_lp(ctx, t)) for t in sp.logprob_token_ids}]
        outs.append(_Out(prompt_token_ids=ids, num_cached_tokens=cached, prompt_logprobs=plp,
                         outputs=[_Out(logprobs=head, token_ids=[0])]))
    return outs


@pytest.mark.parametrize("fork_single", [False, True])
def test_multi_token_readings_sum_token_logprobs_and_fill_cache_gaps(tok, fork_single):
    choices = ["20", "30", "Chicago", "New York"]
    job = ProbeJob(tok, [tok.encode("Q? <think>", add_special_tokens=False)], [None],
                   ProbeConfig(choices=choices, every=2, min_mass=0.0),
                   fork_single_tokens=fork_single)
    job.take("trajectories", [_Out(outputs=[_Out(token_ids=tok.encode(" a b c d",
                                                                      add_special_tokens=False))])])
    reqs = job.requests("forks")
    cs = job.choices
    # one fork per read context: each multi-token variant minus its last token (and each
    # single-token variant on its own fork when asked), plus the head
    contexts = sorted({tuple(v[:-1]) for vs in cs.variants for v in vs if len(v) > 1})
    singles = [(v[0],) for vs in cs.variants for v in vs if len(v) == 1] if fork_single else []
    per_point = 1 + len(contexts) + len(singles)
    assert len(reqs) == len(job.points) * per_point
    for i, (p, sp) in enumerate(reqs):
        pt = job.points[i // per_point]
        j = i % per_point
        if j == 0:
            assert p["prompt_token_ids"] == pt.base and sp.logprob_token_ids == cs.head_ids
            continue
        ctx = (contexts + singles)[j - 1]
        assert p["prompt_token_ids"] == pt.base + list(ctx)
        if j <= len(contexts):   # reads every variant's last token after ctx at once
            assert sp.logprob_token_ids == sorted({v[-1] for vs in cs.variants for v in vs
                                                   if len(v) > 1 and tuple(v[:-1]) == ctx})
        if len(ctx) > 1 or j > len(contexts):   # its own tokens through prompt log-probs
            assert sp.prompt_logprobs == 0 and sp.skip_reading_prefix_cache is False
        else:
            assert sp.prompt_logprobs is None
    # every third read-context fork of two or more tokens found base + its first token in
    # the prefix cache: the row of its second token was not computed
    hits = {i: len(reqs[i][0]["prompt_token_ids"]) - len(contexts[i % per_point - 1]) + 1
            for i in range(len(reqs)) if 0 < i % per_point <= len(contexts)
            and len(contexts[i % per_point - 1]) > 1 and i % 3 == 0}
    assert hits
    job.take("forks", _fake_outputs(job, reqs, hits))
    gaps = job.requests("gaps")
    # exactly the rows the cache hits left unread: each hit fork's second token, read at
    # the end of base + its first token (one request per point and context)
    missing = {(i // per_point, tuple(contexts[i % per_point - 1][:1])) for i in hits}
    assert len(gaps) == len(missing), "the cache hits must leave exactly these rows unread"
    job.take("gaps", _fake_outputs(job, gaps, {}))
    (traj,) = job.trajs
    assert [r.token_index for r in traj.readings] == [0, 2, 4]
    for r in traj.readings:
        per = {}
        for c, vs in zip(choices, cs.variants, strict=True):
            per[c] = math.log(sum(math.exp(sum(_lp(tuple(v[:j]), t) for j, t in enumerate(v)))
                                  for v in vs))
        assert r.logprobs == pytest.approx(per, abs=1e-9)
        assert r.mass == pytest.approx(sum(math.exp(x) for x in per.values()))
        assert sum(r.probs.values()) == pytest.approx(1.0) and r.log_ratio is None
        assert r.requests >= per_point


def test_fork_spec_steers_the_suffix_only_when_asked():
    spec = {"vectors": [{"name": "a", "scale": 2}], "apply_to": "generated"}
    on = fork_spec(spec, 10, 5, True)
    assert on["apply_to"] == "all" and on["start_position"] == 10 and "end_position" not in on
    off = fork_spec(spec, 10, 5, False)
    assert off["start_position"] == 10 and off["end_position"] == 15
    assert fork_spec(spec, 10, 0, False) is None   # nothing generated yet: nothing to steer
    think = fork_spec({**spec, "apply_to": "thinking"}, 10, 5, False)
    assert think["apply_to"] == "thinking" and think["end_position"] == 15


def test_fork_spec_keeps_each_vectors_op():
    """Probe forks replay the trajectory's interventions, not only additions."""
    spec = {"vectors": [{"name": "a", "op": "ablate", "strength": 0.5},
                        {"name": "b", "op": "clamp", "value": -1.5, "layers": [2, 3]},
                        {"name": "c", "scale": 3}],
            "apply_to": "generated", "normalize": True}
    for steer_suffix in (True, False):
        d = fork_spec(spec, 10, 5, steer_suffix)
        assert d["vectors"] == [{"name": "a", "op": "ablate", "strength": 0.5},
                                {"name": "b", "op": "clamp", "value": -1.5, "layers": [2, 3]},
                                {"name": "c", "scale": 3.0}]  # op from the registry
        assert d["normalize"] is True
    with pytest.raises(SpecError) as ei:
        fork_spec({"vectors": [{"name": "a", "op": "ablate", "scale": 2}]}, 10, 5, True)
    assert ei.value.field == "steering.vectors[0].scale"


@pytest.mark.parametrize("d, field", [
    ({"colour": 1}, "probe.colour"), ({"ignore_eos": "no"}, "probe.ignore_eos"),
    ({"steer_suffix": 1}, "probe.steer_suffix"), ({"min_mass": 2}, "probe.min_mass"),
    ({"top_k_flagged": 21}, "probe.top_k_flagged"), ({"every": 2.5}, "probe.every"),
    ({"choices": "Yes"}, "probe.choices"), ({"think_end": ""}, "probe.think_end"),
])
def test_probe_config_from_dict_names_the_field(d, field):
    with pytest.raises(ProbeError) as ei:
        ProbeConfig.from_dict(d, prefix="probe.")
    assert ei.value.field == field


def test_question_files_take_per_question_choices(tmp_path):
    from vllm_steer.probe.questions import load_questions

    f = tmp_path / "q.yaml"
    f.write_text('instruction: "Answer with {choices}."\n'
                 'questions:\n'
                 '  - {question: "Is it?", expected: "No"}\n'
                 '  - {question: "Speed?", choices: [20, 30, 40, 50], expected: 40}\n')
    qs = load_questions(f)
    assert qs.texts == ["Is it? Answer with Yes or No.",
                        "Speed? Answer with 20, 30, 40 or 50."]
    assert list(qs.choice_groups()) == [("Yes", "No"), ("20", "30", "40", "50")]
    assert qs.signs("Yes") == [-1.0, -1.0]
    f.write_text('questions:\n  - {question: "Is it?", expected: "Maybe"}\n')
    with pytest.raises(ProbeError) as ei:
        load_questions(f)
    assert ei.value.field == "questions[0].expected"


def test_shipped_question_sets_have_checkable_answers():
    """Every shipped question has ``expected``; the sets whose ``expected`` is the correct
    answer are graded, persona sets (the answer a persona gives) are not. The checkable
    sets' answers are right (recomputed here from the question text), each question
    appears once, and yes/no sets are balanced."""
    import re

    from vllm_steer.locations import shipped_configs
    from vllm_steer.probe.questions import load_questions

    kinds = {}
    for f in sorted((shipped_configs() / "questions").glob("*.yaml")):
        qs = load_questions(f)
        kinds[f.stem] = qs.expected_kind
        assert all(q.expected is not None for q in qs.questions), f.stem
        assert len({q.text for q in qs.questions}) == len(qs.questions), f.stem
    assert kinds["mood_yes_no"] == kinds["mood_four_way"] == "persona"
    graded = {k for k, v in kinds.items() if v == "truth"}
    assert {"arithmetic", "comparisons", "primality", "arithmetic_choice",
            "yes_no_reasoning", "multiple_choice"} <= graded

    def prime(n: int) -> bool:
        return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))

    def truth(text: str) -> str:
        if m := re.match(r"Is (\d+) (?:\+|plus) (\d+) equal to (\d+)\?", text):
            a, b, c = map(int, m.groups())
            return "Yes" if a + b == c else "No"
        if m := re.match(r"Is (\d+) (greater|larger|less|smaller) than (\d+)\?", text):
            a, word, b = int(m[1]), m[2], int(m[3])
            return "Yes" if (a > b if word in ("greater", "larger") else a < b) else "No"
        if m := re.match(r"Is (\d+) a prime number\?", text):
            return "Yes" if prime(int(m[1])) else "No"
        if m := re.match(r"What is (\d+) (times|plus) (\d+)\?", text):
            a, op, b = int(m[1]), m[2], int(m[3])
            return str(a * b if op == "times" else a + b)
        raise AssertionError(text)

    for name in ("arithmetic", "comparisons", "primality", "arithmetic_choice"):
        qs = load_questions(shipped_configs() / "questions" / f"{name}.yaml")
        assert len(qs.questions) >= 24
        for q in qs.questions:
            assert q.expected == truth(q.text), q.text
            assert q.expected in q.choices
        if q.choices == ("Yes", "No"):
            yes = sum(q.expected == "Yes" for q in qs.questions)
            assert yes == len(qs.questions) - yes


def test_accuracy_is_against_expected_not_the_models_answers(tmp_path):
    """``accuracy`` compares answers with ``expected`` (case and leading space ignored);
    the early-exit grid scores only graded questions, with the early answer where the rule
    fires and the full-length answer elsewhere."""
    from types import SimpleNamespace

    from vllm_steer.bench.early_exit import grid
    from vllm_steer.probe.questions import Question, accuracy, load_questions

    qs = [Question("a", ("Yes", "No"), "Yes"), Question("b", ("Yes", "No"), "No"),
          Question("c", ("Yes", "No"), None)]
    assert accuracy(["yes", " Yes", "No"], qs) == 0.5
    assert accuracy([None, "No", "Yes"], qs) == 0.5
    assert accuracy(["No", "No"], qs[2:] * 2) is None
    f = tmp_path / "q.yaml"
    f.write_text("expected_kind: opinion\nquestions:\n  - {question: q, expected: 'Yes'}\n")
    with pytest.raises(ProbeError) as ei:
        load_questions(f)
    assert ei.value.field == "expected_kind"

    def reading(t: int, p_yes: float) -> dict:
        return {"token_index": t, "probs": {"Yes": p_yes, "No": 1 - p_yes}, "mass": 0.5,
                "logprobs": {"Yes": math.log(0.5 * p_yes), "No": math.log(0.5 * (1 - p_yes))},
                "normalized": {"Yes": math.log(p_yes), "No": math.log(1 - p_yes)},
                "in_thinking": True, "log_ratio": None, "low_mass": False}

    # full-length answers: Yes, No; the model's answer is never the reference
    rows = [{"expected": "No", "tokens": 40, "full_answer": "Yes",
             "readings": [reading(0, 0.2), reading(8, 0.3), reading(40, 0.9)]},
            {"expected": "No", "tokens": 40, "full_answer": "No",
             "readings": [reading(0, 0.95), reading(8, 0.4), reading(40, 0.1)]},
            {"expected": None, "tokens": 40, "full_answer": "No",
             "readings": [reading(0, 0.5), reading(40, 0.1)]}]
    args = SimpleNamespace(thresholds=[0.75], consecutive=[1])
    (g,) = grid(rows, args)
    # row 0 stops at 0 on No (right), row 1 at 0 on Yes (wrong), row 2 ungraded
    assert (g["fired"], g["accuracy"], g["agreement_overall"]) == (3, 0.5, 1 / 3)


def _reading(probs: dict[str, float], mass: float, t: int):
    lps = [[math.log(p * mass)] for p in probs.values()]
    return make_reading(tuple(probs), lps, token_index=t, in_thinking=t < 8)


@pytest.mark.parametrize("choices", [["Yes", "No"], ["20", "30", "40", "50"]])
def test_plots_show_choice_probabilities_and_a_mass_panel(tmp_path, choices):
    import matplotlib

    from vllm_steer.probe import SweepResult, Trajectory
    from vllm_steer.probe.plot import (
        plot_sweep,
        plot_trajectories,
        sweep_figure,
        trajectory_figure,
    )

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(choices)
    trajs = []
    for label, shift in (("a", 0.0), ("b", 0.5)):
        t = Trajectory(label, [1], None, think_end_index=8)
        for i in range(0, 17, 4):
            w = [1.0 + shift * (j == i // 4 % k) for j in range(k)]
            t.readings.append(_reading({c: x / sum(w) for c, x in zip(choices, w, strict=True)},
                                       0.5 / (i + 1), i))
        trajs.append(t)
    fig = trajectory_figure(plt, trajs, "q", 0.05)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels[-1] == "mass of all choices" and fig.axes[-1].get_yscale() == "log"
    assert [lb for lb in labels if lb.startswith("P(")] == [f"P({c}) / P(choices)"
                                                            for c in choices]
    assert len(fig.axes[-1].lines) >= 2 and len(fig.axes[1].lines) >= 2   # both runs drawn
    plt.close(fig)
    res = SweepResult(vector="v", scales=[-1.0, 0.0, 1.0], questions=["q1", "q2"],
                      choices=choices, target=choices[0],
                      log_odds=[[-1.0, -0.5], [0.0, 0.1], [1.0, None]],
                      mean_log_odds=[-0.75, 0.05, 1.0],
                      mean_probs=[{c: 1 / k for c in choices}] * 3,
                      mean_mass=[0.5, 0.4, 0.01], min_mass=[0.4, 0.3, 0.001],
                      low_mass_count=[0, 0, 2], pearson_r=0.99, pearson_r_all_points=0.9)
    fig = sweep_figure(plt, res, 0.05)
    assert [ax.get_ylabel() for ax in fig.axes][1:] == ["mean P(choice) / P(choices)",
                                                        "mass of all choices"]
    assert len(fig.axes[1].lines) == k
    plt.close(fig)
    assert plot_trajectories(trajs, tmp_path / "p.png").stat().st_size > 0
    assert plot_sweep(res, tmp_path / "s.png").stat().st_size > 0


class _FakeLLM:
    """Answers head forks with made-up log-probs that grow with the steering scale (only
    the sweep's bookkeeping is under test here, no model)."""

    def __init__(self, tok):
        self.tok = tok
        self.model_config = SimpleNamespace(max_model_len=4096)  # as vllm.LLM has

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p, sp in zip(prompts, params, strict=True):
            spec = (sp.extra_args or {}).get("steering")
            scale = spec["vectors"][0]["scale"] if spec else 0.0
            lp = {t: _LP(logprob=-1.0 - k + (scale if k == 0 else 0.0))
                  for k, t in enumerate(sp.logprob_token_ids)}
            outs.append(_Out(prompt_token_ids=p["prompt_token_ids"], num_cached_tokens=0,
                             prompt_logprobs=None, outputs=[_Out(logprobs=[lp])]))
        return outs


@pytest.mark.parametrize("signs", [None, [1.0, -1.0]])
def test_sweep_scores_the_target_with_or_without_signs(tok, signs):
    from vllm_steer.probe import sweep

    res = sweep(_FakeLLM(tok), ["q1", "q2"], "v", [-1.0, 0.0, 1.0],
                ProbeConfig(choices=["Paris", "London", "Rome"], suffix=None),
                target="london", signs=signs)
    assert res.target == "London" and res.choices == ["Paris", "London", "Rome"]
    assert len(res.log_odds) == 3 and all(len(row) == 2 for row in res.log_odds)
    assert (res.mean_signed_log_odds is None) == (signs is None)
    assert res.pearson_r is not None and all(sum(p.values()) == pytest.approx(1.0)
                                             for p in res.mean_probs)
    with pytest.raises(ProbeError) as ei:
        sweep(_FakeLLM(tok), ["q"], "v", [0.0], ProbeConfig(choices=["Yes", "No"]),
              target="Maybe")
    assert ei.value.field == "target"

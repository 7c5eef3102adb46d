"""Conditional steering without an engine: the spec edge, resolution and the wire, and the
worker's condition table driven like the runner drives it (accumulation as the traced
forwards run it, scoring between steps), against the formula written in test code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.cond_reference import cast_score_ref
from vllm_steer.steering.condition import MAX_CONDITIONS, cast_score
from vllm_steer.steering.spec import SpecError, parse_spec

# -- the spec edge ---------------------------------------------------------------------------

GOOD = {"vectors": [{"name": "a"}], "condition": {"name": "c", "threshold": 0.1}}


def field_of(raw) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    return e.value.field


@pytest.mark.parametrize("raw,field", [
    ({**GOOD, "condition": {"name": "c", "threshold": 2.0}}, "steering.condition.threshold"),
    ({**GOOD, "condition": {"name": "c", "threshold": "0.1"}}, "steering.condition.threshold"),
    ({**GOOD, "condition": {"name": "c", "aggregate": "max"}}, "steering.condition.aggregate"),
    ({**GOOD, "condition": {"name": "c", "compare": "over"}}, "steering.condition.compare"),
    ({**GOOD, "condition": {"name": "c", "layer": -1}}, "steering.condition.layer"),
    ({**GOOD, "condition": {"name": "c", "layer": True}}, "steering.condition.layer"),
    ({**GOOD, "condition": {"name": "c", "bogus": 1}}, "steering.condition.bogus"),
    ({**GOOD, "condition": {"name": "c", "path": "x"}}, "steering.condition"),
    ({**GOOD, "condition": {"name": ""}}, "steering.condition.name"),
    ({**GOOD, "condition": "c"}, "steering.condition"),
    ({**GOOD, "condition": {"any": []}}, "steering.condition.any"),
    ({**GOOD, "condition": {"all": [{"name": "c"}] * (MAX_CONDITIONS + 1)}},
     "steering.condition.all"),
    ({**GOOD, "condition": {"any": [{"name": "c"}, {"nme": "c"}]}},
     "steering.condition.any[1].nme"),
    ({**GOOD, "condition": {"any": [{"name": "c"}], "all": []}}, "steering.condition"),
    ({**GOOD, "condition": {"any": [{"name": "c"}], "x": 1}}, "steering.condition.x"),
    ({**GOOD, "apply_to": "all"}, "steering.apply_to"),
    ({**GOOD, "apply_to": "prompt"}, "steering.apply_to"),
    ({**GOOD, "decision": True}, "steering.decision"),
    ({"vectors": [{"name": "a"}], "decision": "yes"}, "steering.decision"),
    ({"vectors": [{"name": "a"}], "else_vectors": [{"name": "b"}]}, "steering.else_vectors"),
    ({"vectors": [{"name": "a"}], "prompt_vectors": [{"name": "b"}]},
     "steering.prompt_vectors"),
    ({**GOOD, "else_vectors": []}, "steering.else_vectors"),
    ({**GOOD, "else_vectors": [{"name": "b", "scale": "x"}]}, "steering.else_vectors[0].scale"),
    ({**GOOD, "prompt_vectors": [{"nam": "b"}]}, "steering.prompt_vectors[0].nam"),
    ({**GOOD, "split_position": 4}, "steering.split_position"),
])
def test_bad_fields_are_named(raw, field):
    assert field_of(raw) == field


def test_rules_and_defaults_parse():
    s = parse_spec(GOOD)
    assert s.gated and s.apply_to == "generated" and s.condition.single
    s = parse_spec({**GOOD, "condition": {"any": [{"name": "c"}, {"path": "p.safetensors",
                                                                 "layer": 3}]},
                    "apply_to": "thinking", "else_vectors": [{"name": "b"}]})
    assert s.condition.mode == "any" and len(s.condition.conditions) == 2
    assert parse_spec(s.to_dict()) == s
    canon = s.at_absolute_positions(17)
    assert (canon.apply_to, canon.start_position, canon.split_position) == ("thinking", 17, 17)
    replay = parse_spec(canon.decided(False).to_dict())
    assert replay.decision is False and replay.condition is None
    assert replay.at_absolute_positions(40).start_position == 17


# -- resolution and the wire -----------------------------------------------------------------

@pytest.fixture()
def resolver(tmp_path):
    from vllm_steer.steering.registry import Registry
    from vllm_steer.steering.resolve import Resolver
    from vllm_steer.vector import SteeringVector, VectorMetadata

    vdir = tmp_path / "vectors"
    vdir.mkdir()
    g = torch.Generator().manual_seed(0)
    SteeringVector({1: torch.randn(8, generator=g), 2: torch.randn(8, generator=g)}).save(
        vdir / "a.safetensors")
    meta = VectorMetadata(extra={"condition": '{"layer": 2, "aggregate": "last", '
                                              '"threshold": 0.25, "compare": "below"}'})
    SteeringVector({2: torch.randn(8, generator=g), 3: torch.zeros(8)}, meta).save(
        vdir / "c.safetensors")
    SteeringVector({1: torch.randn(8, generator=g)}).save(vdir / "bare.safetensors")
    (tmp_path / "reg.yaml").write_text(
        "allowed_dirs: [vectors]\nvectors:\n  a: vectors/a.safetensors\n"
        "  c: vectors/c.safetensors\n  bare: vectors/bare.safetensors\n")
    reg = Registry.from_yaml(tmp_path / "reg.yaml")
    return Resolver(reg, num_layers=4, hidden_size=8, store_root=tmp_path / "store")


def test_resolve_applies_the_file_defaults_and_salts_every_difference(resolver):
    from vllm_steer.steering.wire import WireSteering

    base = {"vectors": [{"name": "a"}], "condition": {"name": "c"}}
    r = resolver.resolve(parse_spec(base), 10, report="req-1", choices=2)
    (c,) = r.gate.conditions
    assert (c.layer, c.aggregate, c.threshold, c.compare, c.label) == (2, "last", 0.25,
                                                                       "below", "c")
    assert (r.mode, r.start, r.gate.split, r.gate.report) == ("all", 10, 10, "req-1")
    w = WireSteering.from_extra_arg(r.to_wire().to_extra_arg())
    assert w.gate.conditions[0].threshold == 0.25 and w.gate.choices == 2
    assert not w.gate.needs_whole_prompt
    salts = {resolver.resolve(parse_spec(s), n).cache_salt for s, n in [
        (base, 10), (base, 11),
        ({**base, "condition": {"name": "c", "threshold": 0.2}}, 10),
        ({**base, "condition": {"name": "c", "aggregate": "mean"}}, 10),
        ({**base, "condition": {"name": "c", "compare": "above"}}, 10),
        ({**base, "else_vectors": [{"name": "bare"}]}, 10),
        ({**base, "prompt_vectors": [{"name": "bare"}]}, 10),
        ({"vectors": [{"name": "a"}], "decision": True}, 10),
        ({"vectors": [{"name": "a"}], "decision": False}, 10),
        ({"vectors": [{"name": "a"}], "apply_to": "generated"}, 10),
    ]}
    assert len(salts) == 10
    # the report key travels, but does not split the cache
    assert (resolver.resolve(parse_spec(base), 10, report="x").cache_salt
            == resolver.resolve(parse_spec(base), 10, report="y").cache_salt)


@pytest.mark.parametrize("cond,field", [
    ({"name": "bare"}, "steering.condition.layer"),
    ({"name": "bare", "layer": 1}, "steering.condition.threshold"),
    ({"name": "c", "layer": 9}, "steering.condition.layer"),
    ({"name": "c", "layer": 1}, "steering.condition.layer"),
    ({"name": "c", "layer": 3}, "steering.condition.layer"),
    ({"name": "nope"}, "steering.condition.name"),
])
def test_resolution_errors_name_the_field(resolver, cond, field):
    with pytest.raises(SpecError) as e:
        resolver.resolve(parse_spec({"vectors": [{"name": "a"}], "condition": cond}), 5)
    assert e.value.field == field


def test_malformed_gate_wire_is_refused(resolver):
    from vllm_steer.steering.wire import WireError, WireSteering

    raw = resolver.resolve(parse_spec({"vectors": [{"name": "a"}], "condition": {
        "name": "c"}}), 5).to_wire().to_extra_arg()
    for path, value, field in [(("decision",), 3, "gate.decision"),
                               (("conditions", 0, "threshold"), 1.5,
                                "gate.conditions[0].threshold"),
                               (("conditions", 0, "aggregate"), "max",
                                "gate.conditions[0].aggregate"),
                               (("mode",), "some", "gate.mode"),
                               (("split",), -1, "gate.split")]:
        bad = {**raw, "gate": {**raw["gate"], "conditions": [dict(raw["gate"]["conditions"][0])]}}
        obj = bad["gate"]
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
        with pytest.raises(WireError) as e:
            WireSteering.from_extra_arg(bad)
        assert e.value.field == field


# -- the worker's table, driven like the runner drives it ------------------------------------

H = 16


@pytest.fixture(params=[False, True], ids=["device-targets", "host-planned"])
def planned(request):
    """Both ways a table accumulates (``steering.condition_table``)."""
    return request.param


def make_table(num_layers=3, slots=5, rows=64, host_planned=False):
    from vllm_steer.steering.condition_table import ConditionTable

    return ConditionTable(num_layers, slots, H, torch.device("cpu"), rows,
                          host_planned=host_planned)


def gate_wire(conds, mode="all", split=10, report="r"):
    from vllm_steer.steering.wire import WireCondition, WireGate

    return WireGate(conditions=tuple(WireCondition(content="0" * 64, layer=lay, aggregate=agg,
                                                   threshold=thr, compare=cmp, label=f"c{k}")
                                     for k, (lay, agg, thr, cmp) in enumerate(conds)),
                    mode=mode, split=split, report=report)


def forward(table, states):
    """What the traced forwards do: every layer adds each token's state to its target
    (device targets), or calls the op with the block output split into stream + residual
    (host-planned)."""
    from vllm_steer.steering.condition_table import cond_accumulate_op

    for layer, x in states.items():
        if table.host_planned:
            residual = x / 2            # exact halves: stream + residual == x bit for bit
            cond_accumulate_op(x - residual, residual, layer, table.acc)
        else:
            table.acc.index_add_(0, table.targets[layer][: x.shape[0]], x)


def run_chunks(table, reqs, chunks, states_of):
    """``chunks``: steps of ``[(req, first, n)]`` in batch order; ``states_of(req, layer,
    positions)`` the block outputs. Returns nothing; the table holds the decisions."""
    for step in chunks:
        table.begin_step()
        offset = 0
        batch: dict[int, list[torch.Tensor]] = {}
        for req, first, n in step:
            table.plan(req, offset, first, n)
            for layer in range(table.num_layers):
                batch.setdefault(layer, []).append(states_of(req, layer, range(first, first + n)))
            offset += n
        forward(table, {layer: torch.cat(xs) for layer, xs in batch.items()})
        table.end_step()
    table.begin_step()


def reference_decision(states, conds, mode, split):
    held, scores = [], []
    for lay, agg, thr, cmp in conds:
        x = states[lay][:split]
        h = x.mean(0) if agg == "mean" else x[split - 1]
        s = cast_score_ref(h, DIRS[lay])
        scores.append(s)
        held.append(s >= thr if cmp == "above" else s <= thr)
    return scores, held, (any(held) if mode == "any" else all(held))


_g = np.random.default_rng(7)
DIRS = {layer: _g.normal(size=H) for layer in range(3)}


@pytest.mark.parametrize("conds,mode", [
    ([(1, "mean", 0.05, "above")], "all"),
    ([(1, "last", 0.05, "below")], "all"),
    ([(0, "mean", 0.05, "above"), (2, "last", 0.1, "below"), (1, "mean", 0.0, "above")],
     "any"),
    ([(0, "mean", 0.05, "above"), (0, "last", 0.1, "above")], "all"),
    # one holds for sure (>= -1), one never (>= 1): all is False, any is True
    ([(1, "mean", -1.0, "above"), (2, "last", 1.0, "above")], "all"),
    ([(1, "mean", -1.0, "above"), (2, "last", 1.0, "above")], "any"),
    ([(1, "mean", 1.0, "above"), (2, "last", 1.0, "above")], "any"),
])
def test_table_decides_like_the_reference_across_chunks_and_neighbours(conds, mode, planned):
    """Two conditioned requests and an unconditioned neighbour, prompts in uneven chunks
    (a chunk ending exactly at the split, one crossing it into generated tokens)."""
    table = make_table(host_planned=planned)
    rng = np.random.default_rng(3)
    seqs = {k: {layer: rng.normal(size=(30, H)) + 0.4 * DIRS[layer] * (k + 1)
                for layer in range(3)} for k in range(3)}
    splits = {0: 10, 1: 7}
    reqs = {k: table.add(f"r{k}", gate_wire(conds, mode, splits[k]),
                         [DIRS[c[0]].astype(np.float32) for c in conds]) for k in (0, 1)}

    def states_of(req, layer, positions):
        k = 2 if req is None else int(req.req_id[1:])
        return torch.tensor(seqs[k][layer][list(positions)], dtype=torch.float32)

    class Plain:   # a neighbour without a condition: plans nothing
        req_id = "r2"

    plain = Plain()
    orig_plan = table.plan
    table.plan = lambda r, *a: None if r is plain else orig_plan(r, *a)
    run_chunks(table, reqs, [
        [(reqs[0], 0, 4), (plain, 0, 5), (reqs[1], 0, 3)],
        [(plain, 5, 1), (reqs[0], 4, 6), (reqs[1], 3, 5)],     # r0 ends at its split; r1 crosses it
        [(reqs[0], 10, 1), (reqs[1], 8, 1)],
    ], states_of)
    for k in (0, 1):
        scores, held, rule = reference_decision(seqs[k], conds, mode, splits[k])
        rep = table.report(reqs[k])
        assert [c["score"] for c in rep["conditions"]] == pytest.approx(scores, abs=1e-5)
        assert [c["holds"] for c in rep["conditions"]] == held
        assert rep["holds"] == rule
        assert int(table.gate[reqs[k].slot]) == int(rule)
    assert int(table.gate[0]) == 1


def test_decisions_vary_and_slots_are_reused(planned):
    """Thresholds either side of the reference score give both decisions; a finished
    request's report waits for collection and its slot starts clean for the next."""
    rng = np.random.default_rng(11)
    x = {layer: rng.normal(size=(12, H)) + DIRS[layer] for layer in range(3)}
    (s,), _, _ = reference_decision(x, [(1, "mean", 0.0, "above")], "all", 12)
    table = make_table(slots=2, host_planned=planned)
    for k, thr in enumerate((s - 1e-3, s + 1e-3)):
        req = table.add(f"q{k}", gate_wire([(1, "mean", thr, "above")], split=12,
                                           report=f"k{k}"), [DIRS[1].astype(np.float32)])
        run_chunks(table, {0: req}, [[(req, 0, 12)]],
                   lambda r, layer, pos: torch.tensor(x[layer][list(pos)], dtype=torch.float32))
        if k == 0:   # collected while it runs: handed out once
            (live,) = table.take(["k0"])["k0"]
            table.remove(req.req_id)
            assert table.take(["k0"]) == {} and not table.reports
            rep = live
        else:        # collected after it finished
            table.remove(req.req_id)
            (rep,) = table.take([f"k{k}"])[f"k{k}"]
        assert rep["holds"] is (k == 0)
        assert rep["conditions"][0]["score"] == pytest.approx(s, abs=1e-5)
    assert table.take(["k0", "k1"]) == {}


def test_cast_score_matches_the_formula():
    rng = np.random.default_rng(0)
    h, v = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))
    got = cast_score(torch.tensor(h), torch.tensor(v)).numpy()
    assert got == pytest.approx([cast_score_ref(a, b) for a, b in zip(h, v, strict=True)],
                                abs=1e-12)
    assert float(cast_score(torch.zeros(4), torch.ones(4))) == 0.0


# -- training: the search against an exhaustive check written here --------------------------

def _f1(pred, label):
    tp = sum(p and y for p, y in zip(pred, label, strict=True))
    fp = sum(p and not y for p, y in zip(pred, label, strict=True))
    fn = sum(y and not p for p, y in zip(pred, label, strict=True))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("method,seed", [("mean_diff", 0), ("pca_center", 1), ("mean_diff", 2)])
def test_search_returns_what_an_exhaustive_check_finds(method, seed):
    """Three layers whose separation differs; the trained condition's layer, comparison,
    threshold and F1s equal an exhaustive check over every (layer, comparison, threshold)
    computed here (mean-difference directions here for mean_diff; the product's for PCA)."""
    from vllm_steer.extract.condition import THRESHOLDS, fit_condition, split

    rng = np.random.default_rng(seed)
    n_pos, n_neg, hdim = 14, 12, 24
    label = [True] * n_pos + [False] * n_neg
    states = {}
    for layer, sep in ((2, 0.2), (5, 1.5), (7, 0.8)):
        d = rng.normal(size=hdim)
        x = rng.normal(size=(n_pos + n_neg, hdim)) + 3.0 * rng.normal(size=hdim)
        x[:n_pos] += sep * d
        states[layer] = torch.tensor(x, dtype=torch.float32)
    res = fit_condition(states, n_pos, method=method, aggregate="mean", holdout=0.3, seed=seed)
    train, held = split(n_pos, n_neg, 0.3, seed)
    best = None
    for layer in sorted(states):
        x = states[layer].double().numpy()
        if method == "mean_diff":
            v = x[train & np.array(label)].mean(0) - x[train & ~np.array(label)].mean(0)
            assert np.allclose(v / np.linalg.norm(v), res.vector.directions[layer].numpy(),
                               atol=1e-5)
        else:
            v = res.vector.directions[layer].double().numpy()
        scores = [cast_score_ref(h, v) for h in x]
        for compare in ("above", "below"):
            for t in THRESHOLDS:
                pred = [(s >= t) if compare == "above" else (s <= t)
                        for s, k in zip(scores, train, strict=True) if k]
                f = _f1(pred, [y for y, k in zip(label, train, strict=True) if k])
                if best is None or f > best[3] + 1e-12:
                    best = (layer, compare, t, f, scores)
    layer, compare, t, f, scores = best
    assert (res.layer, res.compare, res.threshold) == (layer, compare, t)
    assert res.f1_train == pytest.approx(f, abs=1e-12)
    pred = [(s >= t) if compare == "above" else (s <= t)
            for s, k in zip(scores, held, strict=True) if k]
    assert res.f1_heldout == pytest.approx(
        _f1(pred, [y for y, k in zip(label, held, strict=True) if k]), abs=1e-12)
    # the file carries the choice as the condition's defaults
    d = json.loads(res.vector.metadata.extra["condition"])
    assert (d["layer"], d["compare"], d["threshold"], d["aggregate"]) == (layer, compare, t,
                                                                          "mean")


def test_condition_recipes_are_checked_naming_the_field():
    from vllm_steer.extract.condition import condition_config
    from vllm_steer.extract.dataset import DatasetError

    good = {"kind": "condition", "positive_prompts": ["a"], "negative_prompts": ["b"],
            "style": "plain"}
    assert condition_config(good, default_name="c").aggregate == "mean"
    for bad, field in (({"aggregate": "max"}, "aggregate"), ({"method": "pca_diff"}, "method"),
                       ({"holdout": 1.0}, "holdout"), ({"seed": "x"}, "seed"),
                       ({"negative_prompts": None}, "negative_prompts"),
                       ({"colour": 1}, "colour"), ({"kind": "vector"}, "kind")):
        with pytest.raises(DatasetError) as e:
            condition_config({**good, **bad}, default_name="c")
        assert e.value.field == field, (bad, e.value.field)


def test_a_forward_no_step_planned_accumulates_nothing(planned):
    """vLLM's dummy runs between steps (``RunnerSteering.quiesce`` clears the targets
    first): the planned request's accumulator rows stay as the real forward left them."""
    table = make_table(host_planned=planned)
    req = table.add("r", gate_wire([(1, "mean", 0.0, "above")], split=6),
                    [DIRS[1].astype(np.float32)])
    table.begin_step()
    table.plan(req, 0, 0, 4)
    x = {layer: torch.randn(4, H) for layer in range(3)}
    forward(table, x)
    before = table.acc.clone()
    table.clear_targets()
    forward(table, {layer: torch.randn(8, H) for layer in range(3)})
    rows = [table.acc_row(req.slot, 0, last) for last in (False, True)]
    assert torch.equal(table.acc[rows], before[rows])
    assert torch.allclose(table.acc[rows[0]], x[1].sum(0))

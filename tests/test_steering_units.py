"""Unit tests of the steering edge and bookkeeping; no engine is started here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm_steer import SteeringVector
from vllm_steer.steering.intake import Intake
from vllm_steer.steering.program import Composed
from vllm_steer.steering.registry import Registry
from vllm_steer.steering.resolve import NO_END, Resolver
from vllm_steer.steering.slots import SlotTable
from vllm_steer.steering.spec import (
    MAX_VECTORS,
    SpecError,
    make_spec,
    parse_extra_args,
    parse_spec,
)
from vllm_steer.steering.think_tracker import ANSWER, THINK, ThinkTracker
from vllm_steer.steering.wire import WireSteering

H, L = 8, 4


@pytest.fixture()
def registry(tmp_path):
    g = torch.Generator().manual_seed(0)
    vdir = tmp_path / "vectors"
    vdir.mkdir()
    SteeringVector({i: torch.randn(H, generator=g) for i in range(L)}).save(vdir / "a.safetensors")
    SteeringVector({1: torch.randn(H, generator=g)}).save(vdir / "b.safetensors")
    SteeringVector({0: torch.randn(H + 1, generator=g)}).save(vdir / "wide.safetensors")
    (tmp_path / "outside.safetensors").write_bytes((vdir / "b.safetensors").read_bytes())
    (tmp_path / "reg.yaml").write_text(
        "allowed_dirs: [vectors]\n"
        "vectors:\n"
        "  a: {path: vectors/a.safetensors}\n"
        "  b: {path: vectors/b.safetensors, scale: 2.0}\n"
        "  wide: vectors/wide.safetensors\n"
    )
    return Registry.from_yaml(tmp_path / "reg.yaml")


class Tok:
    """Whitespace 'tokenizer' with a fixed vocabulary, enough for marker ids."""

    vocab = {"<think>": 7, "</think>": 9, "<multi>": None}

    def encode(self, text, add_special_tokens=False):
        if text == "<multi>":
            return [3, 4]
        return [self.vocab[text]] if self.vocab.get(text) else []


@pytest.fixture()
def resolver(registry, tmp_path):
    return Resolver(registry, num_layers=L, hidden_size=H, tokenizer=Tok(),
                    store_root=tmp_path / "store")


def composed_of(r, max_projections: int = 1):
    """The tables a worker builds from ``r``'s wire (vectors read from the store)."""
    return Intake(L, H, max_projections).composed(
        WireSteering.from_extra_arg(r.to_wire().to_extra_arg()))


# -- parsing ------------------------------------------------------------------------
def test_dict_json_and_flat_forms_agree():
    d = {"vectors": [{"name": "a", "scale": 1.5}], "apply_to": "generated"}
    a = parse_extra_args({"steering": d})
    b = parse_extra_args({"steering": json.dumps(d)})
    c = parse_extra_args({"steer": "a", "steer_scale": 1.5, "steer_apply_to": "generated"})
    assert a == b == c
    assert parse_extra_args({"steer": "a,b"}).vectors[1].name == "b"
    assert parse_extra_args({"other_plugin": 1}) is None
    assert parse_extra_args(None) is None


def test_make_spec_builds_valid_specs():
    d = make_spec(("a", 1.5), {"path": "x.safetensors", "layers": [2, 1]}, apply_to="thinking")
    spec = parse_spec(d)
    assert spec.vectors[0].scale == 1.5 and spec.vectors[1].layers == (1, 2)
    with pytest.raises(SpecError, match="apply_to"):
        make_spec("a", apply_to="sometimes")


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ({"steering": "{not json"}, "steering", "malformed JSON"),
        ({"steering": "[1]"}, "steering", "must be an object"),
        ({"steering": {"vectors": []}}, "steering.vectors", "non-empty"),
        ({"steering": {"vectors": [{"name": "a"}], "colour": 1}}, "steering.colour", "unknown"),
        ({"steering": {"vectors": [{"name": "a", "scale": float("nan")}]}},
         "steering.vectors[0].scale", "finite"),
        ({"steering": {"vectors": [{"name": "a", "scale": float("inf")}]}},
         "steering.vectors[0].scale", "finite"),
        ({"steering": {"vectors": [{"name": "a", "scale": 1e9}]}},
         "steering.vectors[0].scale", "<="),
        ({"steering": {"vectors": [{"name": "a", "scale": "big"}]}},
         "steering.vectors[0].scale", "number"),
        ({"steering": {"vectors": [{"name": "a", "layers": [-1]}]}},
         "steering.vectors[0].layers", "negative"),
        ({"steering": {"vectors": [{"name": "a", "layers": [1.5]}]}},
         "steering.vectors[0].layers", "not an integer"),
        ({"steering": {"vectors": [{"name": "a", "path": "b"}]}},
         "steering.vectors[0]", "exactly one"),
        ({"steering": {"vectors": [{"name": "a"}], "apply_to": "sometimes"}},
         "steering.apply_to", "not one of"),
        ({"steering": {"vectors": [{"name": "a"}], "start_position": -3}},
         "steering.start_position", ">= 0"),
        ({"steering": {"vectors": [{"name": "a"}], "start_position": 5, "end_position": 5}},
         "steering.end_position", "greater"),
        ({"steering": {"vectors": [{"name": "a"}] * (MAX_VECTORS + 1)}},
         "steering.vectors", "at most"),
        ({"steer_scale": 2.0}, "steer_scale", "needs 'steer'"),
        ({"steer": "a", "steering": {"vectors": [{"name": "a"}]}}, "steer", "not both"),
        ({"steer": "a", "steer_mode": "x"}, "steer_mode", "unknown steering argument"),
        ({"steer": "a", "steer_scale": float("nan")}, "steer_scale", "finite"),
    ],
)
def test_malformed_specs_name_the_field(extra, field, message):
    with pytest.raises(SpecError, match=message) as ei:
        parse_extra_args(extra)
    assert ei.value.field == field


def test_flat_specs_report_errors_under_the_keys_the_user_wrote():
    spec = parse_extra_args({"steer": "a", "steer_scale": 2.0, "steer_layers": [1]})
    assert spec.user_field("steering.vectors[0].name") == "steer"
    assert spec.user_field("steering.vectors[0].scale") == "steer_scale"
    assert spec.user_field("steering.vectors[0].layers") == "steer_layers"
    full = parse_extra_args({"steering": {"vectors": [{"name": "a"}]}})
    assert full.user_field("steering.vectors[0].name") == "steering.vectors[0].name"


def test_deeply_nested_json_is_a_clean_error():
    with pytest.raises(SpecError, match="steering"):
        parse_extra_args({"steering": "[" * 100000 + "]" * 100000})


# -- resolution ---------------------------------------------------------------------
def test_composition_sums_scaled_vectors_per_layer(resolver, registry):
    a = SteeringVector.load(registry.entries["a"].path)
    b = SteeringVector.load(registry.entries["b"].path)
    spec = parse_spec({"vectors": [{"name": "a", "scale": 0.5, "layers": [1, 2]},
                                   {"name": "b"}]})
    c = composed_of(resolver.resolve(spec, prompt_len=10))
    assert c.layers == (1, 2) and c.num_projections == 0
    # b's registry default scale is 2.0
    torch.testing.assert_close(torch.from_numpy(c.add[0]),
                               0.5 * a.directions[1] + 2.0 * b.directions[1])
    torch.testing.assert_close(torch.from_numpy(c.add[1]), 0.5 * a.directions[2])


def test_wire_round_trip(resolver):
    r = resolver.resolve(parse_spec({"vectors": [{"name": "a"}], "apply_to": "thinking"}), 3)
    back = WireSteering.from_extra_arg(r.to_wire().to_extra_arg())
    assert back.program() == r.program and back.digest == r.digest
    assert (back.mode, back.start, back.end) == ("thinking", 0, NO_END)
    assert back.think_start_ids == (7,) and back.think_end_ids == (9,)


def test_generated_and_prompt_become_absolute_positions(resolver):
    gen = resolver.resolve(parse_spec({"vectors": [{"name": "a"}], "apply_to": "generated"}), 12)
    replay = resolver.resolve(parse_spec({"vectors": [{"name": "a"}], "start_position": 12}), 40)
    assert (gen.mode, gen.start, gen.end) == ("all", 12, NO_END)
    # A replay that steers the same absolute positions shares the prefix cache.
    assert gen.cache_salt == replay.cache_salt
    prompt = resolver.resolve(parse_spec({"vectors": [{"name": "a"}], "apply_to": "prompt"}), 12)
    assert (prompt.mode, prompt.start, prompt.end) == ("all", 0, 12)
    assert prompt.cache_salt != gen.cache_salt


def test_cache_salt_depends_on_content_not_names(resolver, registry, tmp_path):
    base = resolver.resolve(parse_spec({"vectors": [{"name": "a"}]}), 5)
    same_by_path = resolver.resolve(parse_spec({"vectors": [{"path": "a.safetensors"}]}), 5)
    assert base.cache_salt == same_by_path.cache_salt
    for other in ({"vectors": [{"name": "a", "scale": 1.01}]},
                  {"vectors": [{"name": "a", "layers": [0, 1, 2]}]},
                  {"vectors": [{"name": "a"}], "apply_to": "thinking"},
                  {"vectors": [{"name": "a"}], "start_position": 1},
                  {"vectors": [{"name": "b"}]}):
        assert resolver.resolve(parse_spec(other), 5).cache_salt != base.cache_salt, other


@pytest.mark.parametrize(
    "spec, field, message",
    [
        ({"vectors": [{"name": "zzz"}]}, "steering.vectors[0].name", "unknown vector 'zzz'"),
        ({"vectors": [{"name": "wide"}]}, "steering.vectors[0]", "hidden size 9"),
        ({"vectors": [{"name": "a", "layers": [4]}]}, "steering.vectors[0].layers",
         "out of range"),
        ({"vectors": [{"name": "b", "layers": [0]}]}, "steering.vectors[0].layers",
         "no direction for layers"),
        ({"vectors": [{"path": "../outside.safetensors"}]}, "steering.vectors[0].path",
         "not inside an allowed"),
        ({"vectors": [{"path": "/etc/passwd"}]}, "steering.vectors[0].path",
         "not inside an allowed"),
        ({"vectors": [{"path": "missing.safetensors"}]}, "steering.vectors[0].path",
         "cannot be read"),
        ({"vectors": [{"name": "a"}], "apply_to": "thinking", "think_start": "<nothing>"},
         "steering.think_start", "tokenizes to nothing"),
    ],
)
def test_resolution_errors_name_the_field(resolver, spec, field, message):
    with pytest.raises(SpecError) as ei:
        resolver.resolve(parse_spec(spec), 5)
    assert ei.value.field == field
    assert message in str(ei.value)


def test_symlink_escape_is_refused(resolver, registry, tmp_path):
    link = registry.allowed_dirs[0] / "escape.safetensors"
    link.symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(SpecError, match="not inside an allowed"):
        resolver.resolve(parse_spec({"vectors": [{"path": "escape.safetensors"}]}), 5)


def test_overflowing_composition_is_refused(tmp_path):
    SteeringVector({0: torch.full((H,), 3e38)}).save(tmp_path / "big.safetensors")
    (tmp_path / "r.yaml").write_text("vectors: {big: big.safetensors}\n")
    res = Resolver(Registry.from_yaml(tmp_path / "r.yaml"), num_layers=L, hidden_size=H)
    with pytest.raises(SpecError, match="non-finite"):
        res.resolve(parse_spec({"vectors": [{"name": "big", "scale": 10}]}), 1)


def test_thinking_refused_under_async_scheduling(registry):
    res = Resolver(registry, num_layers=L, hidden_size=H, tokenizer=Tok(),
                   thinking_supported=False)
    with pytest.raises(SpecError, match="async"):
        res.resolve(parse_spec({"vectors": [{"name": "a"}], "apply_to": "answer"}), 1)


# -- thinking state ------------------------------------------------------------------
def _reference_states(tokens, start, end):
    """Independent statement of the rule: state after each token, by substring search."""
    states, s = [], 0
    for p in range(len(tokens)):
        if tokens[max(0, p + 1 - len(end)):p + 1] == end:
            s = ANSWER
        elif tokens[max(0, p + 1 - len(start)):p + 1] == start:
            s = THINK
        states.append(s)
    return states


@pytest.mark.parametrize("start, end", [([7], [9]), ([3, 4], [5, 6, 7])])
def test_think_tracker_is_causal_and_chunk_invariant(start, end):
    rng = np.random.default_rng(0)
    seq = list(rng.integers(10, 20, size=12)) + start + list(rng.integers(10, 20, size=9)) \
        + end + list(rng.integers(10, 20, size=7)) + start + [11, 12]
    tokens = np.array(seq, dtype=np.int32)
    states = _reference_states(seq, start, end)
    for want in (THINK, ANSWER):
        expected = np.array([states[p] == want and (p > 0 and states[p - 1] == want)
                             for p in range(len(seq))])
        whole = ThinkTracker(tuple(start), tuple(end)).flags(tokens, 0, len(seq), want)
        assert (whole == expected).all()
        # chunked prefill then one-token decode steps give the same flags
        t = ThinkTracker(tuple(start), tuple(end))
        parts = [t.flags(tokens, 0, 5, want), t.flags(tokens, 5, 11, want)]
        parts += [t.flags(tokens, p, 1, want) for p in range(16, len(seq))]
        assert (np.concatenate(parts) == expected).all()
        # starting mid-sequence (prefix-cache hit) and rewinding (preemption) agree too
        t = ThinkTracker(tuple(start), tuple(end))
        assert (t.flags(tokens, 20, len(seq) - 20, want) == expected[20:]).all()
        assert (t.flags(tokens, 3, 10, want) == expected[3:13]).all()
        assert expected.any()


# -- slot table ----------------------------------------------------------------------
def _composed(layers, add):
    add = np.asarray(add, dtype=np.float32)
    empty = np.zeros((len(layers), 0, add.shape[1]), dtype=np.float32)
    return Composed(tuple(layers), add, empty, empty[:, :, 0], empty[:, :, 0], False)


def test_slots_refcount_free_and_evict():
    t = SlotTable(num_layers=3, num_slots=3, hidden=2, dtype=torch.float32,
                  device=torch.device("cpu"))
    d1 = _composed((1,), [[1.0, 2.0]])
    d2 = _composed((0, 2), [[3.0, 4.0], [5.0, 6.0]])
    t.acquire("x", d1)
    t.acquire("x", d1)
    t.acquire("y", d2)
    sx, sy = t.slot_for("x", {"x", "y"}), t.slot_for("y", {"x", "y"})
    assert sx != sy and 0 not in (sx, sy)
    assert torch.equal(t.tables[1][sx], torch.tensor([1.0, 2.0]))
    assert torch.equal(t.tables[0][sx], torch.zeros(2))
    assert torch.equal(t.tables[2][sy], torch.tensor([5.0, 6.0]))
    assert all(torch.equal(tb[0], torch.zeros(2)) for tb in t.tables)  # zero row stays zero
    t.acquire("z", _composed((0,), [[1.0, 2.0]]))
    # no free row: z evicts the row of a digest not in the current batch, never a pinned one
    sz = t.slot_for("z", {"z", "x"})
    assert sz == sy and torch.equal(t.tables[0][sz], torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="more distinct"):
        t.slot_for("y", {"x", "z", "y"})
    assert t.slot_for("y", {"y"}) in (sx, sz)          # reloaded from host memory
    for d in ("x", "x", "y", "z"):
        t.release(d)
    st = t.stats()
    assert st["live_digests"] == 0 and st["resident"] == 0 and st["free_slots"] == 2
    assert st["bytes_per_slot"] == 3 * 2 * 4 and st["table_bytes"] == 3 * 3 * 2 * 4


@pytest.mark.parametrize("k, dtype", [(0, torch.float32), (1, torch.float32), (3, torch.bfloat16)])
def test_table_bytes_is_the_documented_formula_and_what_is_allocated(k, dtype):
    """README: num_layers x (max_num_seqs + 1) x (hidden + K (hidden + 2)) values, plus one
    norm flag per slot when K > 0; equal to the bytes of the tensors the table holds."""
    layers, slots, hidden = 5, 4, 6
    t = SlotTable(num_layers=layers, num_slots=slots, hidden=hidden, dtype=dtype,
                  device=torch.device("cpu"), max_projections=k)
    size = torch.tensor([], dtype=dtype).element_size()
    values = layers * slots * (hidden + k * (hidden + 2)) + (slots if k else 0)
    st = t.stats()
    assert st["table_bytes"] == values * size
    assert st["bytes_per_slot"] * slots == st["table_bytes"]
    held = [*t.tables, *(t.proj_dir or []), *(t.proj_a or []), *(t.proj_b or [])]
    held += [t.norm] if t.norm is not None else []
    assert sum(x.numel() * x.element_size() for x in held) == st["table_bytes"]


def test_composition_cache_follows_file_changes(resolver, registry):
    spec = parse_spec({"vectors": [{"name": "a", "scale": 2.0}]})
    first = resolver.resolve(spec, 3)
    assert resolver.resolve(spec, 3).digest == first.digest
    path = registry.entries["a"].path
    orig = SteeringVector.load(path)
    SteeringVector({i: torch.full((H,), float(i)) for i in range(L)}).save(path)
    changed = resolver.resolve(spec, 3)
    np.testing.assert_allclose(composed_of(changed).add[1], np.full(H, 2.0))
    assert changed.digest != first.digest
    # the old content stays in the store for requests already admitted
    np.testing.assert_allclose(composed_of(first).add[1], 2.0 * orig.directions[1].numpy(),
                               rtol=1e-6)
    resolver.forget_file(path)
    assert resolver.resolve(spec, 3).digest == changed.digest

"""The typed wire form of a resolved steering (``steering.wire``): what travels from the
frontend to the workers in ``SamplingParams.extra_args`` (a program naming vectors by content
id, never the vectors unless the transport is inline), and the worker's refusal of a
malformed one. The round trip goes through vLLM's own msgpack encoder (the multiprocess
transport); the engine tests cover both transports end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_steer.steering.intake import Intake
from vllm_steer.steering.program import Part, Program
from vllm_steer.steering.slots import SlotTable
from vllm_steer.steering.spec import WIRE_KEY
from vllm_steer.steering.store import VectorStore, encode
from vllm_steer.steering.wire import (
    NO_END,
    WIRE_VERSION,
    WireError,
    WirePart,
    WireSteering,
    WireVector,
)

H = 8


def dirs(seed: int, layers=(1, 3)) -> dict[int, np.ndarray]:
    g = np.random.default_rng(seed)
    return {layer: g.standard_normal(H).astype(np.float32) for layer in layers}


def make(tmp_path, mode="all", ops=(("add", 1.5),), inline=False, **kw) -> WireSteering:
    store = VectorStore(tmp_path / "store")
    parts, blobs = [], []
    for k, (op, param) in enumerate(ops):
        d = dirs(k)
        cid = store.put(d)
        parts.append(Part(cid, op, param, tuple(sorted(d))))
        if inline:
            layers, data = encode(d)
            blobs.append(WireVector(content=cid, layers=layers, data=data))
    program = Program(tuple(parts), normalize=False)
    fields = dict(version=WIRE_VERSION, digest=program.digest, hidden=H,
                  parts=tuple(WirePart(content=p.content, op=p.op, param=p.param,
                                       layers=p.layers) for p in parts),
                  normalize=False, mode=mode, start=2, end=NO_END, store=str(store.root),
                  inline=tuple(blobs))
    if mode != "all":
        fields.update(think_start_ids=(7,), think_end_ids=(9, 10))
    fields.update(kw)
    return WireSteering(**fields)


def test_fields_are_named_and_small(tmp_path):
    raw = make(tmp_path, mode="thinking").to_extra_arg()
    assert set(raw) == {"version", "digest", "hidden", "parts", "normalize", "mode", "start",
                        "end", "think_start_ids", "think_end_ids", "store", "inline"}
    assert set(raw["parts"][0]) == {"content", "op", "param", "layers"}
    from vllm.v1.serial_utils import MsgpackEncoder

    # a program, not the vectors: a few hundred bytes whatever the hidden size
    assert sum(len(b) for b in MsgpackEncoder().encode(raw)) < 600


def test_round_trip_through_vllm_msgpack(tmp_path):
    """The multiprocess path: SamplingParams (with the wire in extra_args) encoded and
    decoded by vLLM's own serializer, then rebuilt on the 'worker'."""
    from vllm import SamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    for w in (make(tmp_path, mode="answer"), make(tmp_path, inline=True)):
        sp = SamplingParams(max_tokens=4, extra_args={"steering": {"vectors": []}})
        sp.extra_args[WIRE_KEY] = w.to_extra_arg()
        back = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(sp))
        got = WireSteering.from_extra_arg(back.extra_args[WIRE_KEY])
        assert got == w
        assert got.program().digest == w.digest
        # the in-process path hands the same builtins over by reference
        assert WireSteering.from_extra_arg(sp.extra_args[WIRE_KEY]) == w


@pytest.mark.parametrize("change, field", [
    ({"version": WIRE_VERSION + 1}, "version"),
    ({"mode": "prompt"}, "mode"),            # resolved away on the frontend; never on the wire
    ({"parts": []}, "parts"),
    ({"start": -2}, "start"),
    ({"end": -5}, "end"),
    ({"start": "2"}, "start"),               # types are checked, not coerced
    ({"hidden": True}, "hidden"),
    ({"digest": "abc"}, "digest"),
    ({"store": "", "inline": []}, "store"),
    ({"ts": [7]}, "ts"),                     # unknown fields are refused
    ({"think_start_ids": []}, "think_start_ids"),
    ({"think_end_ids": [-1]}, "think_end_ids"),
])
def test_malformed_wire_is_refused_naming_the_field(tmp_path, change, field):
    raw = {**make(tmp_path, mode="thinking").to_extra_arg(), **change}
    with pytest.raises(WireError) as ei:
        WireSteering.from_extra_arg(raw)
    assert ei.value.field == field, str(ei.value)


@pytest.mark.parametrize("change, field", [
    ({"op": "rotate"}, "parts[0].op"),
    ({"layers": [3, 1]}, "parts[0].layers"),
    ({"layers": [-1, 3]}, "parts[0].layers"),
    ({"layers": [1.0, 3.0]}, "parts"),
    ({"param": float("nan")}, "parts[0].param"),
    ({"content": "xyz"}, "parts[0].content"),
])
def test_malformed_parts_are_refused(tmp_path, change, field):
    raw = make(tmp_path).to_extra_arg()
    raw["parts"] = [{**raw["parts"][0], **change}]
    with pytest.raises(WireError) as ei:
        WireSteering.from_extra_arg(raw)
    assert ei.value.field == field, str(ei.value)


@pytest.mark.parametrize("raw", [None, [], "x", {"version": WIRE_VERSION}])
def test_not_a_wire_at_all(raw):
    with pytest.raises(WireError):
        WireSteering.from_extra_arg(raw)


def test_model_shape_is_checked_on_the_worker(tmp_path):
    w = make(tmp_path)
    w.check_model(num_layers=4, hidden=H)
    with pytest.raises(WireError, match="out of range") as ei:
        w.check_model(num_layers=3, hidden=H)
    assert ei.value.field == "parts"
    with pytest.raises(WireError) as ei:
        w.check_model(num_layers=4, hidden=H + 1)
    assert ei.value.field == "hidden"


def test_the_program_must_match_the_digest(tmp_path):
    good, other = make(tmp_path), make(tmp_path, ops=(("add", 2.0),))
    bad = WireSteering.from_extra_arg({**good.to_extra_arg(), "digest": other.digest})
    with pytest.raises(WireError, match="does not match") as ei:
        bad.program()
    assert ei.value.field == "digest"


def test_intake_reads_the_store_once_and_checks_inline_content(tmp_path):
    w = make(tmp_path, ops=(("add", 1.5), ("ablate", 0.5)))
    intake = Intake(num_layers=4, hidden=H, max_projections=1)
    c = intake.composed(w)
    assert c.layers == (1, 3) and c.num_projections == 1
    np.testing.assert_allclose(c.add[0], 1.5 * dirs(0)[1], rtol=1e-6)
    assert intake.composed(w) is c and intake.stats["store_reads"] == 2  # two vectors, once
    # a vector missing from the store (another machine) is a named error, never unsteered
    lost = make(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "store").rename(tmp_path / "gone")
    with pytest.raises(WireError, match="not in the store") as ei:
        Intake(4, H, 1).composed(lost)
    assert ei.value.field == "parts"
    # inline content is checked against its id
    inl = make(tmp_path, inline=True)
    assert Intake(4, H, 1).composed(inl).layers == (1, 3)
    raw = inl.to_extra_arg()
    raw["inline"][0]["data"] = bytes(len(raw["inline"][0]["data"]))
    with pytest.raises(WireError, match="does not match") as ei:
        Intake(4, H, 1).composed(WireSteering.from_extra_arg(raw))
    assert ei.value.field == "inline[0].content"


def test_slot_table_takes_a_live_digest_without_its_content(tmp_path):
    t = SlotTable(num_layers=4, num_slots=3, hidden=H, dtype=torch.float32,
                  device=torch.device("cpu"), max_projections=1)
    w = make(tmp_path)
    c = Intake(4, H, 1).composed(w)
    assert not t.is_live(w.digest)
    with pytest.raises(ValueError, match="does not hold"):
        t.acquire(w.digest, None)
    t.acquire(w.digest, c)
    t.acquire(w.digest, None)
    t.release(w.digest)
    assert t.is_live(w.digest)
    t.release(w.digest)
    assert not t.is_live(w.digest)

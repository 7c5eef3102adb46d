"""The typed wire form of a resolved steering (``steering.wire``): what travels from the
frontend to the workers in ``SamplingParams.extra_args``, and the worker's refusal of a
malformed one. The round trip goes through vLLM's own msgpack encoder (the multiprocess
transport); the engine tests cover both transports end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_steer.steering.slots import SlotTable
from vllm_steer.steering.spec import WIRE_KEY
from vllm_steer.steering.wire import (
    NO_END,
    WIRE_VERSION,
    WireError,
    WireSteering,
    content_digest,
)

H = 8


def make(layers=(1, 3), mode="all", **kw) -> WireSteering:
    delta = np.arange(len(layers) * H, dtype=np.float32).reshape(len(layers), H) / 7
    fields = dict(version=WIRE_VERSION, digest=content_digest(tuple(layers), delta),
                  layers=tuple(layers), hidden=H, delta=delta.tobytes(), mode=mode,
                  start=2, end=NO_END)
    if mode != "all":
        fields.update(think_start_ids=(7,), think_end_ids=(9, 10))
    fields.update(kw)
    return WireSteering(**fields)


def test_fields_are_named_and_typed():
    raw = make(mode="thinking").to_extra_arg()
    assert set(raw) == {"version", "digest", "layers", "hidden", "delta", "mode", "start",
                        "end", "think_start_ids", "think_end_ids"}
    assert isinstance(raw["delta"], bytes)


def test_round_trip_through_vllm_msgpack():
    """The multiprocess path: SamplingParams (with the wire in extra_args) encoded and
    decoded by vLLM's own serializer, then rebuilt on the 'worker'."""
    from vllm import SamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    w = make(mode="answer")
    sp = SamplingParams(max_tokens=4, extra_args={"steering": {"vectors": []}})
    sp.extra_args[WIRE_KEY] = w.to_extra_arg()
    back = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(sp))
    got = WireSteering.from_extra_arg(back.extra_args[WIRE_KEY])
    assert got == w
    np.testing.assert_array_equal(got.verify_content(), w.delta_array())
    # the in-process path hands the same builtins over by reference
    assert WireSteering.from_extra_arg(sp.extra_args[WIRE_KEY]) == w


@pytest.mark.parametrize("change, field", [
    ({"version": WIRE_VERSION + 1}, "version"),
    ({"mode": "prompt"}, "mode"),            # resolved away on the frontend; never on the wire
    ({"delta": b"\0" * 12}, "delta"),        # not len(layers) * hidden * 4 bytes
    ({"delta": None}, "delta"),
    ({"layers": [3, 1]}, "layers"),
    ({"layers": [-1, 3]}, "layers"),
    ({"start": -2}, "start"),
    ({"end": -5}, "end"),
    ({"start": "2"}, "start"),               # types are checked, not coerced
    ({"layers": [1.0, 3.0]}, "layers"),
    ({"hidden": True}, "hidden"),
    ({"digest": "abc"}, "digest"),
    ({"ts": [7]}, "ts"),                     # unknown fields are refused
    ({"think_start_ids": []}, "think_start_ids"),
    ({"think_end_ids": [-1]}, "think_end_ids"),
])
def test_malformed_wire_is_refused_naming_the_field(change, field):
    raw = {**make(mode="thinking").to_extra_arg(), **change}
    with pytest.raises(WireError) as ei:
        WireSteering.from_extra_arg(raw)
    assert ei.value.field == field, str(ei.value)


@pytest.mark.parametrize("raw", [None, [], "x", {"version": WIRE_VERSION}])
def test_not_a_wire_at_all(raw):
    with pytest.raises(WireError):
        WireSteering.from_extra_arg(raw)


def test_model_shape_is_checked_on_the_worker():
    w = make(layers=(1, 3))
    w.check_model(num_layers=4, hidden=H)
    with pytest.raises(WireError, match="out of range") as ei:
        w.check_model(num_layers=3, hidden=H)
    assert ei.value.field == "layers"
    with pytest.raises(WireError) as ei:
        w.check_model(num_layers=4, hidden=H + 1)
    assert ei.value.field == "hidden"


def test_content_must_match_the_digest_and_be_finite():
    good = make()
    other = make(layers=(0, 2))
    with pytest.raises(WireError, match="does not match") as ei:
        WireSteering.from_extra_arg({**good.to_extra_arg(), "digest": other.digest}
                                    ).verify_content()
    assert ei.value.field == "digest"
    nan = np.full((2, H), np.nan, dtype=np.float32)
    bad = make(delta=nan.tobytes(), digest=content_digest((1, 3), nan))
    with pytest.raises(WireError, match="non-finite"):
        bad.verify_content()


def test_slot_table_takes_a_known_digest_without_its_delta():
    """What lets a later wire version send only the digest of a vector a worker holds."""
    t = SlotTable(num_layers=4, num_slots=3, hidden=H, dtype=torch.float32,
                  device=torch.device("cpu"))
    w = make()
    assert not t.is_live(w.digest)
    with pytest.raises(ValueError, match="does not hold"):
        t.acquire(w.digest, w.layers, None)
    t.acquire(w.digest, w.layers, torch.from_numpy(w.verify_content()))
    t.acquire(w.digest, w.layers, None)
    t.release(w.digest)
    assert t.is_live(w.digest)
    t.release(w.digest)
    assert not t.is_live(w.digest)

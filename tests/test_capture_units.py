"""Hidden-state capture without an engine: the option's parsing (errors name the field),
its resolution against model and prompt, the wire form, and the worker's book (which
rows of a flattened batch it takes, chunked prefill, preemption, mean, collection),
plus the extraction plan that reads many prompts from carrier requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_steer.extract.engine_hidden import plan_last_token
from vllm_steer.steering import capture as capture_mod
from vllm_steer.steering.capture import CaptureBook
from vllm_steer.steering.capture_spec import (
    WIRE_CAPTURE_KEY,
    CaptureSpec,
    WireCapture,
    first_captured_position,
)
from vllm_steer.steering.options import EngineOptions, OptionError
from vllm_steer.steering.values import SpecError

H = 4


def resolve(raw, prompt_len=10, num_layers=6, max_bytes=1 << 20):
    return CaptureSpec.parse(raw).resolve(prompt_len, num_layers, max_bytes, H)


@pytest.mark.parametrize("raw, field, message", [
    ([], "capture", "must be an object"),
    ("{not json", "capture", "malformed JSON"),
    ({"layers": [1]}, "capture.id", "required"),
    ({"id": ""}, "capture.id", "required"),
    ({"id": "x" * 300}, "capture.id", "longer than"),
    ({"id": "a", "where": 1}, "capture.where", "unknown field"),
    ({"id": "a", "at": "first"}, "capture.at", "not one of"),
    ({"id": "a", "layers": []}, "capture.layers", "non-empty"),
    ({"id": "a", "layers": [1, 1]}, "capture.layers", "repeat"),
    ({"id": "a", "layers": [-1]}, "capture.layers", "negative"),
    ({"id": "a", "at": "mean", "start": -2}, "capture.start", ">= 0"),
    ({"id": "a", "at": "tokens", "start": 4, "end": 4}, "capture.end", "greater than start"),
    ({"id": "a", "at": "tokens", "start": 1.5}, "capture.start", "integer"),
    ({"id": "a", "at": "last", "start": 1}, "capture.start", "applies to at 'mean'"),
    ({"id": "a", "at": "positions"}, "capture.positions", "non-empty list"),
    ({"id": "a", "at": "positions", "positions": ["1"]}, "capture.positions", "integer"),
    ({"id": "a", "at": "mean", "positions": [1]}, "capture.positions", "applies to"),
])
def test_bad_options_name_the_field(raw, field, message):
    with pytest.raises(SpecError) as e:
        CaptureSpec.parse(raw)
    assert e.value.field == field and message in e.value.message


@pytest.mark.parametrize("raw, field, message", [
    ({"id": "a", "layers": [6]}, "capture.layers", "out of range"),
    ({"id": "a", "at": "tokens", "end": 11}, "capture.end", "past the prompt"),
    ({"id": "a", "at": "mean", "start": 10}, "capture.start", "no prompt position"),
    ({"id": "a", "at": "positions", "positions": [10]}, "capture.positions", "outside the prompt"),
    ({"id": "a", "at": "positions", "positions": [-11]}, "capture.positions", "outside"),
])
def test_resolution_refuses_what_the_prompt_or_model_lacks(raw, field, message):
    with pytest.raises(SpecError) as e:
        resolve(raw)
    assert e.value.field == field and message in e.value.message


def test_a_capture_larger_than_the_limit_is_refused_up_front():
    raw = {"id": "a", "at": "tokens"}               # 10 positions x 6 layers x 4 floats
    assert resolve(raw, max_bytes=10 * 6 * H * 4).num_rows == 10
    with pytest.raises(SpecError, match="capture_max_bytes") as e:
        resolve(raw, max_bytes=10 * 6 * H * 4 - 1)
    assert e.value.field == "capture"


def test_resolution_gives_absolute_positions():
    w = resolve({"id": "a", "layers": [2, 0], "at": "last"})
    assert (w.layers, w.mode, w.start, w.end, w.positions) == ((0, 2), "tokens", 9, 10, (9,))
    w = resolve({"id": "a", "at": "positions", "positions": [-1, 3, 3, 0]})
    assert w.positions == (0, 3, 9) and (w.start, w.end) == (0, 10) and w.layers == tuple(range(6))
    w = resolve({"id": "a", "at": "mean", "start": 2})
    assert (w.mode, w.start, w.end, w.positions, w.num_rows) == ("mean", 2, 10, None, 1)
    w = resolve('{"id": "a", "at": "tokens", "start": 2, "end": 5}')
    assert (w.mode, w.start, w.end, w.positions, w.num_rows) == ("tokens", 2, 5, None, 3)


def test_wire_round_trip_and_malformed_wire():
    w = resolve({"id": "a", "at": "positions", "positions": [1, 4]})
    raw = w.to_extra_arg()
    assert WireCapture.from_extra_arg(raw) == w
    assert first_captured_position({WIRE_CAPTURE_KEY: raw}) == 1
    assert first_captured_position({"capture": {}}) is None
    for bad in ({**raw, "v": 99}, {**raw, "positions": [4, 1]}, {**raw, "mode": "x"},
                {k: v for k, v in raw.items() if k != "layers"}, {**raw, "start": 5}):
        with pytest.raises(ValueError, match=WIRE_CAPTURE_KEY):
            WireCapture.from_extra_arg(bad)


def test_engine_options():
    assert EngineOptions.from_vllm_config(None).capture is True
    opts = EngineOptions.from_vllm_config(type("C", (), {"additional_config": {
        "vllm_steer": {"capture": False, "capture_max_bytes": 1024}}})())
    assert (opts.capture, opts.capture_max_bytes) == (False, 1024)
    for bad in ({"capture": "yes"}, {"capture_max_bytes": 0}, {"capture_pending_bytes": True}):
        with pytest.raises(OptionError, match=next(iter(bad))):
            EngineOptions.from_vllm_config(type("C", (), {"additional_config": {
                "vllm_steer": bad}})())


# -- the worker's book ------------------------------------------------------------------------
def stream_of(positions_by_req: list[list[int]], layer: int) -> torch.Tensor:
    """A flattened batch whose row for (request r, position p) at ``layer`` holds a value
    identifying it: [r, p, layer, 1]."""
    rows = [[r, p, layer, 1.0] for r, ps in enumerate(positions_by_req) for p in ps]
    return torch.tensor(rows, dtype=torch.float32)


def step(book, reqs, sched, computed, layers=(0, 1, 2)):
    """Plan one step and run the op on each layer like the adapters do."""
    book.plan(reqs, np.array(sched), np.array(computed))
    positions = [list(range(c, c + n)) for n, c in zip(sched, computed, strict=True)]
    for layer in layers:
        s = stream_of(positions, layer)
        # residual_pair layers hand over (hidden, residual): their sum is the stream
        capture_mod.capture_op(s / 2, s / 2, layer, torch.zeros(1))


def test_book_takes_the_right_rows_across_chunks_and_batches():
    book = CaptureBook(num_layers=3, hidden=H)
    wa = resolve({"id": "a", "layers": [0, 2], "at": "positions", "positions": [1, 5, 8]})
    wb = resolve({"id": "b", "layers": [1], "at": "tokens", "start": 3, "end": 7}, prompt_len=12)
    book.add_request("ra", wa)
    book.add_request("rb", wb)
    # step 1: "x" (no capture) first, then chunks of both requests
    step(book, ["x", "ra", "rb"], [2, 4, 5], [0, 0, 0])
    assert [e.complete for e in book.entries.values()] == [False, False]
    step(book, ["rb", "ra"], [7, 6], [5, 4])
    got = book.take(["a", "b", "missing"])
    assert set(got) == {"a", "b"}
    a, b = got["a"], got["b"]
    assert a["complete"] and b["complete"] and a["error"] is None
    # a stream row holds [batch index in the step that computed it, position, layer, 1]
    va = np.frombuffer(a["values"], np.float32).reshape(a["shape"])
    vb = np.frombuffer(b["values"], np.float32).reshape(b["shape"])
    assert a["positions"] == [1, 5, 8] and b["positions"] == [3, 4, 5, 6]
    np.testing.assert_allclose(va, [[[1, p, layer, 1] for p in (1, 5, 8)] for layer in (0, 2)])
    np.testing.assert_allclose(vb, [[[2, 3, 1, 1], [2, 4, 1, 1], [0, 5, 1, 1], [0, 6, 1, 1]]])
    assert book.take(["a"]) == {}   # collected once


def test_book_mean_chunked_and_recomputed_after_preemption():
    book = CaptureBook(num_layers=3, hidden=H)
    w = resolve({"id": "m", "layers": [2], "at": "mean", "start": 2, "end": 9}, prompt_len=12)
    book.add_request("r", w)
    step(book, ["r"], [4], [0])
    step(book, ["r"], [3], [4])
    # preempted: recomputed from position 0 (values identical); counted once
    step(book, ["r"], [12], [0])
    rec = book.take(["m"])["m"]
    vals = np.frombuffer(rec["values"], np.float32).reshape(rec["shape"])
    assert rec["count"] == 7 and rec["complete"]
    np.testing.assert_allclose(vals, [[0, np.mean(range(2, 9)), 2, 1]], rtol=1e-6)


def test_book_without_captures_plans_nothing_and_the_op_is_inert():
    book = CaptureBook(num_layers=3, hidden=H)
    book.plan(["x"], np.array([3]), np.array([0]))
    assert book.step == [] and capture_mod._ACTIVE is None
    capture_mod.capture_op(torch.ones(3, H), None, 0, torch.zeros(1))  # no error, no state
    assert book.summary()["capture_pending"] == 0


def test_book_drops_uncollected_finished_captures_beyond_its_bound():
    w = resolve({"id": "a", "layers": [0], "at": "tokens"}, prompt_len=4)
    book = CaptureBook(num_layers=3, hidden=H, pending_limit_bytes=2 * 4 * H * 4)
    for k in range(3):
        book.add_request(f"r{k}", WireCapture(f"c{k}", w.layers, w.mode, w.start, w.end))
        step(book, [f"r{k}"], [4], [0], layers=(0,))
        book.finish_requests([f"r{k}"])
    assert book.stats["dropped_uncollected"] == 1 and set(book.entries) == {"c1", "c2"}


def test_carrier_plan_reads_every_prompt_once():
    rows = [[1, 2, 3], [1, 2], [1, 2, 3, 4], [5, 6], [1, 2]]
    plan = plan_last_token(rows, [3, 1])
    assert plan.layers == [1, 3]
    caps = [r.capture for r in plan.requests]
    assert [r.prompt for r in plan.requests] == [[1, 2, 3, 4], [5, 6]]
    assert caps[0]["positions"] == [1, 2, 3] and caps[1]["positions"] == [1]
    # fake records: value = (prompt carried, position)
    recs = []
    for req in plan.requests:
        pos = req.capture["positions"]
        v = np.array([[[req.prompt[0], p] for p in pos]] * 2, dtype=np.float32)
        recs.append({"values": v})
    out = plan.assemble(recs)
    np.testing.assert_array_equal(out[1].numpy(), [[1, 2], [1, 1], [1, 3], [5, 1], [1, 1]])
    flat = plan_last_token(rows, [0], share_prefix=False)
    assert len(flat.requests) == 5

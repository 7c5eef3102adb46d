"""GPU readiness without vLLM: the steering hot path inside a captured CUDA graph.

vLLM replays CUDA graphs captured once; steering must then work by updating preallocated
tensors in place: the per-layer slot tables (``SlotTable``) and the per-token row index.
Here a stack of layers with the real adapters (``steering.layers.attach``) is captured in
a CUDA graph, then replayed after new vectors were uploaded into the tables and new rows
copied host -> device (non-blocking, from pinned memory, as the runner does); every replay
must equal an eager forward with the same tables and rows. Slots exercise addition,
ablation (the projection tables) and the norm restore. Skips without CUDA; the CPU
variant checks the same in-place protocol without a graph (so the test itself runs here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vllm_steer.steering.layers import AdapterKind, attach
from vllm_steer.steering.program import Composed
from vllm_steer.steering.slots import SlotTable

HIDDEN, LAYERS, MAX_TOKENS = 64, 3, 16


class _PairLayer(nn.Module):
    """A decoder layer in vLLM's deferred-residual form: returns ``(hidden, residual)``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(self.proj(residual)), residual


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_PairLayer() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return hidden + residual


def _setup(device: torch.device):
    torch.manual_seed(0)
    model = _Stack().to(device)
    slots = SlotTable(LAYERS, 5, HIDDEN, torch.float32, device, max_projections=1)
    rows = torch.zeros(MAX_TOKENS, dtype=torch.long, device=device)
    for i, layer in enumerate(model.layers):
        attach(layer, AdapterKind.RESIDUAL_PAIR, slots.layer(i), rows)
    host_rows = torch.zeros(MAX_TOKENS, dtype=torch.long,
                            pin_memory=device.type == "cuda")
    return model, slots, rows, host_rows


def _upload(slots: SlotTable, digest: str, seed: int) -> int:
    """A program-like slot: an additive delta on every layer, plus (odd seeds) an ablation of
    half the component along a unit direction and the norm restored."""
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(LAYERS, 1, HIDDEN, generator=g), dim=-1)
    project = seed % 2 == 1
    composed = Composed(tuple(range(LAYERS)), torch.randn(LAYERS, HIDDEN, generator=g).numpy(),
                        (unit if project else torch.zeros_like(unit)).numpy(),
                        np.full((LAYERS, 1), 0.5 if project else 0.0, dtype=np.float32),
                        np.zeros((LAYERS, 1), dtype=np.float32), project)
    slots.acquire(digest, composed)
    return slots.slot_for(digest, {digest})


def _set_rows(rows: torch.Tensor, host: torch.Tensor, values: list[int]) -> None:
    host.zero_()
    host[: len(values)] = torch.tensor(values)
    rows.copy_(host, non_blocking=True)


def _reference(model: _Stack, x: torch.Tensor, slots: SlotTable, values: list[int]):
    """Eager forward without the wrappers: the slot's ops applied by hand, per token."""
    hidden, residual = x, None
    idx = torch.tensor(values + [0] * (x.shape[0] - len(values)), device=x.device)
    for i, layer in enumerate(model.layers):
        hidden, residual = layer._vllm_steer_forward(hidden, residual)
        h0 = hidden + residual
        r = slots.proj_dir[i][idx, 0]
        a, b = slots.proj_a[i][idx, 0], slots.proj_b[i][idx, 0]
        h = h0 + (b - a * (h0 * r).sum(-1))[:, None] * r + slots.tables[i][idx]
        flag = slots.norm[idx][:, None]
        h = torch.where(flag > 0, h * h0.norm(dim=-1, keepdim=True) / h.norm(dim=-1, keepdim=True),
                        h)
        hidden, residual = torch.zeros_like(h), h
    return hidden + residual


def _rounds(slots: SlotTable):
    """(rows per token, vectors to upload first): new rows and new table contents each time."""
    yield [0] * MAX_TOKENS, []
    yield [1, 1, 0, 2] + [0] * 12, [("a", 1), ("b", 2)]
    yield [2, 0, 0, 1] + [1] * 12, []
    slots.release("a")  # slot 1 is freed and refilled with another vector
    yield [1] * MAX_TOKENS, [("c", 3)]


def _check(run, model, slots, rows, host, x) -> int:
    seen = 0
    for values, uploads in _rounds(slots):
        for digest, seed in uploads:
            _upload(slots, digest, seed)
        _set_rows(rows, host, values)
        got = run()
        want = _reference(model, x, slots, values)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        seen += int(any(values))
    return seen


def test_in_place_protocol_on_cpu():
    model, slots, rows, host = _setup(torch.device("cpu"))
    x = torch.randn(MAX_TOKENS, HIDDEN)
    with torch.no_grad():
        assert _check(lambda: model(x), model, slots, rows, host, x) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hot_path_in_a_cuda_graph_equals_eager():
    dev = torch.device("cuda")
    model, slots, rows, host = _setup(dev)
    x = torch.randn(MAX_TOKENS, HIDDEN, device=dev)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as vLLM does
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)

        def replay() -> torch.Tensor:
            graph.replay()
            torch.cuda.synchronize()
            return out.clone()

        assert _check(replay, model, slots, rows, host, x) == 3


# -- conditions: device targets inside a CUDA graph ----------------------------------------------
def _cond_setup(device: torch.device, host_planned: bool):
    """A stack whose layers accumulate conditions (``steering.condition_table``) and steer
    nothing (every row 0)."""
    from vllm_steer.steering.condition_table import ConditionTable

    torch.manual_seed(0)
    model = _Stack().to(device)
    slots = SlotTable(LAYERS, 5, HIDDEN, torch.float32, device, max_projections=1)
    rows = torch.zeros(MAX_TOKENS, dtype=torch.long, device=device)
    table = ConditionTable(LAYERS, 4, HIDDEN, device, MAX_TOKENS, host_planned=host_planned)
    for i, layer in enumerate(model.layers):
        kw = ({"cond_acc": table.acc, "cond_planned": True, "cond_layer": i} if host_planned
              else {"cond_acc": table.acc, "cond_targets": table.targets[i]})
        attach(layer, AdapterKind.RESIDUAL_PAIR, slots.layer(i), rows, **kw)
    return model, table


def _block_outputs(model: _Stack, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output stream (hidden + residual), eager, without the wrappers."""
    out, hidden, residual = [], x, None
    for layer in model.layers:
        hidden, residual = layer._vllm_steer_forward(hidden, residual)
        out.append(hidden + residual)
    return out


def _check_conditions(run, model, table, x_in: torch.Tensor) -> None:
    """Two requests over two steps: ``a`` (a mean condition at layer 1, split 10) in
    chunks of 8 and 2 at different rows, ``b`` (a last condition at layer 2, split 5) in
    one chunk; each step's batch is fresh random states. The rows and decisions equal the
    reference summed from eager block outputs."""
    from tests.cond_reference import cast_score_ref
    from vllm_steer.steering.wire import WireCondition, WireGate

    def gate(layer, agg, split):
        return WireGate(conditions=(WireCondition(content="0" * 64, layer=layer, aggregate=agg,
                                                  threshold=0.0, compare="above", label="c"),),
                        mode="all", split=split, report="r")

    g = torch.Generator().manual_seed(5)
    dirs = {layer: torch.randn(HIDDEN, generator=g) for layer in (1, 2)}
    a = table.add("a", gate(1, "mean", 10), [dirs[1].numpy()])
    b = table.add("b", gate(2, "last", 5), [dirs[2].numpy()])
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for plan in ([(a, 0, 0, 8), (b, 8, 0, 5)], [(a, 3, 8, 2)]):
        table.begin_step()
        for req, offset, first, n in plan:
            table.plan(req, offset, first, n)
        table.end_step()
        x_in.copy_(torch.randn(MAX_TOKENS, HIDDEN, generator=g).to(x_in.device))
        run()
        outs = _block_outputs(model, x_in)
        for req, offset, _, n in plan:
            layer = 1 if req is a else 2
            seen[req.req_id].append(outs[layer][offset:offset + n].cpu())
    table.begin_step()      # scores the prompts the last forward completed
    for req, layer, agg in ((a, 1, "mean"), (b, 2, "last")):
        states = torch.cat(seen[req.req_id]).double()
        h = states.mean(0) if agg == "mean" else states[-1]
        got = table.report(req)["conditions"][0]["score"]
        assert got == pytest.approx(cast_score_ref(h.numpy(), dirs[layer].double().numpy()),
                                    abs=1e-5)
        s_row, l_row = (table.acc_row(req.slot, 0, last) for last in (False, True))
        torch.testing.assert_close(table.acc[l_row].cpu(), states[-1].float(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(table.acc[s_row].cpu(), states[:-1].sum(0).float(),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("host_planned", [False, True], ids=["device-targets", "host-planned"])
def test_conditions_protocol_on_cpu(host_planned):
    model, table = _cond_setup(torch.device("cpu"), host_planned)
    x = torch.zeros(MAX_TOKENS, HIDDEN)
    with torch.no_grad():
        _check_conditions(lambda: model(x), model, table, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_condition_targets_in_a_cuda_graph_equal_eager():
    """What an engine with CUDA graphs runs (device targets, refilled in place from pinned
    memory before each replay)."""
    dev = torch.device("cuda")
    model, table = _cond_setup(dev, host_planned=False)
    x = torch.zeros(MAX_TOKENS, HIDDEN, device=dev)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)

        def replay() -> None:
            graph.replay()
            torch.cuda.synchronize()

        _check_conditions(replay, model, table, x)

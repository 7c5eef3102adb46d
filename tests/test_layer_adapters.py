"""Layer adapters: explicit matching, refusal of unknown layers, the forced opt-in.

Unit tests use stand-in classes named like vLLM's (matching is by class name, so no vLLM
layer needs building); the engine tests serve a Llama whose layer class overrides
``forward`` (tests/odd_layer_engine.py, in a subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vllm_steer.steering.layers import (
    ADAPTERS,
    AdapterKind,
    LayerOutputError,
    UnsupportedLayerError,
    attach,
    decoder_layers,
    plan_layers,
)
from vllm_steer.steering.slots import LayerTables

LLAMA = "vllm.model_executor.models.llama"


def _named(cls: type, module: str, qualname: str) -> type:
    cls.__module__, cls.__qualname__, cls.__name__ = module, qualname, qualname
    return cls


class _PairLayer(nn.Module):
    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return hidden * 0.5, residual


LlamaLike = _named(type("L", (_PairLayer,), {}), LLAMA, "LlamaDecoderLayer")


class _Model(nn.Module):
    def __init__(self, layer_cls: type, n: int = 3, module: str | None = None) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(layer_cls() for _ in range(n))
        if module:
            type(self).__module__ = module


def test_table_entries_are_vllm_classes_with_known_kinds():
    assert all(k.startswith("vllm.model_executor.models.") for k in ADAPTERS)
    assert set(ADAPTERS.values()) <= set(AdapterKind)


def test_known_layer_matches_and_inherited_forward_too():
    plan = plan_layers(_Model(LlamaLike), 3)
    assert plan.kind is AdapterKind.RESIDUAL_PAIR and not plan.forced
    assert plan.path == "model.layers" and len(plan.layers) == 3
    child = type("Child", (LlamaLike,), {})  # same forward: same semantics
    assert plan_layers(_Model(child), 3).kind is AdapterKind.RESIDUAL_PAIR


def test_subclass_with_own_forward_is_refused_naming_the_class():
    odd = type("OddLayer", (LlamaLike,), {"forward": lambda self, *a: a[1]})
    with pytest.raises(UnsupportedLayerError, match="OddLayer") as ei:
        plan_layers(_Model(odd), 3)
    assert "ADAPTERS" in str(ei.value) and "layer_adapter" in str(ei.value)


def test_unknown_layer_is_refused_unless_forced():
    unknown = type("Mystery", (_PairLayer,), {})
    with pytest.raises(UnsupportedLayerError, match="Mystery"):
        plan_layers(_Model(unknown), 3)
    plan = plan_layers(_Model(unknown), 3, force_kind="residual_pair")
    assert plan.forced and plan.kind is AdapterKind.RESIDUAL_PAIR
    with pytest.raises(UnsupportedLayerError, match="not one of"):
        plan_layers(_Model(unknown), 3, force_kind="sideways")


def test_transformers_backend_layers_get_the_batched_adapter():
    hf_layer = _named(type("H", (nn.Module,), {"forward": lambda self, x: x}),
                      "transformers.models.olmo2.modeling_olmo2", "Olmo2DecoderLayer")
    backend = type("TransformersForCausalLM", (_Model,), {})
    backend.__module__ = "vllm.model_executor.models.transformers"
    assert plan_layers(backend(hf_layer), 3).kind is AdapterKind.HF_BATCHED
    # the same HF layer class outside the backend is not matched
    with pytest.raises(UnsupportedLayerError):
        plan_layers(_Model(hf_layer), 3)


def test_layer_list_must_have_the_configured_length():
    with pytest.raises(UnsupportedLayerError, match="decoder-block list of 4"):
        plan_layers(_Model(LlamaLike), 4)
    assert decoder_layers(_Model(LlamaLike))[0] == "model.layers"


def test_pipeline_placeholders_are_skipped():
    m = _Model(LlamaLike)
    m.model.layers[0] = _named(type("P", (nn.Module,), {}), "vllm.model_executor.models.utils",
                               "PPMissingLayer")()
    plan = plan_layers(m, 3)
    assert plan.layers[0] is None and plan.layers[1] is not None


def _attach(layer: nn.Module, kind: str, n_tokens: int = 4, hidden: int = 8):
    table = torch.arange(3 * hidden, dtype=torch.float32).reshape(3, hidden)
    rows = torch.tensor([1, 0, 2, 1] + [0] * 8)
    attach(layer, AdapterKind(kind), LayerTables(table, None, None, None, None), rows)
    return table[rows[:n_tokens]]


def test_residual_pair_adds_to_the_residual_only():
    layer = _PairLayer()
    delta = _attach(layer, "residual_pair")
    h = torch.ones(4, 8)
    hidden, residual = layer(None, h, None)
    assert torch.equal(hidden, h * 0.5) and torch.equal(residual, h + delta)


def test_stream_kinds_add_to_the_stream():
    stream = type("S", (nn.Module,), {"forward": lambda self, x: x + 1})()
    delta = _attach(stream, "stream")
    x = torch.zeros(4, 8)
    assert torch.equal(stream(x), 1 + delta)
    first = type("F", (nn.Module,), {"forward": lambda self, x: (x + 1, x)})()
    delta = _attach(first, "stream_first")
    out, leftover = first(x)
    assert torch.equal(out, 1 + delta) and torch.equal(leftover, x)
    batched = type("B", (nn.Module,), {"forward": lambda self, x: (x,)})()
    delta = _attach(batched, "hf_batched")
    (out,) = batched(torch.zeros(1, 4, 8))
    assert torch.equal(out[0], delta)


@pytest.mark.parametrize("host_planned", [False, True], ids=["device-targets", "host-planned"])
def test_condition_reading_sums_the_steered_block_output(host_planned):
    """Both ways of accumulating a condition (``steering.condition_table``) read the block
    output after steering (hidden + residual for a pair layer) of the planned prompt
    positions only: a request at flattened rows 1..3 (positions 0..2, split 3)."""
    from vllm_steer.steering.condition_table import ConditionTable
    from vllm_steer.steering.wire import WireCondition, WireGate

    layers = [_PairLayer() for _ in range(2)]
    table = ConditionTable(2, 3, 8, torch.device("cpu"), 16, host_planned=host_planned)
    steer = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    rows = torch.tensor([1, 0, 2, 1] + [0] * 8)
    for i, layer in enumerate(layers):
        attach(layer, AdapterKind("residual_pair"), LayerTables(steer, None, None, None, None),
               rows, **({"cond_acc": table.acc, "cond_planned": True, "cond_layer": i}
                        if host_planned else
                        {"cond_acc": table.acc, "cond_targets": table.targets[i]}))
    gate = WireGate(conditions=(WireCondition(content="0" * 64, layer=1, aggregate="mean",
                                              threshold=0.0, compare="above", label="c"),),
                    mode="all", split=3, report="r")
    req = table.add("r", gate, [torch.ones(8).numpy()])
    table.begin_step()
    table.plan(req, 1, 0, 3)
    table.end_step()
    h = torch.randn(4, 8)
    hidden, residual = layers[0](None, h, None)
    hidden, residual = layers[1](None, hidden, residual)
    out = hidden + residual                      # the block output the condition reads
    s_row, l_row = (table.acc_row(req.slot, 0, last) for last in (False, True))
    assert torch.allclose(table.acc[s_row], out[1:3].sum(0))
    assert torch.allclose(table.acc[l_row], out[3])
    others = [r for r in range(table.acc.shape[0]) if r not in (0, s_row, l_row)]
    assert not table.acc[others].any()


@pytest.mark.parametrize("kind, out", [
    ("residual_pair", torch.zeros(4, 8)),                  # no residual returned
    ("residual_pair", (torch.zeros(4, 8), None)),          # first layer style, wrong here
    ("stream", (torch.zeros(4, 8), torch.zeros(4, 8))),     # a pair where a tensor was expected
    ("stream_first", torch.zeros(4, 8)),
    ("hf_batched", torch.zeros(4, 8)),                     # no batch dimension
    ("hf_batched", torch.zeros(2, 4, 8)),                  # a batch dimension of 2
])
def test_unexpected_returns_are_refused_not_guessed(kind, out):
    layer = type("X", (nn.Module,), {"forward": lambda self: out})()
    _attach(layer, kind)
    with pytest.raises(LayerOutputError, match=kind):
        layer()


# -- a real engine with a layer class no adapter knows -----------------------------------------
@pytest.fixture(scope="module")
def odd_model(default_model_dir, tmp_path_factory):
    from vllm_steer.fixtures.tiny_models import build_tiny_model

    src = build_tiny_model("llama", default_model_dir)
    dst = tmp_path_factory.mktemp("odd") / "model"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["OddLlamaForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, src


def _serve(model_dir: Path, adapter: str | None, cases: list[dict], registry: Path) -> str:
    script = Path(__file__).with_name("odd_layer_engine.py")
    env = {**os.environ, "PROMPTS_JSON": json.dumps(cases), "VLLMSTEER_REGISTRY": str(registry),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(script), str(model_dir)] + ([adapter] if adapter
                         else []), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return next(line for line in res.stdout.splitlines()
                if line.startswith(("REFUSED", "TOKENS")))


@pytest.mark.engine
def test_engine_with_unknown_layer_is_refused_then_forced(odd_model, tmp_path):
    from tests.arch_check import Case, check_against_hf, write_vectors
    from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS

    model_dir, llama_dir = odd_model
    reg = write_vectors(tmp_path, HIDDEN, LAYERS)
    line = _serve(model_dir, None, [], reg)
    assert line.startswith("REFUSED UnsupportedLayerError"), line
    assert "OddDecoderLayer" in line and "OddLlamaForCausalLM" in line and "ADAPTERS" in line

    # the documented opt-in: the odd layer computes Llama's math, so forcing the
    # residual_pair adapter steers it exactly like HF's Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    cases = [Case(prompt, [("a", 1.0)]), Case(prompt, [])]
    line = _serve(model_dir, "residual_pair",
                  [{"prompt": c.prompt, "spec": c.spec} for c in cases], reg)
    assert line.startswith("TOKENS"), line
    got = json.loads(line.split(" ", 1)[1])

    class _Out:  # the shape check_against_hf reads
        def __init__(self, toks, lps):
            comp = type("C", (), {})()
            comp.token_ids = toks
            comp.logprobs = [{t: type("L", (), {"logprob": lp})()} for t, lp in zip(toks, lps,
                                                                                     strict=True)]
            self.outputs = [comp]

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    rep = check_against_hf(hf, reg, cases, [_Out(*g) for g in got], LAYERS, HIDDEN)
    assert rep.steered_effect > 0.5 and got[0][0] != got[1][0]

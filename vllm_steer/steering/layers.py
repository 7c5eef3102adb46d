"""Where the residual stream is: decoder-layer discovery and explicit layer adapters.

Steering layer ``i`` adds to the residual stream after decoder block ``i`` (HF
``hidden_states[i + 1]``). How that stream is formed from what a block *returns* differs
between model implementations, so it is never inferred from the return value's shape:
each decoder-layer class is matched against an explicit table (``ADAPTERS``), like vLLM's
LoRA ``can_replace_layer``. A layer class that matches nothing is refused when the engine
starts (``UnsupportedLayerError``), naming the class and what to add.

Adapter kinds (``AdapterKind``):

``residual_pair``
    vLLM defers the residual add: the block returns ``(hidden, residual)`` and the stream
    is ``hidden + residual`` (the next block or the final norm adds them). The delta goes
    into ``residual``. Llama, Qwen2/3, Qwen3-MoE, Mistral, Mixtral, Gemma 1/2/3 (post-norm
    layers too: their post-norms act on ``hidden`` before the deferred add), GLM-4, OLMoE.
``stream``
    The block returns the stream itself, ``[num_tokens, hidden]``: GPT-2, GPT-J, OPT,
    Falcon, Granite (which scales its branch outputs by ``residual_multiplier`` inside the
    block, before they join the stream).
``stream_first``
    The block returns ``(stream, leftover)`` and the model discards ``leftover``
    (StableLM returns its MLP input, Cohere its block input). Adding to the second item,
    as a shape-based guess would, steers nothing.
``hf_batched``
    vLLM's Transformers backend runs Hugging Face decoder layers on ``[1, num_tokens,
    hidden]`` (a batch dimension of one) and they return the stream (or a tuple whose first
    item is the stream). This covers every architecture vLLM has no native code for
    (OLMo-2, GPT-NeoX, StarCoder2, ... in vLLM 0.32).

Subclasses match their base's entry only when they inherit its ``forward`` unchanged.
A documented opt-in forces one kind for unknown layers (``force_kind``); it is logged.

This module is vLLM-free: the table holds class names, and the traced forwards below
only index preallocated tensors.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from vllm_steer.steering.capture import capture_op
from vllm_steer.steering.condition_table import cond_accumulate_op


class AdapterKind(StrEnum):
    RESIDUAL_PAIR = "residual_pair"
    STREAM = "stream"
    STREAM_FIRST = "stream_first"
    HF_BATCHED = "hf_batched"


class UnsupportedLayerError(RuntimeError):
    """No adapter says how this model's decoder layers form the residual stream."""


class LayerOutputError(RuntimeError):
    """A decoder layer returned something its adapter does not describe (refused, not guessed)."""


_V = "vllm.model_executor.models."
#: Decoder-layer class (module.qualname) -> how its return value forms the residual stream.
#: Every entry was read in vLLM 0.32's source and is exercised by tests/test_architectures.py.
ADAPTERS: dict[str, AdapterKind] = {
    **{_V + name: AdapterKind.RESIDUAL_PAIR for name in (
        "llama.LlamaDecoderLayer",            # llama, phi3 (Phi3ForCausalLM reuses it)
        "mistral.MistralDecoderLayer",
        "mixtral.MixtralDecoderLayer",
        "qwen2.Qwen2DecoderLayer",
        "qwen2_moe.Qwen2MoeDecoderLayer",
        "qwen3.Qwen3DecoderLayer",
        "qwen3_moe.Qwen3MoeDecoderLayer",
        "gemma.GemmaDecoderLayer",
        "gemma2.Gemma2DecoderLayer",
        "gemma3.Gemma3DecoderLayer",
        "glm4.Glm4DecoderLayer",
        "olmoe.OlmoeDecoderLayer",
    )},
    **{_V + name: AdapterKind.STREAM for name in (
        "gpt2.GPT2Block",
        "gpt_j.GPTJBlock",
        "opt.OPTDecoderLayer",
        "falcon.FalconDecoderLayer",
        "granite.GraniteDecoderLayer",
    )},
    **{_V + name: AdapterKind.STREAM_FIRST for name in (
        "stablelm.StablelmDecoderLayer",
        "commandr.CohereDecoderLayer",
    )},
}

#: Module of vLLM's Transformers modeling backend (its model classes run HF modules).
TRANSFORMERS_BACKEND = _V + "transformers"

#: Attribute paths to the decoder-block list, vLLM (native and Transformers backend) and HF.
LAYER_PATHS = (
    "model.layers",                  # llama, qwen, gemma, mistral, ...; Transformers backend
    "model.language_model.layers",   # multimodal wrappers
    "language_model.model.layers",
    "transformer.h",                 # gpt2, gpt-j, falcon, bloom
    "gpt_neox.layers",               # HF gpt-neox
    "model.decoder.layers",          # opt
    "transformer.blocks",            # mpt
    "layers",                        # a bare decoder model
)


def class_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _walk(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module, num_layers: int | None = None) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the model's decoder-block list, found at one of ``LAYER_PATHS``.

    With ``num_layers`` the list must have exactly that many entries (pipeline-parallel
    ranks hold placeholders for the layers they do not run). Raises ``UnsupportedLayerError``.
    """
    for path in LAYER_PATHS:
        obj = _walk(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0 and (
                num_layers is None or len(obj) == num_layers):
            return path, obj
    want = f" of {num_layers}" if num_layers is not None else ""
    raise UnsupportedLayerError(
        f"vllm-steer: cannot find the decoder-block list{want} in {class_name(model)} "
        f"(looked for {', '.join(LAYER_PATHS)}); add its path to "
        "vllm_steer.steering.layers.LAYER_PATHS")


def _is_placeholder(layer: nn.Module) -> bool:
    # vLLM's PPMissingLayer (pipeline parallel) stands in for layers other ranks run.
    return type(layer).__name__ == "PPMissingLayer"


def is_transformers_backend(model: nn.Module) -> bool:
    """True for models of vLLM's Transformers modeling backend (HF modules inside)."""
    return any(c.__module__ == TRANSFORMERS_BACKEND
               or c.__module__.startswith(TRANSFORMERS_BACKEND + ".")
               for c in type(model).__mro__)


def adapter_kind(model: nn.Module, layer: nn.Module) -> AdapterKind | None:
    """The adapter for ``layer`` of ``model`` (a vLLM model), or None when none matches."""
    if is_transformers_backend(model):
        if type(layer).__module__.startswith("transformers.models."):
            return AdapterKind.HF_BATCHED
        return None
    cls = type(layer)
    for base in cls.__mro__:
        kind = ADAPTERS.get(class_name(base))
        if kind is None:
            continue
        # A subclass inherits the entry only with the same forward: a new forward may
        # return something else.
        if base is cls or cls.forward is base.forward:
            return kind
        return None
    return None


@dataclass(frozen=True)
class LayerPlan:
    """Which adapter each local decoder layer gets. ``layers[i]`` is block ``i`` (or None
    for a pipeline-parallel placeholder)."""

    path: str
    layers: tuple[nn.Module | None, ...]
    kind: AdapterKind
    forced: bool


def plan_layers(model: nn.Module, num_layers: int, force_kind: str | None = None) -> LayerPlan:
    """Match every decoder layer of a loaded vLLM model to one adapter, or refuse.

    ``force_kind`` (an ``AdapterKind`` value) is the documented opt-in for layers that match
    no adapter; layers that do match keep their own. All layers must agree on one kind.
    """
    path, blocks = decoder_layers(model, num_layers)
    forced_kind = None
    if force_kind:
        try:
            forced_kind = AdapterKind(force_kind)
        except ValueError as e:
            raise UnsupportedLayerError(
                f"vllm-steer: layer_adapter {force_kind!r} is not one of "
                f"{', '.join(k.value for k in AdapterKind)}") from e
    kinds: dict[AdapterKind, str] = {}
    local: list[nn.Module | None] = []
    forced = False
    for layer in blocks:
        if _is_placeholder(layer):
            local.append(None)
            continue
        kind = adapter_kind(model, layer)
        if kind is None and forced_kind is not None:
            kind, forced = forced_kind, True
        if kind is None:
            raise UnsupportedLayerError(
                f"vllm-steer: no layer adapter for {class_name(layer)} in "
                f"{class_name(model)}: steering would have to guess how this layer's return "
                "value forms the residual stream, so it is refused. Read the layer's forward "
                "and the model's layer loop, then add the class to "
                "vllm_steer.steering.layers.ADAPTERS with one of "
                f"{', '.join(k.value for k in AdapterKind)} (with a test against HF hooks), or "
                "force one at your own risk with additional_config="
                "{'vllm_steer': {'layer_adapter': KIND}} (see docs/architectures.md)")
        kinds.setdefault(kind, class_name(layer))
        local.append(layer)
    if len(kinds) > 1:
        raise UnsupportedLayerError(
            f"vllm-steer: decoder layers of {class_name(model)} need different adapters "
            f"({', '.join(f'{v}: {k.value}' for k, v in kinds.items())}); not supported")
    if not kinds:
        raise UnsupportedLayerError(f"vllm-steer: {class_name(model)} has no local decoder layers")
    return LayerPlan(path, tuple(local), next(iter(kinds)), forced)


# -- the traced forwards (one per kind) -------------------------------------------------------
# Attributes set by ``attach`` (preallocated tensors, only ever updated in place):
# ``_vllm_steer_rows`` [max_tokens] long, one slot per scheduled token (0 = identity row);
# ``_vllm_steer_add`` [num_slots, hidden]; with ``_vllm_steer_k`` = K > 0 (a Python int fixed
# at attach, so a constant to torch.compile) also ``_vllm_steer_proj_dir`` [num_slots, K, H],
# ``_vllm_steer_proj_a`` / ``_vllm_steer_proj_b`` [num_slots, K] and ``_vllm_steer_norm``
# [num_slots]. The checks below are on shapes and types, never on tensor data.

def _delta(self: nn.Module, n: int) -> torch.Tensor:
    return self._vllm_steer_add[self._vllm_steer_rows[:n]]


def _steered(self: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The stream ``h [T, H]`` after the slot's ops (``steering.program``): projections
    ``x + (b - a (x . r)) r`` in order, then the additive delta, then (norm flag) the norm of
    ``h`` restored. The identity row leaves ``h`` bit for bit unchanged."""
    rows = self._vllm_steer_rows[: h.shape[0]]
    x = h
    k = self._vllm_steer_k
    if k:
        dirs = self._vllm_steer_proj_dir[rows]
        a, b = self._vllm_steer_proj_a[rows], self._vllm_steer_proj_b[rows]
        for j in range(k):
            r = dirs[:, j]
            dot = (x * r).sum(-1, dtype=torch.float32).to(x.dtype)
            x = x + (b[:, j] - a[:, j] * dot).unsqueeze(-1) * r
    x = x + self._vllm_steer_add[rows]
    if k:
        flag = self._vllm_steer_norm[rows]
        ratio = (torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)
                 / torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-30))
        x = x * (1 + flag * (ratio.to(x.dtype) - 1)).unsqueeze(-1)
    return x


def _bad(self: nn.Module, what: str, out: Any) -> LayerOutputError:
    shape = (tuple(out.shape) if isinstance(out, torch.Tensor)
             else [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                   for o in out] if isinstance(out, tuple | list) else type(out).__name__)
    return LayerOutputError(
        f"vllm-steer: {class_name(self)} returned {shape}, but its adapter "
        f"({self._vllm_steer_kind}) expects {what}; refusing to guess where the residual "
        "stream is")


def _capture(self: nn.Module, stream: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """Hand the block's output stream (``stream + residual``) to the capture op
    (``steering.capture``) when capture is attached: ``_vllm_steer_capture`` is this
    block's index, a Python int fixed at attach (-1: no capture code at all)."""
    if self._vllm_steer_capture >= 0:
        capture_op(stream, residual, self._vllm_steer_capture, self._vllm_steer_capture_sink)


def _accumulate(self: nn.Module, stream: torch.Tensor, residual: torch.Tensor | None = None
                ) -> None:
    """Condition reading (``steering.condition_table``) of the block output (``stream +
    residual``, after this block's steering). ``_vllm_steer_cond`` is a Python int fixed at
    attach: 0, the engine runs without conditions and no code is traced; 1, device
    targets: every token adds to the accumulator row its target names (0: a trash row);
    2, host-planned: the opaque op adds this step's planned spans, if any."""
    if self._vllm_steer_cond == 2:
        cond_accumulate_op(stream, residual, self._vllm_steer_cond_layer,
                           self._vllm_steer_cond_acc)
    elif self._vllm_steer_cond:
        x = stream if residual is None else stream + residual
        rows = self._vllm_steer_cond_targets[: x.shape[0]]
        self._vllm_steer_cond_acc.index_add_(0, rows, x.to(self._vllm_steer_cond_acc.dtype))


def _residual_pair(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    out = self._vllm_steer_forward(*args, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor)
            and out[1].dim() == 2):
        raise _bad(self, "(hidden [T, H], residual [T, H])", out)
    hidden, residual = out
    if not self._vllm_steer_k:  # addition only: the delta joins the deferred add
        residual = residual + _delta(self, residual.shape[0])
    else:
        h = hidden + residual
        residual = residual + (_steered(self, h) - h)
    _accumulate(self, hidden, residual)
    _capture(self, hidden, residual)
    return hidden, residual


def _stream(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    out = self._vllm_steer_forward(*args, **kwargs)
    if not (isinstance(out, torch.Tensor) and out.dim() == 2):
        raise _bad(self, "the stream [T, H]", out)
    steered = _steered(self, out)
    _accumulate(self, steered)
    _capture(self, steered)
    return steered


def _stream_first(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    out = self._vllm_steer_forward(*args, **kwargs)
    if not (isinstance(out, tuple) and len(out) >= 1 and isinstance(out[0], torch.Tensor)
            and out[0].dim() == 2):
        raise _bad(self, "(stream [T, H], ...)", out)
    steered = _steered(self, out[0])
    _accumulate(self, steered)
    _capture(self, steered)
    return (steered, *out[1:])


def _hf_batched(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    out = self._vllm_steer_forward(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[0] == 1):
        raise _bad(self, "the stream [1, T, H] (or a tuple starting with it)", out)
    flat = _steered(self, hidden[0])
    _accumulate(self, flat)
    _capture(self, flat)
    steered = flat.unsqueeze(0)
    return (steered, *out[1:]) if isinstance(out, tuple) else steered


_FORWARDS = {
    AdapterKind.RESIDUAL_PAIR: _residual_pair,
    AdapterKind.STREAM: _stream,
    AdapterKind.STREAM_FIRST: _stream_first,
    AdapterKind.HF_BATCHED: _hf_batched,
}


def attach(layer: nn.Module, kind: AdapterKind, tables: Any, rows: torch.Tensor,
           capture_index: int = -1, capture_sink: torch.Tensor | None = None,
           cond_acc: torch.Tensor | None = None, cond_targets: torch.Tensor | None = None,
           cond_planned: bool = False, cond_layer: int = -1) -> None:
    """Wrap ``layer.forward`` (idempotent) so it steers its stream with ``tables``
    (``steering.slots.LayerTables``: ``add``, and the projection tables when K > 0)
    gathered by ``rows[:T]``. With ``cond_acc``/``cond_targets`` (``steering.
    condition_table``) the steered stream is added into ``cond_acc[cond_targets[:T]]``;
    with ``cond_acc`` of a host-planned table, ``cond_planned`` and this block's index
    ``cond_layer``, the op ``cond_accumulate`` adds the spans that table planned.
    With ``capture_index`` >= 0 (the block's index) the forward ends with the capture op
    (``steering.capture``), ``capture_sink`` its one-element dummy output."""
    if hasattr(layer, "_vllm_steer_forward"):
        return
    if capture_index >= 0 and capture_sink is None:
        raise ValueError("capture needs a sink tensor")
    if cond_planned and (cond_acc is None or cond_layer < 0):
        raise ValueError("host-planned conditions need the accumulator and the layer index")
    if not cond_planned and (cond_acc is None) != (cond_targets is None):
        raise ValueError("conditions need both the accumulator and the targets")
    layer._vllm_steer_cond = 0 if cond_acc is None else 2 if cond_planned else 1
    layer._vllm_steer_cond_layer = int(cond_layer)
    layer._vllm_steer_cond_acc = cond_acc
    layer._vllm_steer_cond_targets = cond_targets
    layer._vllm_steer_capture = int(capture_index)
    layer._vllm_steer_capture_sink = capture_sink
    # Plain attributes (not buffers) so weight loading, state dicts and inductor freezing
    # leave them alone; dynamo lifts them as graph inputs.
    layer._vllm_steer_add = tables.add
    layer._vllm_steer_k = int(tables.num_projections)
    layer._vllm_steer_proj_dir = tables.proj_dir
    layer._vllm_steer_proj_a = tables.proj_a
    layer._vllm_steer_proj_b = tables.proj_b
    layer._vllm_steer_norm = tables.norm
    layer._vllm_steer_rows = rows
    layer._vllm_steer_kind = kind.value
    layer._vllm_steer_forward = layer.forward
    layer.forward = types.MethodType(_FORWARDS[kind], layer)


def iter_attached(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if hasattr(m, "_vllm_steer_forward"):
            yield m

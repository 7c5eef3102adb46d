"""Steering Hugging Face models with forward hooks (no vLLM involved).

``steer_hf`` steers an HF model the way the plugin steers vLLM: the offline extraction's
evaluation (``extract.evaluate``) and the HF side of ``bench vs-hf`` use it. It is not
the tests' reference: those write their own hooks (``tests/hf_reference.py``), so that
a bug shared by this module and the plugin cannot hide.

Layer convention (whole project): layer ``i`` is the output of decoder block ``i``
(0-based), HF ``hidden_states[i + 1]``. Steering layer ``i`` replaces block ``i``'s
output ``h`` by ``h + (scale * delta[i]).to(h.dtype)``, at every position or only where
a position mask is true. The delta is computed as ``scale * delta`` in float32 and cast
to the hidden-state dtype once, then added (one rounding in the model's dtype). The hooks
run before any other forward hook on the block, so transformers'
``output_hidden_states`` shows steered outputs. (Note: transformers reports the *last*
block's output after the final norm as ``hidden_states[-1]``; steering and
``extract.hidden`` use the raw block output for every layer, the last one included.)

Position masks
--------------
``position_mask=None``
    steer every token of every forward (prompt and generated tokens).
``position_mask=<bool tensor [batch, seq]>``
    for forwards that cover the full sequence in one go (no KV cache, e.g. scoring a
    batch of prompts): token ``(b, t)`` is steered iff ``mask[b, t]``. A forward whose
    hidden states are not exactly ``[batch, seq, hidden]`` raises ``ValueError`` (this
    catches incremental decoding, where a static mask is ambiguous).
``position_mask=<callable>``
    for anything, including ``generate`` with a KV cache. It is called once per hooked
    forward and layer with ``positions``, a LongTensor ``[batch, seq]`` holding the
    *position id* of every token in that forward: the token's 0-based index within its
    own sequence, not counting padding (what ``generate`` and ``hidden.read_last_token``
    pass to the model; with left padding it is ``attention_mask.cumsum(-1) - 1`` and
    padding slots hold 0). During a decode step ``seq == 1`` and ``positions`` is the
    new token's position. It must return a bool tensor broadcastable to
    ``[batch, seq]``. Example, steer only generated tokens of prompts of lengths
    ``lens`` (LongTensor ``[batch]``)::

        mask_fn = lambda pos: pos >= lens[:, None]

    Position ids match the per-token ``positions`` vLLM uses, so the same callable
    describes the same tokens in both engines. For architectures whose decoder blocks
    are not passed ``position_ids`` (e.g. GPT-2) they are taken as ``arange(seq) +
    tokens already in the KV cache``, identical for every row (column indices, which
    equal position ids without left padding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vllm_steer.steering.layers import UnsupportedLayerError
from vllm_steer.steering.layers import decoder_layers as find_layers
from vllm_steer.vector import SteeringVector

PositionMask = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
Deltas = SteeringVector | Mapping[int, torch.Tensor] | torch.Tensor

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of an HF causal LM (or its base model)."""
    try:
        return find_layers(model)[1]
    except UnsupportedLayerError as e:
        raise ValueError(str(e)) from e


def _dense_deltas(deltas: Deltas, num_layers: int) -> dict[int, torch.Tensor]:
    """``{layer: float32 [hidden]}`` from a vector, a dict, or a dense ``[num_layers, hidden]``."""
    if isinstance(deltas, SteeringVector):
        deltas.validate(num_layers=num_layers)
        return dict(deltas.directions)
    if isinstance(deltas, torch.Tensor):
        if deltas.ndim != 2 or deltas.shape[0] != num_layers:
            raise ValueError(
                f"dense deltas must have shape [num_layers={num_layers}, hidden], "
                f"got {tuple(deltas.shape)}"
            )
        return {i: deltas[i].float() for i in range(num_layers) if bool(deltas[i].any())}
    out = {}
    for layer, t in deltas.items():
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"layer {layer} out of range for a model with {num_layers} layers")
        out[int(layer)] = torch.as_tensor(t).float().reshape(-1)
    return out


def _output_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@contextlib.contextmanager
def steer_hf(
    model: nn.Module,
    vector_or_dense_deltas: Deltas,
    scale: float = 1.0,
    layers: Sequence[int] | None = None,
    position_mask: PositionMask = None,
) -> Iterator[None]:
    """Within the ``with`` block, add ``scale * delta[i]`` to the output of decoder block ``i``.

    ``vector_or_dense_deltas``: a ``SteeringVector``, a ``{layer: Tensor[hidden]}`` dict or a
    dense ``Tensor[num_layers, hidden]`` (all-zero rows are skipped). ``layers`` restricts
    steering to those layers (each must have a delta). ``position_mask``: see the module
    docstring. Hooks are removed on exit, also on exceptions.
    """
    blocks = decoder_layers(model)
    num_layers = len(blocks)
    deltas = _dense_deltas(vector_or_dense_deltas, num_layers)
    if layers is not None:
        missing = [i for i in layers if i not in deltas]
        if missing:
            raise ValueError(f"layers {missing} have no delta (delta layers: {sorted(deltas)})")
        deltas = {i: deltas[i] for i in layers}
    if position_mask is not None and not (
        callable(position_mask) or isinstance(position_mask, torch.Tensor)
    ):
        raise TypeError("position_mask must be None, a bool tensor [batch, seq] or a callable")
    if isinstance(position_mask, torch.Tensor) and (
        position_mask.ndim != 2 or position_mask.dtype != torch.bool
    ):
        raise ValueError("a tensor position_mask must be bool with shape [batch, seq]")
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    for i, d in deltas.items():
        if d.ndim != 1 or (isinstance(hidden_size, int) and d.shape[0] != hidden_size):
            raise ValueError(f"delta for layer {i} has shape {tuple(d.shape)}, expected "
                             f"[{hidden_size or 'hidden'}]")
    scaled = {i: float(scale) * d for i, d in deltas.items()}  # float32 [hidden]

    # Positions for forwards that did not receive position_ids: recorded by a pre-hook on
    # the first block from the KV cache length (same default as the model itself).
    state: dict[str, Any] = {}

    def positions_of(kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden.shape[0], hidden.shape[1]
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = state.get("positions")
        if pos is None or pos.shape[-1] != seq:
            cache = kwargs.get("past_key_values")
            past = 0
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length())
            pos = torch.arange(seq, device=hidden.device) + past
        pos = pos.to(hidden.device).long()
        if pos.ndim == 3:  # mrope-style [3, batch, seq]: use the first (temporal) stream
            pos = pos[0]
        return pos.reshape(-1, seq).expand(batch, seq)

    def first_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state.pop("positions", None)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if kwargs.get("position_ids") is None and hidden is not None:
            state["positions"] = positions_of(kwargs, hidden)

    def make_hook(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            hidden = _output_hidden(output)
            delta = scaled[layer].to(device=hidden.device, dtype=hidden.dtype)
            if position_mask is None:
                return _replace_hidden(output, hidden + delta)
            if isinstance(position_mask, torch.Tensor):
                if tuple(hidden.shape[:2]) != tuple(position_mask.shape):
                    raise ValueError(
                        f"position_mask has shape {tuple(position_mask.shape)} but layer {layer} "
                        f"saw hidden states {tuple(hidden.shape[:2])} (batch, seq); a tensor mask "
                        "only works for full-sequence forwards, pass a callable for decoding"
                    )
                mask = position_mask.to(hidden.device)
            else:
                mask = torch.as_tensor(position_mask(positions_of(kwargs, hidden)))
                mask = mask.to(device=hidden.device, dtype=torch.bool)
                mask = mask.expand(hidden.shape[0], hidden.shape[1])
            steered = torch.where(mask[..., None], hidden + delta, hidden)
            return _replace_hidden(output, steered)

        return hook

    handles = []
    try:
        if position_mask is not None and callable(position_mask):
            handles.append(blocks[0].register_forward_pre_hook(first_pre_hook, with_kwargs=True))
        for layer in sorted(scaled):
            # prepend: run before other forward hooks, e.g. transformers' output capturing,
            # so that ``output_hidden_states`` reports the steered block outputs
            handles.append(blocks[layer].register_forward_hook(
                make_hook(layer), with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()

"""The HF side of every reference check, standing alone: nothing here imports vllm_steer.

Vectors are read from their files with ``safetensors`` (tensors ``direction.N``, the
project's documented file format); each architecture's decoder-block list is named below
(path and block class, per HF ``model_type``); the steering is a forward hook written
here that rewrites a block's output (the residual stream after block ``i``, the README's
layer convention) at the tokens a boolean mask selects. A wrong layer index, a wrong
block list or a wrong file reader in the product cannot hide behind the same code here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

#: HF ``model_type`` -> (attribute path of the decoder-block ``ModuleList``, block class).
#: Read from transformers' modeling files for every checkpoint the tests build.
BLOCKS: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "LlamaDecoderLayer"),
    "mistral": ("model.layers", "MistralDecoderLayer"),
    "mixtral": ("model.layers", "MixtralDecoderLayer"),
    "phi3": ("model.layers", "Phi3DecoderLayer"),
    "qwen2": ("model.layers", "Qwen2DecoderLayer"),
    "qwen2_moe": ("model.layers", "Qwen2MoeDecoderLayer"),
    "qwen3": ("model.layers", "Qwen3DecoderLayer"),
    "qwen3_moe": ("model.layers", "Qwen3MoeDecoderLayer"),
    "gemma": ("model.layers", "GemmaDecoderLayer"),
    "gemma2": ("model.layers", "Gemma2DecoderLayer"),
    "gemma3_text": ("model.layers", "Gemma3DecoderLayer"),
    "glm4": ("model.layers", "Glm4DecoderLayer"),
    "granite": ("model.layers", "GraniteDecoderLayer"),
    "stablelm": ("model.layers", "StableLmDecoderLayer"),
    "cohere": ("model.layers", "CohereDecoderLayer"),
    "olmo2": ("model.layers", "Olmo2DecoderLayer"),
    "gpt2": ("transformer.h", "GPT2Block"),
    "gptj": ("transformer.h", "GPTJBlock"),
    "falcon": ("transformer.h", "FalconDecoderLayer"),
    "opt": ("model.decoder.layers", "OPTDecoderLayer"),
    "gpt_neox": ("gpt_neox.layers", "GPTNeoXLayer"),
}

_TENSOR = re.compile(r"^direction\.(\d+)$")


def read_directions(path: str | Path) -> dict[int, torch.Tensor]:
    """``{layer: float32 [hidden]}`` from a vector file, read with ``safetensors`` alone."""
    from safetensors import safe_open

    out: dict[int, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            m = _TENSOR.match(key)
            assert m, f"{path}: unexpected tensor {key!r}"
            out[int(m.group(1))] = f.get_tensor(key).float()
    return out


def composed_dense(vectors_dir: Path, parts: Iterable[tuple[str, float]], num_layers: int,
                   hidden: int) -> torch.Tensor:
    """``sum scale * v`` over ``parts`` (file name stem, scale) as float32
    ``[num_layers, hidden]``."""
    dense = torch.zeros(num_layers, hidden)
    for name, scale in parts:
        for layer, d in read_directions(vectors_dir / f"{name}.safetensors").items():
            dense[layer] += scale * d
    return dense


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of an HF causal LM, at the path named for its ``model_type``."""
    path, cls = BLOCKS[model.config.model_type]
    obj = model
    for attr in path.split("."):
        obj = getattr(obj, attr)
    assert isinstance(obj, torch.nn.ModuleList), (path, type(obj))
    assert all(type(b).__name__ == cls for b in obj), (path, cls, type(obj[0]).__name__)
    assert len(obj) == model.config.num_hidden_layers, (len(obj), model.config)
    return obj


@contextlib.contextmanager
def rewrite_blocks(model, fns: dict[int, Callable[[torch.Tensor], torch.Tensor]],
                   mask: torch.Tensor) -> Iterator[None]:
    """Within the block, the output ``h`` ``[batch, seq, hidden]`` of decoder block ``i``
    becomes ``fns[i](h)`` at the tokens where ``mask`` (bool ``[batch, seq]``) is set. Only
    for full-sequence forwards (no KV cache): the mask's shape must equal the batch's."""
    blocks = decoder_blocks(model)

    def hook_for(layer: int):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            assert tuple(h.shape[:2]) == tuple(mask.shape), (h.shape, mask.shape)
            new = torch.where(mask.to(h.device)[..., None], fns[layer](h), h)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    # prepend: before any hook transformers registers to record hidden states
    handles = [blocks[i].register_forward_hook(hook_for(i), with_kwargs=True, prepend=True)
               for i in sorted(fns)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def add_dense(model, dense: torch.Tensor, mask: torch.Tensor):
    """``h <- h + dense[i]`` on block ``i``'s output at the masked tokens (rows of
    ``dense`` that are all zero are not hooked)."""
    assert dense.shape[0] == model.config.num_hidden_layers, dense.shape
    fns = {i: (lambda h, d=dense[i]: h + d.to(h.dtype))
           for i in range(dense.shape[0]) if bool(dense[i].any())}
    return rewrite_blocks(model, fns, mask)

"""``train()``: contrastive dataset -> ``SteeringVector``, with per-layer separation scores.

Layer ``i`` is the output of decoder block ``i`` (HF ``hidden_states[i + 1]``); the
direction found there is what steering layer ``i`` adds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_steer.extract.dataset import (
    NORMALIZE,
    ContrastiveDataset,
    DatasetError,
    PromptSets,
    VectorConfig,
    as_dataset,
    build_dataset,
    check_layers_spec,
)
from vllm_steer.extract.hidden import read_last_token
from vllm_steer.extract.methods import (
    check_method,
    find_direction,
    separation,
    set_mean_diff,
    set_separation,
)
from vllm_steer.hf_steering import decoder_layers
from vllm_steer.vector import SteeringVector, VectorMetadata

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Sorted layer indices for ``spec`` on a model with ``num_layers`` blocks.

    ``None``: every layer except 0 (llama.cpp cannot steer layer 0); ``"all"``: every
    layer; ``"start:stop[:step]"``: a Python slice; a list of ints (negative counts from
    the end). Out-of-range layers raise ``ValueError``.
    """
    if spec is None:
        return list(range(1, num_layers)) or [0]
    check_layers_spec(spec)
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        parts = [int(x) if x.strip() else None for x in spec.split(":")]
        picked = list(range(num_layers))[slice(*parts)]
        if not picked:
            raise ValueError(
                f"layers {spec!r} selects no layer of a model with {num_layers} layers"
            )
        return picked
    bad = [i for i in spec if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {num_layers} layers "
                         f"(valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
    return sorted({i % num_layers for i in spec})


def _model_name(model: nn.Module) -> str:
    raw = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return Path(raw).name or raw


def separation_scores(vector: SteeringVector) -> dict[int, float]:
    """Per-layer separation scores stored in a trained vector's metadata (empty if none)."""
    raw = vector.metadata.extra.get("separation")
    return {int(k): float(v) for k, v in json.loads(raw).items()} if raw else {}


def format_separation(scores: dict[int, float]) -> str:
    """A small text table: layer, score and a bar."""
    lines = ["layer  separation"]
    for layer, s in sorted(scores.items()):
        lines.append(f"{layer:5d}  {s:10.3f}  {'#' * round(s * 40)}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ModelInfo:
    """What a trained vector records about the model it was trained on."""

    num_layers: int
    name: str
    architecture: str
    dtype: str


def hf_model_info(model: nn.Module, model_name: str | None = None) -> ModelInfo:
    cfg = getattr(model, "config", None)
    return ModelInfo(len(decoder_layers(model)), model_name or _model_name(model),
                     str(getattr(cfg, "model_type", "") or ""),
                     str(next(model.parameters()).dtype).replace("torch.", ""))


def engine_model_info(vllm_config: Any, model_name: str | None = None) -> ModelInfo:
    """``ModelInfo`` of the model a vLLM engine serves (its ``VllmConfig``)."""
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    return ModelInfo(int(hf.num_hidden_layers), model_name or Path(str(mc.model)).name,
                     str(getattr(hf, "model_type", "") or ""),
                     str(mc.dtype).replace("torch.", ""))


def is_engine(model: Any) -> bool:
    """True for a ``vllm.LLM`` (extraction then runs on its engine through capture)."""
    return hasattr(model, "llm_engine") and not isinstance(model, nn.Module)


def prepare(dataset: ContrastiveDataset | PromptSets | Sequence[Any], method: str,
            normalize: str) -> tuple[ContrastiveDataset | PromptSets, list[str]]:
    """Check ``method``/``normalize`` against ``dataset``; return it and the prompts in
    reading order (pairs: positive, negative, positive, ...; sets: positives, negatives)."""
    ds = dataset if isinstance(dataset, PromptSets) else as_dataset(dataset)
    check_method(method)
    if isinstance(ds, PromptSets) and method != "mean_diff":
        raise DatasetError(f"prompt sets are unpaired: method must be 'mean_diff', got {method!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if method == "pca_diff" and len(ds) < 2:
        raise DatasetError("method 'pca_diff' needs at least 2 pairs (it centres the differences)")
    if isinstance(ds, PromptSets):
        return ds, [*ds.positives, *ds.negatives]
    return ds, [s for p in ds.pairs for s in (p.positive, p.negative)]


def train(
    model: nn.Module | Any,
    tokenizer,
    dataset: ContrastiveDataset | PromptSets | Sequence[Any],
    *,
    layers: str | Sequence[int] | None = None,
    method: str = "pca_center",
    normalize: str = "unit",
    batch_size: int = 32,
    padding_side: str | None = None,
    share_prefix: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    direction_from_layer: int | None = None,
) -> SteeringVector:
    """Train a control vector on ``model`` from contrastive ``dataset``.

    ``model``: an HF causal LM (hidden states read with forward hooks), or a ``vllm.LLM``
    (read with the engine's hidden-state capture: the weights it serves, no second copy;
    ``batch_size``/``padding_side`` do not apply, vLLM batches).
    ``dataset``: a ``ContrastiveDataset``, a list of ``(positive, negative)`` strings, or
    ``PromptSets`` (two unpaired prompt lists; ``method="mean_diff"`` only: the difference
    of the sets' mean last-token activations, the refusal-direction recipe).
    ``layers``: see ``resolve_layers``. ``method``: ``pca_diff``, ``pca_center`` or
    ``mean_diff`` (see ``methods``). ``normalize``: ``unit`` scales every layer's
    direction to norm 1 (repeng's convention); ``none`` keeps ``mean_diff``'s raw
    magnitude (PCA directions are unit either way). Each direction is oriented so that a
    positive scale moves toward the positive prompts. The per-layer separation score
    (fraction of pairs the direction orders correctly) is stored as JSON in
    ``metadata.extra["separation"]`` and printed to stderr when ``progress``.
    ``direction_from_layer``: use the direction found at that layer (unit norm) for every
    picked layer, as directional ablation ("abliteration") does with one refusal direction.
    """
    ds, prompts = prepare(dataset, method, normalize)
    if is_engine(model):
        from vllm_steer.extract.engine_hidden import read_last_token_engine
        from vllm_steer.vllm_adapter.engine import vllm_config

        info = engine_model_info(vllm_config(model), model_name)
        picked = resolve_layers(layers, info.num_layers)
        hidden = read_last_token_engine(model, tokenizer, prompts, picked,
                                        add_special_tokens=ds.add_special_tokens,
                                        share_prefix=share_prefix, progress=progress,
                                        desc=f"extract {ds.name or 'vector'} (engine)")
    else:
        info = hf_model_info(model, model_name)
        picked = resolve_layers(layers, info.num_layers)
        hidden = read_last_token(model, tokenizer, prompts, picked, batch_size=batch_size,
                                 add_special_tokens=ds.add_special_tokens,
                                 padding_side=padding_side, share_prefix=share_prefix,
                                 progress=progress, desc=f"extract {ds.name or 'vector'}")
    return fit_vector(ds, hidden, picked, info, method=method, normalize=normalize,
                      direction_from_layer=direction_from_layer, progress=progress)


def fit_vector(
    ds: ContrastiveDataset | PromptSets,
    hidden: dict[int, torch.Tensor],
    picked: list[int],
    info: ModelInfo,
    *,
    method: str,
    normalize: str,
    direction_from_layer: int | None = None,
    progress: bool = False,
) -> SteeringVector:
    """The vector from last-token states ``hidden`` (``{layer: [num_prompts, hidden]}``,
    prompts in ``prepare``'s order) at ``picked`` layers, with its metadata."""
    directions: dict[int, torch.Tensor] = {}
    scores: dict[int, float] = {}
    for layer in picked:
        h = hidden[layer]
        if isinstance(ds, PromptSets):  # [n_pos + n_neg, hidden]
            pos, neg = h[:len(ds.positives)], h[len(ds.positives):]
            d = set_mean_diff(pos, neg)
        else:  # [2 n, hidden]: positive, negative, positive, ...
            pos, neg = h[0::2], h[1::2]
            d = find_direction(pos, neg, method)
        if normalize == "unit":
            d = d / d.norm().clamp_min(1e-12)
        directions[layer] = d
        scores[layer] = (set_separation(pos, neg, d) if isinstance(ds, PromptSets)
                         else separation(pos, neg, d))

    if direction_from_layer is not None:
        src = resolve_layers([direction_from_layer], info.num_layers)[0]
        if src not in picked:
            raise ValueError(f"direction_from_layer {direction_from_layer} is not one of the "
                             f"extracted layers {picked}")
        unit = directions[src] / directions[src].norm().clamp_min(1e-12)
        directions = {layer: unit.clone() for layer in picked}
    hidden_size = next(iter(directions.values())).shape[0]
    extra = {k: str(v) for k, v in ds.info.items()}
    extra.update({
        "layers": json.dumps(picked),
        "separation": json.dumps({str(k): round(v, 6) for k, v in scores.items()}),
        **({"num_positive": str(len(ds.positives)), "num_negative": str(len(ds.negatives))}
           if isinstance(ds, PromptSets) else {"num_pairs": str(len(ds))}),
        "normalize": normalize,
        **({"direction_from_layer": str(direction_from_layer)}
           if direction_from_layer is not None else {}),
        "dtype": info.dtype,
    })
    if ds.name:
        extra["dataset_name"] = ds.name
    meta = VectorMetadata(
        model_name=info.name,
        architecture=info.architecture,
        hidden_size=int(hidden_size),
        num_layers=info.num_layers,
        method=method,
        dataset_fingerprint=ds.fingerprint(),
        extra=extra,
    )
    vector = SteeringVector(directions, meta)
    if progress:
        print(format_separation(scores), file=sys.stderr)
    return vector


# -- from a config --------------------------------------------------------------------------------
def load_model(path: str | os.PathLike[str] | None = None, *, dtype: str = "float32",
               device: str = "cpu") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a local HF causal LM (``None``: the default model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.default_model import resolve_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    local = resolve_model(path)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=DTYPES[dtype]).to(device).eval()
    return model, tokenizer


@dataclass
class ExtractResult:
    vector: SteeringVector
    seconds_total: float
    seconds_model_load: float
    seconds_extract: float
    num_pairs: int
    layers: list[int] = field(default_factory=list)


ENGINES = ("hf", "vllm")
#: Extraction dtype names -> vLLM ``dtype`` values.
DTYPES_VLLM = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}




def extraction_llm(model_dir: str, dtype: str, **overrides: Any) -> Any:
    """A ``vllm.LLM`` set up for extraction: eager (start-up is most of a short job),
    prefix caching with small blocks (the persona template is shared), large batches."""
    from vllm_steer.llm_factory import make_llm

    opts: dict[str, Any] = dict(dtype=DTYPES_VLLM[dtype], enforce_eager=True,
                                enable_prefix_caching=True, block_size=32,
                                max_num_batched_tokens=4096, max_num_seqs=256,
                                max_model_len=4096)
    opts.update(overrides)
    return make_llm(model_dir, **opts)


def extract_from_config(
    cfg: VectorConfig,
    *,
    model_path: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    model: nn.Module | Any | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    check_layers: Callable[[list[int]], None] | None = None,
    engine: str = "hf",
) -> ExtractResult:
    """Load the model (unless given), build the config's dataset and ``train``.

    ``engine``: ``hf`` (transformers, forward hooks) or ``vllm`` (a vLLM engine's
    hidden-state capture; ``model`` may then be a running ``vllm.LLM``, else one is
    started and stopped here). Cheap checks (chat template, dataset, layer range, then
    ``check_layers(layers)``) run before any forward pass.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from transformers import AutoTokenizer

    from vllm_steer.default_model import resolve_model

    t0 = time.perf_counter()
    dtype = dtype or cfg.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    local = None
    if tokenizer is None:
        local = resolve_model(model_path or cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(local)
    ds = build_dataset(cfg, tokenizer)  # template / chat-template errors before loading weights
    started = None
    if model is None and engine == "vllm":
        from vllm_steer.default_model import resolve_model as _resolve

        local = local or _resolve(model_path or cfg.model)
        if check_layers is not None:   # before the engine starts: read the layer count
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(local)
            hf_cfg = getattr(hf_cfg, "text_config", None) or hf_cfg
            check_layers(resolve_layers(cfg.layers, int(hf_cfg.num_hidden_layers)))
        model = started = extraction_llm(str(local), dtype)
    elif model is None:
        model, _ = load_model(local or model_path or cfg.model, dtype=dtype)
    try:
        t_load = time.perf_counter() - t0
        if is_engine(model):
            from vllm_steer.vllm_adapter.engine import vllm_config

            num_layers = engine_model_info(vllm_config(model)).num_layers
        else:
            num_layers = len(decoder_layers(model))
        layers = resolve_layers(cfg.layers, num_layers)
        if check_layers is not None:
            check_layers(layers)
        t1 = time.perf_counter()
        vector = train(model, tokenizer, ds, layers=cfg.layers, method=cfg.method,
                       normalize=cfg.normalize, batch_size=batch_size or cfg.batch_size,
                       progress=progress, direction_from_layer=cfg.direction_from_layer)
        t_train = time.perf_counter() - t1
    finally:
        if started is not None:
            from vllm_steer.llm_factory import shutdown

            shutdown(started)
    return ExtractResult(vector=vector, seconds_total=time.perf_counter() - t0,
                         seconds_model_load=t_load, seconds_extract=t_train, num_pairs=len(ds),
                         layers=layers)

"""Offline extraction of control vectors from contrastive datasets (no serving engine).

``train(model, tokenizer, dataset, layers=..., method=...) -> SteeringVector``; configs in
``configs/vectors/*.yaml`` (``load_config`` / ``build_dataset``); CLI ``vllm-steer extract``.
"""

from vllm_steer.extract.dataset import (
    ContrastiveDataset,
    ContrastivePair,
    DatasetError,
    PromptFormat,
    PromptSets,
    VectorConfig,
    as_dataset,
    build_dataset,
    build_persona_dataset,
    build_prompt_sets,
    expand_suffixes,
    load_config,
    load_suffixes,
    render_prompt,
)
from vllm_steer.extract.hidden import HiddenStateError, read_last_token
from vllm_steer.extract.methods import METHODS, find_direction
from vllm_steer.extract.train import (
    extract_from_config,
    load_model,
    resolve_layers,
    separation_scores,
    train,
)

__all__ = [
    "METHODS",
    "ContrastiveDataset",
    "ContrastivePair",
    "DatasetError",
    "HiddenStateError",
    "PromptFormat",
    "PromptSets",
    "VectorConfig",
    "as_dataset",
    "build_dataset",
    "build_persona_dataset",
    "build_prompt_sets",
    "expand_suffixes",
    "extract_from_config",
    "find_direction",
    "load_config",
    "load_model",
    "load_suffixes",
    "read_last_token",
    "render_prompt",
    "resolve_layers",
    "separation_scores",
    "train",
]

"""Offline extraction of control vectors from contrastive datasets.

``train(model, tokenizer, dataset, layers=..., method=...) -> SteeringVector`` (HF model,
or a ``vllm.LLM`` serving engine); configs in ``configs/vectors/*.yaml``
(``load_config`` / ``build_dataset`` / ``extract_from_config``); CLI ``vllm-steer extract``.
Conditions (CAST): ``train_condition`` / ``extract_condition`` (recipes with
``kind: condition``).
"""

from vllm_steer.extract.condition import extract_condition, train_condition
from vllm_steer.extract.dataset import (
    ContrastiveDataset,
    DatasetError,
    PromptSets,
    build_dataset,
    build_prompt_sets,
    load_config,
)
from vllm_steer.extract.methods import METHODS
from vllm_steer.extract.train import extract_from_config, load_model, separation_scores, train

__all__ = [
    "METHODS",
    "ContrastiveDataset",
    "DatasetError",
    "PromptSets",
    "build_dataset",
    "build_prompt_sets",
    "extract_condition",
    "extract_from_config",
    "load_config",
    "load_model",
    "separation_scores",
    "train",
    "train_condition",
]

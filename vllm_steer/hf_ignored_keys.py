"""Config keys that vLLM reads but the checkpoint's transformers (HF) class ignores.

A ``config.json`` may carry a key its HF class never reads: HF runs the model without it,
vLLM builds something else from it, and the two disagree with nothing wrong in either.
Measured (tests/test_architectures.py, ``gpt_neox_kv_heads``): a tiny GPT-NeoX with 2
attention heads and ``num_key_value_heads: 1`` — HF's GPT-NeoX has no such option and runs
multi-head attention; vLLM 0.32 runs GPT-NeoX on its Transformers backend, which builds each
attention layer with ``ModelConfig.get_num_kv_heads`` (here 1: grouped-query attention).
Unsteered, the two were 16 nats apart; without the key, 1e-6.

Checked here, from the config and transformers' sources only (no weights, no vLLM import):
the keys vLLM 0.32 derives the attention shape from, the first one present winning
(``vllm/transformers_utils/model_arch_config_convertor.py``: ``get_total_num_kv_heads``,
``get_head_size``). One is flagged when the HF class ignores it (its config class declares
no such field and its modeling module's source never names it) and its value differs from
what HF computes without it. ``vllm-steer doctor --model DIR`` prints the flags.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: vLLM 0.32's KV-head keys, in its order (``get_total_num_kv_heads``).
VLLM_KV_HEAD_KEYS = ("n_head_kv", "num_kv_heads", "num_key_value_heads",
                     "multi_query_group_num", "num_attention_groups")
#: vLLM 0.32's head-size keys, in its order (``get_head_size``; unset, 0 or null: none).
VLLM_HEAD_SIZE_KEYS = ("head_dim", "hidden_size_per_head")


@dataclass(frozen=True)
class IgnoredKey:
    """``key`` (= ``value`` in the config) is read by vLLM as the model's ``what``; HF's
    ``model_type`` class ignores it and uses ``hf_value``."""

    model_type: str
    key: str
    value: Any
    what: str
    hf_value: Any

    def __str__(self) -> str:
        return (f"{self.key}={self.value!r}: vLLM reads it as the {self.what}; transformers' "
                f"{self.model_type} ignores it and uses {self.hf_value!r}, so vLLM computes "
                f"another model than HF (remove the key or make it {self.hf_value!r})")


def _declared(cls: type) -> set[str]:
    names = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    for klass in cls.__mro__:
        names |= set(vars(klass).get("__annotations__", {}))
    return names


def hf_reads(model_type: str, key: str) -> bool:
    """Whether transformers' class for ``model_type`` may read ``key``: its config class
    declares it, or its modeling module's source names it (unknown model type: True)."""
    from transformers import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        return True
    if key in _declared(cls):
        return True
    spec = importlib.util.find_spec(cls.__module__.replace(".configuration_", ".modeling_"))
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return True
    return key in Path(spec.origin).read_text(encoding="utf-8")


def ignored_config_keys(config: dict[str, Any] | str | os.PathLike[str]) -> list[IgnoredKey]:
    """The flags for a config dict, a ``config.json`` or a model directory (empty: none)."""
    if not isinstance(config, dict):
        path = Path(config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    model_type = config.get("model_type")
    if not model_type:
        return []
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING.get(model_type)
    declared = _declared(cls) if cls is not None else set()
    amap = getattr(cls, "attribute_map", {})
    heads = config.get(amap.get("num_attention_heads", "num_attention_heads"))
    hidden = config.get(amap.get("hidden_size", "hidden_size"))
    if not isinstance(heads, int) or heads <= 0:
        return []
    hf_head_size = hidden // heads if isinstance(hidden, int) else None
    flags = []
    # vLLM takes the first KV-head key the config object has (a declared field always is
    # there) and the first head-size key that is set and positive
    for keys, what, hf_value, present in (
            (VLLM_KV_HEAD_KEYS, "number of KV heads", heads,
             lambda k: k in config or k in declared),
            (VLLM_HEAD_SIZE_KEYS, "head size", hf_head_size, lambda k: bool(config.get(k)))):
        key = next((k for k in keys if present(k)), None)
        if key is None or key not in config or hf_reads(model_type, key):
            continue
        if config[key] != hf_value:
            flags.append(IgnoredKey(model_type, key, config[key], what, hf_value))
    return flags

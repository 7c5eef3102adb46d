"""Tiny random-weight checkpoints, one per architecture, for steering tests (no hub).

Each is built from a ``transformers`` config (3 layers, hidden 128, head_dim 64 — vLLM's
CPU attention refuses smaller heads), seeded, saved with ``save_pretrained`` next to a
tokenizer, and cached under ``$VLLMSTEER_CACHE/test-models`` keyed by a hash of the
config and the transformers version. Steering math does not depend on trained weights,
so these check that the plugin finds the residual stream of every layer type; the
weights' scale (``initializer_range``) is large enough that greedy decoding has clear
winners, so token-for-token comparisons with HF are meaningful.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HIDDEN, LAYERS, HEAD_DIM = 128, 3, 64


@dataclass(frozen=True)
class TinyArch:
    """``name``: the matrix key; ``make``: ``(vocab_size, bos, eos) -> PretrainedConfig``;
    ``adapter``: the layer adapter vLLM 0.32's implementation needs (``steering.layers``)."""

    name: str
    make: Callable[[int, int | None, int | None], Any]
    adapter: str = "residual_pair"
    #: ``(parameter-name substring, value)``: parameters filled after the random init.
    fill: tuple[tuple[str, float], ...] = ()
    #: Why vLLM 0.32 itself, unsteered, computes something else than HF for this config
    #: (empty: it agrees). Steering cannot be judged against HF on such a config.
    vllm_differs: str = ""
    #: Config keys vLLM reads but the HF class ignores, as ``vllm_steer.hf_ignored_keys``
    #: must flag them (the matrix checks the flag on every entry).
    ignored_keys: tuple[str, ...] = ()


def _llama_like(cls_name: str, **extra: Any) -> Callable[[int, int | None, int | None], Any]:
    def make(vocab: int, bos: int | None, eos: int | None) -> Any:
        import transformers

        cls = getattr(transformers, cls_name)
        kw: dict[str, Any] = dict(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HIDDEN // HEAD_DIM,
            num_key_value_heads=1, max_position_embeddings=1024, initializer_range=0.3,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
        kw.update(extra)
        return cls(**kw)

    return make


def _gpt2(vocab: int, bos: int | None, eos: int | None) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HIDDEN // HEAD_DIM,
                      n_positions=1024, initializer_range=0.3, bos_token_id=bos, eos_token_id=eos)


def _gpt_neox(vocab: int, bos: int | None, eos: int | None, **extra: Any) -> Any:
    """Rotary on a quarter of each head (Pythia's and GPT-NeoX-20B's ``rotary_pct``).

    No ``num_key_value_heads``: HF's GPT-NeoX has no such option (multi-head attention
    always), while vLLM reads the key (``gpt_neox_kv_heads`` in ``VLLM_DIFFERS``)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HIDDEN // HEAD_DIM, intermediate_size=2 * HIDDEN,
                         max_position_embeddings=1024, initializer_range=0.3, rotary_pct=0.25,
                         bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False,
                         **extra)


def _gpt_neox_kv_heads(vocab: int, bos: int | None, eos: int | None) -> Any:
    return _gpt_neox(vocab, bos, eos, num_key_value_heads=1)


def _gptj(vocab: int, bos: int | None, eos: int | None) -> Any:
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HIDDEN // HEAD_DIM,
                      rotary_dim=32, n_positions=1024, initializer_range=0.3, bos_token_id=bos,
                      eos_token_id=eos)


def _opt(vocab: int, bos: int | None, eos: int | None) -> Any:
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     ffn_dim=2 * HIDDEN, num_attention_heads=HIDDEN // HEAD_DIM,
                     max_position_embeddings=1024, word_embed_proj_dim=HIDDEN, init_std=0.3,
                     bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def _falcon(vocab: int, bos: int | None, eos: int | None) -> Any:
    from transformers import FalconConfig

    return FalconConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HIDDEN // HEAD_DIM, new_decoder_architecture=False,
                        multi_query=True, parallel_attn=True, bias=False,
                        initializer_range=0.3, bos_token_id=bos, eos_token_id=eos)


_HD = {"head_dim": HEAD_DIM}
# Gemma 2/3 scale embeddings by sqrt(hidden): with tied random embeddings the last token
# dominates its own logits and greedy decoding repeats one token forever.
_GEMMA = {"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 64,
          "tie_word_embeddings": False}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2}

#: The architecture matrix (docs/architectures.md lists the same names). Not here: OLMoE,
#: whose unsteered logits from vLLM 0.32's CPU build are uniform (nothing to compare).
ARCHS: dict[str, TinyArch] = {a.name: a for a in (
    TinyArch("llama", _llama_like("LlamaConfig")),
    TinyArch("qwen2", _llama_like("Qwen2Config")),
    TinyArch("qwen3", _llama_like("Qwen3Config", **_HD)),
    TinyArch("qwen3_moe", _llama_like("Qwen3MoeConfig", **_HD, **_MOE, moe_intermediate_size=64,
                                      decoder_sparse_step=1)),
    TinyArch("qwen2_moe", _llama_like("Qwen2MoeConfig", **_MOE, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=128)),
    TinyArch("mistral", _llama_like("MistralConfig", **_HD)),
    TinyArch("mixtral", _llama_like("MixtralConfig", **_HD, num_local_experts=4,
                                    num_experts_per_tok=2)),
    TinyArch("gemma", _llama_like("GemmaConfig", **_HD)),
    # vLLM's Gemma 2 always ties the LM head; louder post-norms (weight 1 + 8) let the layers
    # outweigh the sqrt(hidden)-scaled embedding so greedy decoding does not repeat a token.
    TinyArch("gemma2", _llama_like("Gemma2Config", **{**_GEMMA, "tie_word_embeddings": True},
                                   attn_logit_softcapping=None),
             fill=(("post_attention_layernorm", 8.0), ("post_feedforward_layernorm", 8.0))),
    TinyArch("gemma3", _llama_like("Gemma3TextConfig", **_GEMMA)),
    TinyArch("phi3", _llama_like("Phi3Config", tie_word_embeddings=False)),
    TinyArch("granite", _llama_like("GraniteConfig", residual_multiplier=0.5,
                                    embedding_multiplier=2.0, attention_multiplier=0.125,
                                    logits_scaling=2.0), "stream"),
    TinyArch("glm4", _llama_like("Glm4Config", **_HD)),
    TinyArch("stablelm", _llama_like("StableLmConfig", tie_word_embeddings=False),
             "stream_first"),
    TinyArch("cohere", _llama_like("CohereConfig", logit_scale=0.5), "stream_first"),
    TinyArch("gpt2", _gpt2, "stream"),
    TinyArch("gptj", _gptj, "stream"),
    TinyArch("opt", _opt, "stream"),
    TinyArch("falcon", _falcon, "stream"),
    # vLLM 0.32 has no native OLMo-2 or GPT-NeoX: its Transformers backend runs them.
    TinyArch("olmo2", _llama_like("Olmo2Config"), "hf_batched"),
    TinyArch("gpt_neox", _gpt_neox, "hf_batched"),
)}


def _cohere_untied(vocab: int, bos: int | None, eos: int | None) -> Any:
    from transformers import CohereConfig

    return CohereConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                        num_hidden_layers=LAYERS, num_attention_heads=HIDDEN // HEAD_DIM,
                        num_key_value_heads=1, max_position_embeddings=1024,
                        initializer_range=0.3, bos_token_id=bos, eos_token_id=eos,
                        pad_token_id=eos, tie_word_embeddings=False)


#: Configurations on which vLLM 0.32 (CPU build) itself differs from HF transformers,
#: unsteered; the matrix records that the difference persists (docs/architectures.md).
VLLM_DIFFERS: dict[str, TinyArch] = {a.name: a for a in (
    # vllm/model_executor/models/commandr.py: CohereForCausalLM drops the checkpoint's
    # lm_head (WeightsMapper {"lm_head": None}) and computes logits with embed_tokens,
    # whatever tie_word_embeddings says; HF uses the separate lm_head.
    TinyArch("cohere_untied", _cohere_untied, "stream_first",
             vllm_differs="vLLM's Cohere always ties the LM head to the input embeddings "
                          "(commandr.py drops lm_head.weight); HF honours "
                          "tie_word_embeddings=False"),
    # The matrix's gemma2 with Gemma 2's attention-logit softcapping (50) on: vLLM passes it
    # to its CPU attention kernel (cpu_attn.py -> ops.cpu_attention_with_kv_cache, C++).
    TinyArch("gemma2_softcap",
             _llama_like("Gemma2Config", **{**_GEMMA, "tie_word_embeddings": True},
                         attn_logit_softcapping=50.0),
             fill=(("post_attention_layernorm", 8.0), ("post_feedforward_layernorm", 8.0)),
             vllm_differs="with attention-logit softcapping, vLLM's CPU attention kernel "
                          "(ops.cpu_attention_with_kv_cache) computes other attention "
                          "weights than HF's tanh softcap"),
    # The matrix's gpt_neox plus a key HF's GPT-NeoX never reads: vLLM's Transformers
    # backend builds its attention with ModelConfig.get_num_kv_heads, which reads it
    # (16 nats unsteered, measured; the same config without the key: 1e-6).
    TinyArch("gpt_neox_kv_heads", _gpt_neox_kv_heads, "hf_batched",
             vllm_differs="the config carries num_key_value_heads=1: HF's GPT-NeoX ignores it "
                          "(multi-head attention), vLLM reads it (grouped-query attention with "
                          "one KV head); `vllm-steer doctor --model` flags such keys",
             ignored_keys=("num_key_value_heads",)),
)}


def tiny_arch(name: str) -> TinyArch:
    """The matrix entry (``ARCHS``) or the known-difference entry (``VLLM_DIFFERS``) ``name``."""
    if name in ARCHS:
        return ARCHS[name]
    if name in VLLM_DIFFERS:
        return VLLM_DIFFERS[name]
    raise KeyError(f"no tiny architecture {name!r} (known: "
                   f"{', '.join(sorted({**ARCHS, **VLLM_DIFFERS}))})")


def cache_root() -> Path:
    from vllm_steer.default_model import cache_dir

    return cache_dir() / "test-models"


def _digest(config: Any, tokenizer_dir: str, seed: int, fill: Any) -> str:
    import transformers

    payload = json.dumps({"config": config.to_dict(), "tokenizer": str(tokenizer_dir),
                          "seed": seed, "fill": fill, "transformers": transformers.__version__},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tiny_model(arch: str | TinyArch, tokenizer_dir: str | os.PathLike[str], *,
                     seed: int = 0, root: Path | None = None,
                     config_overrides: dict[str, Any] | None = None) -> Path:
    """A cached tiny random checkpoint of ``arch`` with ``tokenizer_dir``'s tokenizer.

    Written to a temporary directory and renamed into place, so concurrent builders and
    interrupted runs never leave a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tiny_arch(arch) if isinstance(arch, str) else arch
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = max(len(tok), int(getattr(tok, "vocab_size", 0) or 0))
    config = spec.make(vocab, tok.bos_token_id, tok.eos_token_id)
    for k, v in (config_overrides or {}).items():
        setattr(config, k, v)
    root = Path(root) if root is not None else cache_root()
    out = root / f"{spec.name}-{_digest(config, str(tokenizer_dir), seed, spec.fill)}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                for part, value in spec.fill:
                    if part in name:
                        param.fill_(value)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

"""Hugging Face tokenizers from GGUF files, with the GGUF's own special tokens.

transformers' GGUF loader builds the BPE vocabulary but registers added tokens from a
per-architecture default list rather than from the file: for DeepSeek-R1-Distill-Qwen it
splits ``<｜User｜>``/``<｜Assistant｜>`` into ordinary pieces and appends duplicate BOS/EOS
tokens past the vocabulary (ids 152065/152066 instead of the file's 151646/151643); for
SmolLM2 it registers 3 of the file's 17 control tokens. ``load_gguf_tokenizer`` rebuilds
the added-token table from the file's ``tokenizer.ggml.token_type`` (CONTROL -> special,
USER_DEFINED -> added, not special, as in the original HF tokenizers), drops tokens the
loader invented past the vocabulary, and takes BOS/EOS/padding and ``add_bos_token`` from
the file's metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    if key.endswith(("tokens", "token_type")):
        return f
    return f.parts[-1][0].item() if len(f.parts[-1]) == 1 else f.parts[-1]


def gguf_token_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"tokens": [str], "types": [int], "bos": id|None, "eos": ..., "pad": ...,
    "add_bos": bool|None}`` from a GGUF file's tokenizer metadata."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    toks, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    if toks is None:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens in this GGUF file")
    tokens = [bytes(toks.parts[i]).decode("utf-8", errors="replace") for i in toks.data]
    ttypes = ([int(types.parts[i][0]) for i in types.data] if types is not None
              else [1] * len(tokens))

    def opt_int(key: str) -> int | None:
        v = _field(r, key)
        return None if v is None else int(v)

    add_bos = _field(r, "tokenizer.ggml.add_bos_token")
    return {"tokens": tokens, "types": ttypes, "bos": opt_int("tokenizer.ggml.bos_token_id"),
            "eos": opt_int("tokenizer.ggml.eos_token_id"),
            "pad": opt_int("tokenizer.ggml.padding_token_id"),
            "add_bos": None if add_bos is None else bool(add_bos)}


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` for the GGUF at ``path`` with its special tokens
    repaired (see the module docstring). Its chat template is the file's."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    base = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    table = gguf_token_table(path)
    tokens, types = table["tokens"], table["types"]
    n = len(tokens)
    spec = json.loads(base.backend_tokenizer.to_str())
    added: dict[int, dict[str, Any]] = {}
    for entry in spec.get("added_tokens", []):
        if entry["id"] < n and tokens[entry["id"]] == entry["content"]:
            added[entry["id"]] = entry
    for i, t in enumerate(types):
        if t in (_CONTROL, _USER_DEFINED):
            added[i] = {"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": t == _CONTROL}
    spec["added_tokens"] = [added[i] for i in sorted(added)]
    # The loader byte-level-encoded every token, these included ("<｜User｜>" became
    # "<ï½ľUserï½ľ>"); tokenizers gives an added token the id of its content in the model
    # vocabulary, or a new id past it, so the vocabulary must hold the raw content.
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        by_id = {i: k for k, i in vocab.items()}
        for i, entry in added.items():
            old = by_id.get(i)
            if old is not None and old != entry["content"]:
                del vocab[old]
            vocab[entry["content"]] = i

    def name(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < n else None

    bos, eos, pad = name(table["bos"]), name(table["eos"]), name(table["pad"])
    if table["add_bos"] and bos is not None:
        bos_id = table["bos"]
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    backend = Tokenizer.from_str(json.dumps(spec))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
        chat_template=getattr(base, "chat_template", None),
        model_max_length=getattr(base, "model_max_length", None) or 1 << 30)
    for i in sorted(added):
        got = tok.convert_tokens_to_ids(tokens[i])
        if got != i:
            raise ValueError(f"{path}: token {tokens[i]!r} maps to {got}, the file says {i}")
    return tok

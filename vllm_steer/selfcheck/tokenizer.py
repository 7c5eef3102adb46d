"""A tiny word-level tokenizer for the self-check's random models (built locally, no hub).

514 tokens: ``<unk>`` ``<s>`` ``</s>``, 509 words ``w0`` .. ``w508`` and the thinking
markers ``<think>`` / ``</think>`` as single added special tokens, so the plugin finds
them as the model's native markers (``vllm_steer.thinking``) and the reference can match
them on one token id each. The self-check feeds token ids, never text.
"""

from __future__ import annotations

from pathlib import Path

from vllm_steer.atomic_files import staged_dir

#: Bump when the vocabulary changes (the cached directory is keyed by it).
TOKENIZER_VERSION = 1
NUM_WORDS = 509
THINK_START, THINK_END = "<think>", "</think>"


def build_tokenizer(root: Path) -> Path:
    """The tokenizer directory under ``root`` (built once; atomic rename into place)."""
    out = root / f"tokenizer-v{TOKENIZER_VERSION}"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(NUM_WORDS):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [THINK_START, THINK_END]})
    with staged_dir(out) as tmp:   # another run's identical copy wins a race
        tok.save_pretrained(tmp)
    return out

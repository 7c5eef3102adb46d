"""Prompt token ids for probes: chat templates (as transformers 4 and 5 return them) and
raw text."""

from __future__ import annotations

from typing import Any

from vllm_steer.probe.choices import ProbeError


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, with the
    generation prompt. transformers 5 returns a ``BatchEncoding`` (a dict) where 4 returned
    a list; ``list()`` of the former would give its keys."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and isinstance(ids[0], list):   # a batch of one
        (ids,) = ids
    if not all(isinstance(i, int) for i in ids):
        raise ProbeError("messages", "the chat template did not return token ids")
    return ids


def build_prompt(tokenizer: Any, question: str, *, system: str | None = None,
                 open_thinking: str | None = None) -> list[int]:
    """Token ids of a chat prompt for ``question`` (the tokenizer's chat template, with the
    generation prompt; plain encoding when it has none); ``open_thinking`` (e.g.
    ``"<think>\\n"``) is appended so that a model without a native thinking mode starts
    inside a thinking section."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}]
        ids = chat_ids(tokenizer, msgs)
    else:
        ids = tokenizer.encode(question)
    if open_thinking:
        ids += tokenizer.encode(open_thinking, add_special_tokens=False)
    return ids


def as_ids(tokenizer: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token-id lists as given; strings encoded without special tokens."""
    return [list(p) if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False)
            for p in prompts]

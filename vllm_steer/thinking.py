"""Thinking-section markers: the one place that knows them.

Reasoning models wrap their thinking in marker tokens (``<think>``/``</think>`` for
DeepSeek-R1 distills, Qwen3, QwQ; others below). A tokenizer has a *native* thinking
mode when both markers of a known pair are single added tokens; then steering
(``thinking``/``answer``), probes and extraction use them. Otherwise ``DEFAULT_MARKERS``
are used as text (multi-token on most chat models) and extraction inserts the start
marker by hand.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MARKERS = ("<think>", "</think>")
#: Marker pairs used by released thinking models, most common first.
KNOWN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),                         # DeepSeek-R1 (distills), Qwen3, QwQ
    ("<thinking>", "</thinking>"),
    ("[THINK]", "[/THINK]"),                         # Magistral
    ("<|START_THINKING|>", "<|END_THINKING|>"),      # Cohere Command A Reasoning
    ("◁think▷", "◁/think▷"),                         # Kimi
    ("<seed:think>", "</seed:think>"),               # Seed-OSS
)


def _single_added_token(tokenizer: Any, text: str) -> bool:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
        added = tokenizer.get_added_vocab()
    except Exception:  # a tokenizer without these methods has no native markers
        return False
    return len(ids) == 1 and added.get(text) == ids[0]


def native_markers(tokenizer: Any) -> tuple[str, str] | None:
    """The tokenizer's own ``(start, end)`` thinking markers, or None without a native mode."""
    if tokenizer is None:
        return None
    for start, end in KNOWN_MARKERS:
        if _single_added_token(tokenizer, start) and _single_added_token(tokenizer, end):
            return start, end
    return None


def markers_for(tokenizer: Any) -> tuple[str, str]:
    """Native markers when the tokenizer has them, else ``DEFAULT_MARKERS``."""
    return native_markers(tokenizer) or DEFAULT_MARKERS

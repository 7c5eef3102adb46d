"""Answer choices as sets of single-token variants, built from the tokenizer.

A choice word such as ``"Yes"`` is many tokens: ``Yes``, `` Yes``, ``yes``, ``YES``,
``\\nYes``, ``"Yes``... Every vocabulary entry that decodes to the word after removing
leading whitespace/quotes and ignoring case is a variant; probabilities are summed over
variants (logsumexp).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

#: vLLM 0.32's limit on ``SamplingParams.logprob_token_ids``.
MAX_VARIANT_IDS = 128
_LEADING = " \t\n\r\"'`“”‘’«»*_(["


class ProbeError(ValueError):
    """Bad probe input; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def normalize(text: str) -> str:
    return text.lstrip(_LEADING).rstrip().casefold()


@functools.lru_cache(maxsize=8)
def _vocab_strings(tokenizer: Any) -> tuple[str, ...]:
    n = len(tokenizer)
    return tuple(tokenizer.decode([i]) for i in range(n))


@dataclass(frozen=True)
class ChoiceSet:
    """``choices[k]`` with its variant token ids ``variants[k]``."""

    choices: tuple[str, ...]
    variants: tuple[tuple[int, ...], ...]

    @property
    def all_ids(self) -> list[int]:
        return [i for ids in self.variants for i in ids]

    @classmethod
    def build(cls, tokenizer: Any, choices: list[str] | tuple[str, ...]) -> ChoiceSet:
        if not choices:
            raise ProbeError("choices", "at least one choice is needed")
        keys = [normalize(c) for c in choices]
        if any(not k for k in keys):
            raise ProbeError("choices", "a choice is empty after removing whitespace/quotes")
        if len(set(keys)) != len(keys):
            raise ProbeError("choices", f"choices {list(choices)} repeat (case-insensitively)")
        found: dict[str, list[int]] = {k: [] for k in keys}
        for tid, text in enumerate(_vocab_strings(tokenizer)):
            k = normalize(text)
            if k in found:
                found[k].append(tid)
        missing = [c for c, k in zip(choices, keys, strict=True) if not found[k]]
        if missing:
            raise ProbeError("choices", f"no single token decodes to {missing[0]!r} in this "
                             "tokenizer; use a word that is one token (e.g. with a leading space)")
        total = sum(len(v) for v in found.values())
        if total > MAX_VARIANT_IDS:
            raise ProbeError("choices", f"{total} variant tokens; at most {MAX_VARIANT_IDS}")
        return cls(tuple(choices), tuple(tuple(found[k]) for k in keys))

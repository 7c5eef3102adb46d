"""Answer choices as sets of token-sequence variants, built from the tokenizer.

A choice is read as the total probability of its variants (logsumexp of their log-probs);
a variant's log-prob is the sum of its tokens' conditional log-probs.

- **single-token variants**: every vocabulary entry that reads as the choice after
  removing leading whitespace/quotes and ignoring case (for ``"Yes"``: ``Yes``, `` Yes``,
  ``yes``, ``\nYes``, ``"Yes``...). All of them are read in the fork's one forward.
- **multi-token variants**: spellings the tokenizer splits. A choice with no
  single-token variant (``"20"`` is ``' ', '2', '0'``; ``"New York"``, ``"-3"``,
  ``"B)"``) gets its spellings as written, in lower case, upper case and with each word
  capitalised, each with and without a leading space. A choice that has single-token
  variants also gets its spelling *as written* with and without a leading space when that
  takes several tokens (``" 3"`` is ``' ', '3'``; ``"Houston"`` without a space is three
  tokens); its other case spellings that the tokenizer splits (``"YES"``) are left out, so
  that choices like Yes/No keep the one-fork read. Multi-token variants are read on
  forks that append them (see ``job``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

#: vLLM 0.32's limit on ``SamplingParams.logprob_token_ids`` (the head fork's read).
MAX_VARIANT_IDS = 128
#: At most this many multi-token variants in all (each is one fork per probe point).
MAX_SEQUENCE_VARIANTS = 64
#: At most this many tokens in one multi-token variant.
MAX_VARIANT_TOKENS = 32
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


def surface_forms(choice: str) -> list[str]:
    """Spellings of a multi-token choice: (no space, leading space) x (as written, lower,
    upper, each word capitalised), duplicates removed, in that order."""
    word = choice.strip()
    capitalised = " ".join(w[:1].upper() + w[1:] for w in word.split(" "))
    cases = list(dict.fromkeys([word, word.lower(), word.upper(), capitalised]))
    return [p + c for p in ("", " ") for c in cases]


@dataclass(frozen=True)
class ChoiceSet:
    """``choices[k]`` with its variants ``variants[k]``: token-id tuples (length 1 for
    single-token choices)."""

    choices: tuple[str, ...]
    variants: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def head_ids(self) -> list[int]:
        """First token of every variant (sorted, unique): what the head fork reads."""
        return sorted({v[0] for vs in self.variants for v in vs})

    @property
    def multi_token(self) -> tuple[bool, ...]:
        return tuple(any(len(v) > 1 for v in vs) for vs in self.variants)

    @property
    def max_len(self) -> int:
        """Tokens in the longest variant."""
        return max(len(v) for vs in self.variants for v in vs)

    def to_json(self, tokenizer: Any) -> dict[str, list[dict[str, Any]]]:
        """``{choice: [{"token_ids", "text"}, ...]}``: exactly what is scored."""
        return {c: [{"token_ids": list(v), "text": tokenizer.decode(list(v))} for v in vs]
                for c, vs in zip(self.choices, self.variants, strict=True)}

    @classmethod
    def build(cls, tokenizer: Any, choices: list[str] | tuple[str, ...]) -> ChoiceSet:
        if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
            raise ProbeError("choices", "must be a list of strings")
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
        variants: list[tuple[tuple[int, ...], ...]] = []
        for c, k in zip(choices, keys, strict=True):
            single = [(i,) for i in found[k]]
            forms = [p + c.strip() for p in ("", " ")] if single else surface_forms(c)
            seqs = [tuple(tokenizer.encode(f, add_special_tokens=False)) for f in forms]
            seqs = list(dict.fromkeys(single + [s for s in seqs if len(s) > 1 or s and not single]))
            if not seqs:
                raise ProbeError("choices", f"{c!r} tokenizes to nothing")
            if max(len(s) for s in seqs) > MAX_VARIANT_TOKENS:
                raise ProbeError("choices", f"{c!r} is longer than {MAX_VARIANT_TOKENS} tokens")
            variants.append(tuple(seqs))
        out = cls(tuple(choices), tuple(variants))
        out._check_limits()
        out._check_prefixes()
        return out

    def _check_limits(self) -> None:
        if len(self.head_ids) > MAX_VARIANT_IDS:
            raise ProbeError("choices", f"{len(self.head_ids)} distinct first tokens over all "
                             f"variants; at most {MAX_VARIANT_IDS}")
        n_seq = sum(len(v) > 1 for vs in self.variants for v in vs)
        if n_seq > MAX_SEQUENCE_VARIANTS:
            raise ProbeError("choices", f"{n_seq} multi-token variants (one fork each per "
                             f"probe point); at most {MAX_SEQUENCE_VARIANTS}")

    def _check_prefixes(self) -> None:
        # P(a) sums every continuation of a's tokens, so a choice whose variant starts
        # another choice's variant would count that choice's probability too.
        for a, va in zip(self.choices, self.variants, strict=True):
            for b, vb in zip(self.choices, self.variants, strict=True):
                if a == b:
                    continue
                for x in va:
                    for y in vb:
                        if len(x) < len(y) and y[:len(x)] == x:
                            raise ProbeError("choices", f"{a!r} (tokens {list(x)}) is a prefix "
                                             f"of {b!r} (tokens {list(y)}), so P({a!r}) would "
                                             f"include P({b!r}); rephrase one of them")

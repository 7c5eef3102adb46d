"""When a probe forks a growing sequence: its triggers, decided as the tokens arrive.

Triggers (``ProbeConfig.trigger``):

- ``"every"``: generated-token index ``0, every, 2*every, ...`` and the end (as before);
- ``"steps"``: index 0, every *reasoning step* found in the generated text, an optional
  fallback (``every``: a reading once ``every`` tokens pass without a step, counted from
  the last reading), and the end. A step is a match of one of ``markers`` in the
  **decoded** generated text (never the prompt), so a marker counts however the tokenizer
  splits it (``"\\n\\n"`` is one token or two). A marker made of whitespace only (the blank
  line) fires *after* itself: at the first token boundary at or after its end. Any other
  marker (a word such as ``"Wait"``) fires *before* itself: at the last token boundary at
  or before its start, so the fork reads the thought it interrupts, not the marker. Word
  markers match whole words, case-sensitively (``"Wait"`` is not ``"Waiting"`` nor
  ``"wait"``: list ``"But wait"`` for that). A step less than ``min_spacing`` tokens after
  the previous reading is skipped.

``PointPlanner`` decides these candidates causally: a candidate is handed out only once
the tokens that follow it cannot change it (``TextIndex`` keeps the decoded text; a
match is final once ``len(longest marker) + 1`` characters follow its start), so a live
sequence fed token by token and a finished trajectory fed at once get the same list.
Where a candidate's fork goes (moved out of thinking markers, onto a KV-block boundary)
is ``forks.place_point``.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Defaults that fit reasoning models: a blank line, and words that start a new thought.
DEFAULT_MARKERS = ("\n\n", "Wait", "Alternatively", "Hmm", "But wait")
TRIGGERS = ("every", "steps")
#: Labels of a reading's trigger (``Reading.trigger``); ``once``: a one-shot reading.
KINDS = ("start", "every", "step", "end", "once")
MAX_MARKERS = 32
MAX_MARKER_CHARS = 64
#: Tokens of context decoded before the first generated token (tokenizers that drop a
#: leading space when a piece is decoded alone).
_CONTEXT = 4


@dataclass(frozen=True)
class Candidate:
    """A trigger: generated-token ``index``, ``kind`` (one of ``KINDS``), and the
    ``marker`` text of a step."""

    index: int
    kind: str
    marker: str | None = None


class TextIndex:
    """The decoded generated text and the character offset of each token boundary.

    ``offsets[k]`` is the length of the text of the first ``k`` generated tokens, for
    ``k <= stable`` (tokens whose text no later token can change: a token that ends
    inside a multi-byte character waits for the rest; its inner boundaries get the
    character's start). Decoded incrementally with up to ``_CONTEXT`` tokens before the
    piece (as vLLM's detokenizer does), special tokens kept as text.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.context = list(context_ids)[-_CONTEXT:]
        self.ids: list[int] = []
        self.text = ""
        self.offsets = [0]

    @property
    def stable(self) -> int:
        return len(self.offsets) - 1

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def extend(self, ids: Sequence[int], final: bool = False) -> None:
        """Add generated tokens; ``final``: no more will come (a trailing partial
        character is taken as decoded)."""
        self.ids += list(ids)
        s = self.stable
        while s < len(self.ids):
            ctx = self._context_before(s)
            head = self._decode(ctx)
            for k in range(s + 1, len(self.ids) + 1):
                full = self._decode(ctx + self.ids[s:k])
                if full.startswith(head) and not full.endswith("\ufffd"):
                    break
            else:
                if not final:
                    return   # the rest ends inside a character: wait for more tokens
                k = len(self.ids)
                full = self._decode(ctx + self.ids[s:k])
            keep = len(head) if full.startswith(head) else len(os.path.commonprefix([head, full]))
            self.offsets += [len(self.text)] * (k - s - 1)
            self.text += full[keep:]
            self.offsets.append(len(self.text))
            s = k

    def _context_before(self, s: int) -> list[int]:
        if s >= _CONTEXT:
            return self.ids[s - _CONTEXT:s]
        return self.context[len(self.context) - min(len(self.context), _CONTEXT - s):] \
            + self.ids[:s]


def marker_pattern(markers: Sequence[str]) -> re.Pattern[str]:
    """One regex for ``markers``: word markers bounded by ``\\b`` on their word ends,
    longest first at a position."""
    parts = []
    for m in sorted(set(markers), key=len, reverse=True):
        p = re.escape(m)
        if re.match(r"\w", m[0]):
            p = r"\b" + p
        if re.match(r"\w", m[-1]):
            p += r"\b"
        parts.append(f"(?:{p})")
    return re.compile("|".join(parts))


class PointPlanner:
    """Fork candidates of one sequence, decided as its generated tokens arrive.

    ``feed(ids)`` adds tokens, ``close()`` ends the sequence; ``take()`` returns the
    candidates decided since the last call, in token order. ``lookahead``: tokens a
    candidate needs after it before it is handed out (the thinking-marker rule of
    ``forks.place_point`` looks at them), unless the sequence has ended.
    """

    def __init__(self, trigger: str, every: int | None, markers: Sequence[str] | None,
                 min_spacing: int, tokenizer: Any = None, context_ids: Sequence[int] = (),
                 lookahead: int = 0) -> None:
        self.trigger, self.every, self.min_spacing = trigger, every, min_spacing
        self.lookahead = lookahead
        self.n = 0
        self.finished = False
        self._prev: int | None = None   # index of the last candidate handed out
        self._end_done = False
        self._out: list[Candidate] = []
        self._steps: list[Candidate] = []   # step candidates found, not yet handed out
        self.text: TextIndex | None = None
        if trigger == "steps":
            ms = tuple(markers or DEFAULT_MARKERS)
            self.pattern = marker_pattern(ms)
            self.maxlen = max(len(m) for m in ms)
            self.after = {m: m.isspace() for m in ms}
            self.text = TextIndex(tokenizer, context_ids)
            self._pos = 0   # character where the marker search resumes

    # -- input ---------------------------------------------------------------------------
    def feed(self, ids: Sequence[int]) -> None:
        if self.finished:
            raise RuntimeError("tokens fed after close()")
        self.n += len(ids)
        if self.text is not None:
            self.text.extend(ids)
        self._decide()

    def close(self) -> None:
        self.finished = True
        if self.text is not None:
            self.text.extend([], final=True)
        self._decide()

    def take(self) -> list[Candidate]:
        out, self._out = self._out, []
        return out

    # -- decisions -----------------------------------------------------------------------
    def _horizon(self) -> int:
        """Every step candidate below this index is known (and in ``_steps``)."""
        if self.text is None or self.finished:
            self._scan(len(self.text.text) + 1 if self.text is not None else 0)
            return self.n + 1
        tx = self.text
        h_char = len(tx.text) - self.maxlen - 1
        self._scan(h_char)
        if h_char < 0:
            return 0
        # future matches start at >= h_char: their points are >= the last boundary there
        return bisect.bisect_right(tx.offsets, h_char) - 1

    def _scan(self, h_char: int) -> None:
        """Step candidates of the matches that start before ``h_char`` (final ones)."""
        tx = self.text
        if tx is None:
            return
        offs = tx.offsets
        while True:
            m = self.pattern.search(tx.text, self._pos)
            if m is None or m.start() >= h_char:
                return
            self._pos = m.end()
            marker = m.group(0)
            if self.after[marker]:   # the first boundary at or after its end
                idx = bisect.bisect_left(offs, m.end())
            else:                    # the last boundary at or before its start
                idx = bisect.bisect_right(offs, m.start()) - 1
            if not self._steps or self._steps[-1].index != idx:
                self._steps.append(Candidate(idx, "step", marker))

    def _emit(self, c: Candidate) -> None:
        self._out.append(c)
        self._prev = c.index

    def _decide(self) -> None:
        limit = self.n if self.finished else self.n - self.lookahead
        if self._prev is None:
            if limit < 0:
                return
            self._emit(Candidate(0, "start"))
        horizon = self._horizon()
        while True:
            prev = self._prev
            while self._steps and self._steps[0].index <= prev:
                self._steps.pop(0)
            step = self._steps[0] if self._steps else None
            fallback = prev + self.every if self.every else None
            if step is not None and (fallback is None or step.index <= fallback):
                if step.index > limit:
                    break
                self._steps.pop(0)
                if step.index - prev >= self.min_spacing:
                    self._emit(step)
                continue
            if fallback is not None and fallback < horizon and fallback <= limit \
                    and fallback <= self.n:
                self._emit(Candidate(fallback, "every"))
                continue
            break
        if self.finished and not self._end_done:
            # always: a candidate already at the end may be moved back by its placement
            # (an exact one keeps its point and label; the end adds no second fork there)
            self._end_done = True
            self._emit(Candidate(self.n, "end"))


def plan_candidates(ids: Sequence[int], trigger: str, every: int | None,
                    markers: Sequence[str] | None, min_spacing: int, tokenizer: Any = None,
                    context_ids: Sequence[int] = ()) -> list[Candidate]:
    """Every candidate of a finished sequence of generated tokens ``ids``."""
    p = PointPlanner(trigger, every, markers, min_spacing, tokenizer, context_ids)
    p.feed(list(ids))
    p.close()
    return p.take()

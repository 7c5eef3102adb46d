"""Question files (YAML) for probes and sweeps.

Format::

    choices: ["Yes", "No"]           # default choices (any number, single- or multi-token)
    target: "Yes"                    # optional: the choice a sweep scores (default: first)
    expected_kind: truth             # truth (default): ``expected`` is the correct answer,
                                     # scored as accuracy; persona: the answer a persona
                                     # would give (a sweep's sign), never scored as accuracy
    instruction: "Answer with {choices}."   # appended after a space; {choices} -> "Yes or No"
    questions:
      - {question: "Is 17 prime?", expected: "Yes"}
      - {question: "How fast ...?", choices: ["20", "30", "40", "50"], expected: "40"}

``expected`` (optional) must be one of the question's choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vllm_steer.probe.choices import ProbeError, normalize


@dataclass(frozen=True)
class Question:
    text: str                    # the question with the instruction appended
    choices: tuple[str, ...]
    expected: str | None


EXPECTED_KINDS = ("truth", "persona")


@dataclass(frozen=True)
class QuestionSet:
    questions: tuple[Question, ...]
    target: str | None
    expected_kind: str = "truth"

    @property
    def graded(self) -> bool:
        """Whether ``expected`` is the correct answer (accuracy can be computed)."""
        return self.expected_kind == "truth"

    @property
    def texts(self) -> list[str]:
        return [q.text for q in self.questions]

    def choice_groups(self) -> dict[tuple[str, ...], list[int]]:
        """Question indices per distinct choice set, in first-seen order."""
        out: dict[tuple[str, ...], list[int]] = {}
        for i, q in enumerate(self.questions):
            out.setdefault(q.choices, []).append(i)
        return out

    def signs(self, target: str) -> list[float] | None:
        """+1 where ``expected`` is ``target``, else -1; None if a question has none."""
        if any(q.expected is None for q in self.questions):
            return None
        return [1.0 if normalize(q.expected) == normalize(target) else -1.0
                for q in self.questions]


def _choices(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) < 1 or not all(isinstance(c, str | int | float)
                                                            for c in raw):
        raise ProbeError(where, "must be a non-empty list of strings")
    return tuple(str(c) for c in raw)


def _listing(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]


def read_mapping(path: Path, field: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ``ProbeError(field)`` otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ProbeError(field, f"{path}: cannot read ({e})") from e
    if not isinstance(raw, dict):
        raise ProbeError(field, f"{path}: top level must be a mapping")
    return raw


def load_questions(path: str | Path) -> QuestionSet:
    path = Path(path)
    raw = read_mapping(path, "questions")
    items = raw.get("questions") or []
    if not isinstance(items, list) or not items:
        raise ProbeError("questions", f"{path}: no questions")
    default = _choices(raw.get("choices", ["Yes", "No"]), "choices")
    instr = str(raw.get("instruction") or "")
    out = []
    for i, q in enumerate(items):
        where = f"questions[{i}]"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise ProbeError(where, "must be a mapping with a 'question' string")
        unknown = sorted(set(q) - {"question", "choices", "expected"})
        if unknown:
            raise ProbeError(f"{where}.{unknown[0]}", "unknown field")
        choices = _choices(q["choices"], f"{where}.choices") if "choices" in q else default
        expected = q.get("expected")
        if expected is not None:
            expected = str(expected)
            if normalize(expected) not in {normalize(c) for c in choices}:
                raise ProbeError(f"{where}.expected", f"{expected!r} is not one of {choices}")
        text = f"{q['question']} {instr.replace('{choices}', _listing(choices))}".strip()
        out.append(Question(text, choices, expected))
    target = raw.get("target")
    kind = raw.get("expected_kind", "truth")
    if kind not in EXPECTED_KINDS:
        raise ProbeError("expected_kind", f"{path}: {kind!r} is not one of "
                         f"{', '.join(EXPECTED_KINDS)}")
    return QuestionSet(tuple(out), None if target is None else str(target), kind)


def accuracy(answers: list[str | None], questions: list[Question]) -> float | None:
    """Fraction of ``answers`` equal to their question's ``expected`` (matched like choices:
    case and leading whitespace ignored); None when no question has one."""
    pairs = [(a, q.expected) for a, q in zip(answers, questions, strict=True)
             if q.expected is not None]
    if not pairs:
        return None
    return sum(a is not None and normalize(a) == normalize(e) for a, e in pairs) / len(pairs)

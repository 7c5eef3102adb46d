"""One probe reading: per-choice log-probabilities, log ratio and probability mass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_steer.probe.choices import ChoiceSet

#: Below this total probability of all choice variants a reading is flagged.
DEFAULT_MIN_MASS = 0.05


def logsumexp(xs: list[float]) -> float:
    m = max(xs, default=-math.inf)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


@dataclass
class Reading:
    """A reading at one probe point.

    ``logprobs[c]``: log P(c) summed over c's variants (natural log, full vocabulary);
    ``normalized[c]``: ``logprobs[c] - logsumexp(logprobs)`` (over the choices only);
    ``log_ratio``: ``logprobs[c0] - logprobs[c1]`` for two choices, else None (also None
    when both are impossible, never NaN); ``mass``: total probability of all choices.
    """

    token_index: int
    in_thinking: bool
    logprobs: dict[str, float]
    normalized: dict[str, float]
    log_ratio: float | None
    mass: float
    low_mass: bool
    top_tokens: list[tuple[str, float]] | None = None
    cached_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no -inf: impossible choices are reported as null.
        for key in ("logprobs", "normalized"):
            d[key] = {k: (v if math.isfinite(v) else None) for k, v in d[key].items()}
        return d


def make_reading(choices: ChoiceSet, token_logprobs: dict[int, float], *, token_index: int,
                 in_thinking: bool, min_mass: float = DEFAULT_MIN_MASS,
                 cached_tokens: int = 0) -> Reading:
    """Fold ``{token_id: logprob}`` (all variant ids present) into a ``Reading``."""
    per = {}
    for c, ids in zip(choices.choices, choices.variants, strict=True):
        missing = [i for i in ids if i not in token_logprobs]
        if missing:
            raise RuntimeError(f"engine returned no logprob for variant ids {missing} of {c!r}")
        per[c] = logsumexp([token_logprobs[i] for i in ids])
    total = logsumexp(list(per.values()))
    mass = math.exp(total) if total > -math.inf else 0.0
    norm = {c: (v - total if total > -math.inf else -math.inf) for c, v in per.items()}
    ratio = None
    if len(per) == 2:
        a, b = per.values()
        if math.isfinite(a) or math.isfinite(b):
            ratio = a - b if (math.isfinite(a) and math.isfinite(b)) else (
                math.inf if math.isfinite(a) else -math.inf)
            if not math.isfinite(ratio):
                ratio = None
    return Reading(token_index, in_thinking, per, norm, ratio, mass, mass < min_mass,
                   cached_tokens=cached_tokens)

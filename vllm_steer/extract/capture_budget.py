"""How much of a served engine a capture job (training on the served engine) may use.

A capture request is a prompt prefill (``max_tokens`` 1). vLLM's scheduler puts it into
the same engine steps as the other requests' decodes, and every step that carries one
is longer, so the neighbours' inter-token latency grows with the share of steps that
carry capture prefills (``bench train-route``: 2.19x the median with 8 requests always
in flight). vLLM offers no per-request token budget, and its ``priority`` policy only
orders the waiting queue (a running prefill still shares the step), so the job paces
itself:

- **bursts**: capture requests go out together, at most ``burst_tokens`` prompt tokens
  computed by the engine per burst (estimated from the requests already done: prompt
  tokens minus those served from the prefix cache; at least one request per burst) and
  at most the request's ``max_concurrent`` requests;
- **engine share**: after a burst that took ``t`` seconds the next one waits
  ``t * (1 / engine_share - 1)``, so capture requests are in flight at most
  ``engine_share`` of the time and most of the neighbours' steps carry none.

The job takes longer instead (about ``1 / engine_share`` times as long on an idle
engine). ``engine_share`` 1 turns the pacing off: up to ``max_concurrent`` capture
requests in flight all along, as the route did before it had a budget. vLLM-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from vllm_steer import envvars

DEFAULT_ENGINE_SHARE = 0.25
DEFAULT_BURST_TOKENS = 256
T = TypeVar("T")


@dataclass(frozen=True)
class CaptureBudget:
    """``engine_share`` in (0, 1]: the share of wall time capture requests may be in
    flight; ``burst_tokens`` >= 1: computed prompt tokens per burst."""

    engine_share: float = DEFAULT_ENGINE_SHARE
    burst_tokens: int = DEFAULT_BURST_TOKENS

    def __post_init__(self) -> None:
        if not 0 < self.engine_share <= 1:
            raise ValueError(f"engine_share must be in (0, 1], got {self.engine_share}")
        if self.burst_tokens < 1:
            raise ValueError(f"burst_tokens must be >= 1, got {self.burst_tokens}")

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> CaptureBudget:
        """``$VLLMSTEER_TRAIN_ENGINE_SHARE`` and ``$VLLMSTEER_TRAIN_BURST_TOKENS``, else
        the defaults; a bad value is a ``ValueError`` naming the variable."""
        share = envvars.get(envvars.TRAIN_ENGINE_SHARE, environ)
        burst = envvars.get(envvars.TRAIN_BURST_TOKENS, environ)
        try:
            s = float(share) if share is not None else DEFAULT_ENGINE_SHARE
            if not 0 < s <= 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"{envvars.TRAIN_ENGINE_SHARE}={share!r}: must be a number in "
                             "(0, 1]") from None
        try:
            b = int(burst) if burst is not None else DEFAULT_BURST_TOKENS
            if b < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"{envvars.TRAIN_BURST_TOKENS}={burst!r}: must be an integer "
                             ">= 1") from None
        return cls(s, b)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Pacer:
    """Runs jobs (one per capture request) in bursts under a ``CaptureBudget``.

    ``run(items, tokens, job)``: ``tokens(item)`` is the item's prompt length; ``job(item)``
    submits it and returns ``(result, computed prompt tokens)``. Results come back in
    order. ``max_concurrent`` caps a burst's requests.
    """

    def __init__(self, budget: CaptureBudget, max_concurrent: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.budget, self.max_concurrent = budget, max_concurrent
        self.clock, self.sleep = clock, sleep
        self._prompt = 0    # prompt tokens of the requests done
        self._computed = 0  # of them computed by the engine
        self.bursts = 0
        self.busy_s = 0.0
        self.waited_s = 0.0

    def _cost(self, prompt_tokens: int) -> float:
        """Expected computed tokens of a request (its prompt length times the computed
        fraction seen so far; the whole prompt before any is done)."""
        if self._prompt == 0:
            return float(prompt_tokens)
        return prompt_tokens * self._computed / self._prompt

    def _burst(self, items: Sequence[Any], lo: int, tokens: Callable[[Any], int]) -> int:
        """The end of the burst starting at ``lo``."""
        hi, spent = lo, 0.0
        cap = self.max_concurrent or len(items)
        while hi < len(items) and hi - lo < cap:
            cost = self._cost(tokens(items[hi]))
            if hi > lo and spent + cost > self.budget.burst_tokens:
                break
            spent += cost
            hi += 1
        return hi

    async def run(self, items: Sequence[T], tokens: Callable[[T], int],
                  job: Callable[[T], Awaitable[tuple[Any, int]]]) -> list[Any]:
        out: list[Any] = []
        lo = 0
        share = self.budget.engine_share
        while lo < len(items):
            hi = self._burst(items, lo, tokens)
            t0 = self.clock()
            done = await asyncio.gather(*(job(x) for x in items[lo:hi]))
            busy = self.clock() - t0
            self.bursts += 1
            self.busy_s += busy
            for x, (res, computed) in zip(items[lo:hi], done, strict=True):
                out.append(res)
                self._prompt += tokens(x)
                self._computed += max(0, min(int(computed), tokens(x)))
            lo = hi
            if share < 1 and lo < len(items):
                wait = busy * (1 / share - 1)
                self.waited_s += wait
                await self.sleep(wait)
        return out

    def report(self) -> dict[str, Any]:
        return {"bursts": self.bursts, "busy_s": round(self.busy_s, 3),
                "paced_wait_s": round(self.waited_s, 3),
                "computed_prompt_tokens": self._computed, "prompt_tokens": self._prompt}

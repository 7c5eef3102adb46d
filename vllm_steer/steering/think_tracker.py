"""Which tokens a request steers (worker side, host memory, numpy; never inside the model).

Modes arrive canonical (see ``resolve``): ``all`` within ``[start, end)``, or
``thinking``/``answer`` within ``[start, end)``. The thinking state is causal, so a
token's classification never depends on later tokens and prefill, chunked prefill,
decode and replays agree:

- the state after a token is ``NONE`` (no section yet), ``THINK`` (after a completed
  start marker) or ``ANSWER`` (after a completed end marker);
- a token is ``thinking`` when the state before it and after it are both ``THINK``;
  ``answer`` when both are ``ANSWER``. Marker tokens that complete a marker are
  therefore never steered; with multi-token markers the earlier pieces of the end
  marker count as thinking (they cannot be told apart before the marker completes).
"""

from __future__ import annotations

import numpy as np

NONE, THINK, ANSWER = 0, 1, 2


class ThinkTracker:
    """Incremental marker scanner over one request's token sequence."""

    def __init__(self, start_ids: tuple[int, ...], end_ids: tuple[int, ...]) -> None:
        self.start_ids, self.end_ids = list(start_ids), list(end_ids)
        self.reset()

    def reset(self) -> None:
        self.pos = 0          # tokens [0, pos) consumed
        self.state = NONE

    def _step(self, tokens: np.ndarray, p: int) -> int:
        """State after token ``p`` given the state before it."""
        for ids, new in ((self.end_ids, ANSWER), (self.start_ids, THINK)):
            k = len(ids)
            if p + 1 >= k and tokens[p] == ids[-1] and tokens[p + 1 - k:p + 1].tolist() == ids:
                return new
        return self.state

    def advance(self, tokens: np.ndarray, upto: int) -> int:
        """Consume tokens up to (not including) ``upto``; return the state after them."""
        if self.pos > upto:
            self.reset()
        while self.pos < upto:
            self.state = self._step(tokens, self.pos)
            self.pos += 1
        return self.state

    def flags(self, tokens: np.ndarray, start: int, n: int, want: int) -> np.ndarray:
        """bool ``[n]``: tokens ``start..start+n-1`` are in state ``want`` (see module doc).

        ``tokens`` holds at least ``start + n`` ids of the request (prompt then output).
        """
        self.advance(tokens, start)   # rescans after preemption or for a replayed request
        out = np.zeros(n, dtype=bool)
        for j in range(n):
            before = self.state
            self.state = self._step(tokens, start + j)
            out[j] = before == want and self.state == want
        self.pos = start + n
        return out

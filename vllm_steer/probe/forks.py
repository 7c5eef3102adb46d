"""Where a trajectory is forked, what a fork's text is, and how a fork is steered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vllm_steer.probe.triggers import Candidate
from vllm_steer.steering.spec import SpecError, parse_spec
from vllm_steer.steering.think_tracker import ThinkTracker


def replay_spec(spec: dict[str, Any] | str | None, prompt_len: int) -> dict[str, Any] | None:
    """The trajectory's steering in absolute positions, for requests that replay its tokens.

    Rewritten by ``SteeringSpec.at_absolute_positions``, as the plugin's resolver rewrites
    every request, so the trajectory and its replays get the same prefix-cache salt.
    """
    if spec is None:
        return None
    parsed = parse_spec(spec)
    if parsed.condition is not None:
        raise SpecError("steering.condition", "a replay of a conditioned request is steered "
                        "by its decision: give 'decision' (what the trajectory's condition "
                        "decided) in place of 'condition'")
    return parsed.at_absolute_positions(prompt_len).to_dict()


def decided_spec(spec: dict[str, Any] | str | None, holds: bool | None
                 ) -> dict[str, Any] | str | None:
    """``spec`` with its condition replaced by the trajectory's decision ``holds`` (None:
    unchanged; a spec without a condition is returned as it is)."""
    if spec is None or holds is None:
        return spec
    parsed = parse_spec(spec)
    return parsed.decided(holds).to_dict() if parsed.condition is not None else spec


def fork_spec(spec: dict[str, Any] | str | None, prompt_len: int, token_index: int,
              steer_suffix: bool) -> dict[str, Any] | None:
    """Steering of a fork at generated-token index ``token_index``.

    ``steer_suffix``: the fork's appended tokens (think-end marker, suffix, choice tokens)
    are steered by the trajectory's rule, as the model's own next tokens would be.
    Otherwise steering stops at the fork point (``end_position = prompt_len +
    token_index``); None when that leaves nothing to steer.
    """
    d = replay_spec(spec, prompt_len)
    if d is None or steer_suffix:
        return d
    end = prompt_len + token_index
    if d.get("end_position") is not None:
        end = min(end, d["end_position"])
    if end <= d.get("start_position", 0):
        return None
    d["end_position"] = end
    return d


def marker_overlap(seq: Sequence[int], pos: int, markers: Sequence[Sequence[int]]) -> int:
    """How many tokens before ``pos`` belong to a marker that ``pos`` cuts: the marker's
    first ``i`` tokens end at ``pos`` and the sequence goes on with the rest of it (or
    ends, for a trajectory cut mid-marker). 0 when ``pos`` cuts no marker."""
    best = 0
    for m in markers:
        k = len(m)
        for i in range(1, k):
            if pos - i < 0 or list(seq[pos - i:pos]) != list(m[:i]):
                continue
            avail = min(k - i, len(seq) - pos)
            if list(seq[pos:pos + avail]) == list(m[i:i + avail]):
                best = max(best, i)
    return best


def move_out_of_markers(seq: Sequence[int], pos: int, prompt_len: int,
                        markers: Sequence[Sequence[int]]) -> int:
    """Generated-token index ``pos`` moved back to the start of any multi-token marker it
    would cut (a fork inside ``</think>`` would read ``...</</think>`` + suffix)."""
    while pos > 0 and (back := marker_overlap(seq, prompt_len + pos, markers)):
        pos = max(0, pos - back)
    return pos


def fork_points(seq: Sequence[int], prompt_len: int, every: int,
                markers: Sequence[Sequence[int]]) -> list[int]:
    """Generated-token indices to fork at: ``0, every, 2*every, ...`` and the end, each
    moved back to the start of any multi-token marker it would cut."""
    n = len(seq) - prompt_len
    return sorted({move_out_of_markers(seq, p, prompt_len, markers)
                   for p in sorted(set(range(0, n + 1, every)) | {n})})


def align_mode(align: str, multi_token: bool) -> str:
    """``ProbeConfig.align`` resolved: ``"block"`` is ``"base"`` for choice sets with
    multi-token variants (their forks share the base through the cache) and ``"prefix"``
    otherwise."""
    if align == "block":
        return "base" if multi_token else "prefix"
    return align


def place_point(seq: Sequence[int], prompt_len: int, cand: Candidate,
                markers: Sequence[Sequence[int]], align: str, block_size: int | None,
                tail_len: Callable[[int], int]) -> int:
    """Where a trigger's fork goes: ``cand.index`` moved out of any marker it cuts, then
    (``align`` ``"prefix"``/``"base"``, not for the start and end readings) back to the
    last point at or before it where the prefix (``prompt_len + p``), or the whole base
    (``+ tail_len(p)``: the think-end marker when the section is open there, and the
    suffix), ends on a KV-block boundary and no marker is cut; 0 when there is none.

    Only full blocks are shared through vLLM's prefix cache: a prefix-aligned fork
    computes only its think-end marker, suffix and choice tokens; a base-aligned one lets
    every request of a multi-token reading share the base."""
    p = move_out_of_markers(seq, cand.index, prompt_len, markers)
    if align == "none" or cand.kind in ("start", "end", "once"):
        return p
    if not block_size:
        raise ValueError("align needs the engine's KV block size")
    for q in range(p, -1, -1):
        extra = tail_len(q) if align == "base" else 0
        if (prompt_len + q + extra) % block_size == 0 and \
                not marker_overlap(seq, prompt_len + q, markers):
            return q
    return 0


def think_states(seq: Sequence[int], prompt_len: int, think_start: Sequence[int],
                 think_end: Sequence[int]) -> list[int]:
    """``states[i]``: thinking state (``tokens.NONE/THINK/ANSWER``) after ``prompt +
    generated[:i]``, for ``i = 0..n``, from one causal scan (the plugin's own rule)."""
    arr = np.asarray(seq, dtype=np.int64)
    tracker = ThinkTracker(tuple(think_start), tuple(think_end))
    return [tracker.advance(arr, prompt_len + i) for i in range(len(seq) - prompt_len + 1)]

"""Per-row sample log-probs in vLLM's V1 sampler: exact-ID rows and top-k rows in one batch.

vLLM 0.32's V1 ``Sampler.forward`` computes both the top-k gather (for rows that set
``logprobs``) and the exact-ID gather (for rows that set ``logprob_token_ids``, as probe
head forks do), then returns the exact-ID tensors *for the whole batch* ("prefer
logprob_token_ids"). Every top-k row of a mixed batch then carries only its sampled
token plus padding (``{0: -inf}``): one request changes another's output.

``install`` wraps ``Sampler.forward`` so that a mixed batch gets one merged
``LogprobsTensors``: each row laid out as the request asked (``[sampled, top-k...]`` or
``[sampled, ids...]``), padded to the widest row with token 0 / ``-inf``, which vLLM's
output processor never reads (it reads ``num_logprobs + 1`` columns of a row, and vLLM
requires ``logprobs == len(logprob_token_ids)`` when a request sets both). Nothing is
computed twice: the top-k gather that ``forward`` already runs is captured (by shadowing
``gather_logprobs`` on the sampler instance for the length of the call) and merged with
the exact-ID tensors ``forward`` returns. Batches that are not mixed take vLLM's code
untouched. Prompt log-probs use another path and are not affected by either.

vLLM 0.33.0 (read, not run: docs/vllm-versions.md) keeps this layout: its ``forward``
adds only an early return (a fused ROCm kernel) for batches that ask for no log-probs and
no exact ids, which the wrapper passes through untouched; it still accepts
``logprob_token_ids`` under the V1 runner (it refuses only beam-search allowlists there).

If ``forward`` no longer runs the top-k gather, or its exact-ID rows no longer hold the
requested ids, the wrapper raises ``VLLMDriftError`` rather than return rows that belong
to nobody.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_steer.vllm_adapter.drift import VLLMDriftError

_SAMPLER = "vllm.v1.sample.sampler:Sampler"


def merge_rows(topk: Any, exact: Any, exact_rows: Mapping[int, Sequence[int]]) -> Any:
    """One ``LogprobsTensors`` whose row ``i`` is ``exact``'s row when ``i`` asked for exact
    ids (``exact_rows``), else ``topk``'s.

    ``topk``/``exact``: vLLM ``LogprobsTensors`` of the same batch (``logprob_token_ids``
    int32 ``[B, Wt]`` / ``[B, We]``, ``logprobs`` float32 of the same shapes,
    ``selected_token_ranks`` ``[B]``, the sampled token's rank, equal in both). The result
    is ``[B, max(Wt, We)]``, padded with token 0 and ``-inf``. Raises ``VLLMDriftError``
    when an exact row does not hold ``[sampled, ids...]`` or the batch sizes differ.
    """
    t_ids, t_lp = topk.logprob_token_ids, topk.logprobs
    e_ids, e_lp = exact.logprob_token_ids, exact.logprobs
    if t_ids.ndim != 2 or e_ids.ndim != 2 or t_ids.shape[0] != e_ids.shape[0]:
        raise VLLMDriftError(f"{_SAMPLER}.forward", f"returned logprob rows of shape "
                             f"{tuple(e_ids.shape)} next to a top-k gather of shape "
                             f"{tuple(t_ids.shape)}: cannot merge them per row")
    rows = sorted(exact_rows)
    width = max(t_ids.shape[1], e_ids.shape[1])
    if rows:
        idx = torch.tensor(rows, dtype=torch.long, device=e_ids.device)
        m = max(len(exact_rows[r]) for r in rows)
        want = torch.zeros(len(rows), m, dtype=e_ids.dtype)
        for j, r in enumerate(rows):
            want[j, :len(exact_rows[r])] = torch.as_tensor(exact_rows[r], dtype=e_ids.dtype)
        got = e_ids.index_select(0, idx)[:, 1:m + 1].to("cpu")
        mask = torch.zeros_like(want, dtype=torch.bool)
        for j, r in enumerate(rows):
            mask[j, :len(exact_rows[r])] = True
        if got.shape != want.shape or not torch.equal(got[mask], want[mask]):
            raise VLLMDriftError(f"{_SAMPLER}.forward", "no longer returns exact-ID rows laid "
                                 "out as [sampled, logprob_token_ids...]: the per-row merge "
                                 "of a mixed batch cannot tell which row is whose")
    ids = t_ids.new_zeros((t_ids.shape[0], width))
    lp = t_lp.new_full((t_lp.shape[0], width), float("-inf"))
    ids[:, :t_ids.shape[1]] = t_ids
    lp[:, :t_lp.shape[1]] = t_lp
    if rows:
        ids[idx] = 0
        lp[idx] = float("-inf")
        ids[idx, :e_ids.shape[1]] = e_ids.index_select(0, idx).to(ids.dtype)
        lp[idx, :e_lp.shape[1]] = e_lp.index_select(0, idx).to(lp.dtype)
    return topk._replace(logprob_token_ids=ids, logprobs=lp)


def _wrap_forward(orig):
    @functools.wraps(orig)
    def forward(self, logits, sampling_metadata, *args, **kwargs):
        exact = sampling_metadata.logprob_token_ids
        k = sampling_metadata.max_num_logprobs
        # k == -1 is the rejection sampler's full-logits call; the frontend refuses
        # logprob_token_ids under speculative decoding, so it never meets exact ids here.
        if not exact or k is None or k == -1:
            return orig(self, logits, sampling_metadata, *args, **kwargs)
        captured: list[Any] = []
        gather = type(self).gather_logprobs

        def gather_logprobs(*a: Any, **kw: Any) -> Any:
            out = gather(*a, **kw)
            captured.append(out)
            return out

        # An instance attribute shadows the class's staticmethod for this call only.
        self.gather_logprobs = gather_logprobs
        try:
            out = orig(self, logits, sampling_metadata, *args, **kwargs)
        finally:
            del self.gather_logprobs
        if len(captured) != 1 or out.logprobs_tensors is None:
            raise VLLMDriftError(f"{_SAMPLER}.forward", f"ran the top-k gather "
                                 f"{len(captured)} times for a batch mixing logprobs and "
                                 "logprob_token_ids (expected once): the per-row merge "
                                 "cannot be made")
        merged = merge_rows(captured[0], out.logprobs_tensors, exact)
        self._vllm_steer_mixed = getattr(self, "_vllm_steer_mixed", 0) + 1
        return dataclasses.replace(out, logprobs_tensors=merged)

    forward._vllm_steer = True  # type: ignore[attr-defined]
    return forward


def install() -> None:
    """Wrap ``Sampler.forward`` (idempotent)."""
    from vllm.v1.sample.sampler import Sampler

    if not getattr(Sampler.forward, "_vllm_steer", False):
        Sampler.forward = _wrap_forward(Sampler.forward)


def mixed_batches(sampler: Any) -> int:
    """How many batches mixing top-k and exact-ID rows ``sampler`` has merged."""
    return int(getattr(sampler, "_vllm_steer_mixed", 0))


def is_installed(sampler: Any) -> bool:
    """Whether ``sampler``'s class runs the wrapped ``forward``."""
    return bool(getattr(type(sampler).forward, "_vllm_steer", False))

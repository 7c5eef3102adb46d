"""Hidden states read through the serving engine's capture (``vllm_adapter.capture``).

The engine counterpart of ``extract.hidden``: the same block outputs (layer ``i`` = output
of decoder block ``i``), read from the weights the engine already holds, batched by
vLLM's scheduler with prefix caching. ``capture_hidden`` is the general call (any
positions, any prompts); ``read_last_token_engine`` returns what ``read_last_token``
returns, running only "carrier" prompts (a prompt whose tokens begin another prompt's is
read from that prompt's forward, at its own last position) and letting the prefix cache
share the common template prefix. ``..._async`` variants take an ``EngineClient`` (the
OpenAI server's ``AsyncLLM``) and run while other traffic is served.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vllm_steer.extract.capture_budget import CaptureBudget, Pacer
from vllm_steer.extract.hidden import HiddenStateError, carriers, tokenize_prompts
from vllm_steer.vllm_adapter.capture import take_captures, take_captures_async

#: Requests submitted (and captures collected) per round: bounds what the workers hold.
DEFAULT_CHUNK = 1024


@dataclass(frozen=True)
class CaptureRequest:
    """One engine request: prompt token ids and its ``capture`` option (``id`` is filled
    in when submitted) with optional ``steering``."""

    prompt: list[int]
    capture: dict[str, Any]
    steering: dict[str, Any] | None = None

    def params(self, cid: str) -> Any:
        from vllm import SamplingParams

        extra: dict[str, Any] = {"capture": {**self.capture, "id": cid}}
        if self.steering is not None:
            extra["steering"] = self.steering
        return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                              extra_args=extra)


def _ids(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:12]
    return [f"vllm-steer-capture-{tag}-{k}" for k in range(n)]


def run_captures(llm: Any, requests: Sequence[CaptureRequest], *, chunk: int = DEFAULT_CHUNK,
                 progress: bool = True, desc: str = "capture") -> list[dict[str, Any]]:
    """Run ``requests`` on a ``vllm.LLM`` and return each one's capture record
    (``vllm_adapter.capture.take_captures``), in order."""
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    try:
        for lo in range(0, len(requests), chunk):
            part = requests[lo:lo + chunk]
            ids = _ids(len(part))
            llm.generate([{"prompt_token_ids": r.prompt} for r in part],
                         [r.params(cid) for r, cid in zip(part, ids, strict=True)],
                         use_tqdm=False)
            got = take_captures(llm, ids)
            out.extend(got[cid] for cid in ids)
            bar.update(len(part))
    finally:
        bar.close()
    return out


async def run_captures_async(engine: Any, requests: Sequence[CaptureRequest], *,
                             chunk: int = DEFAULT_CHUNK, max_concurrent: int | None = None,
                             on_progress: Callable[[int], None] | None = None,
                             data_parallel_rank: int | None = None,
                             budget: CaptureBudget | None = None,
                             on_submit: Callable[[int], None] | None = None
                             ) -> list[dict[str, Any]]:
    """``run_captures`` on an ``EngineClient``, scheduled with whatever else the engine
    serves. ``max_concurrent`` bounds the capture requests in flight (each adds its
    prompt's prefill to the engine's steps, so fewer in flight means shorter steps for the
    other traffic, at the cost of a slower job); ``budget`` paces them further
    (``extract.capture_budget``: bursts and a share of the engine's time); captures are
    collected per ``chunk``. ``on_submit(prompt tokens)`` is called per request sent.
    Under data parallelism pass ``data_parallel_rank`` (vLLM returns only the first
    engine's RPC result)."""
    gate = asyncio.Semaphore(max_concurrent or len(requests) or 1)
    kwargs = {} if data_parallel_rank is None else {"data_parallel_rank": data_parallel_rank}
    # engine share 1: no pacing, up to max_concurrent in flight all along (as before)
    pacer = (Pacer(budget, max_concurrent) if budget is not None and budget.engine_share < 1
             else None)

    async def one(item: tuple[CaptureRequest, str]) -> tuple[None, int]:
        r, cid = item
        async with gate:
            if on_submit is not None:
                on_submit(len(r.prompt))
            last = None
            async for out in engine.generate({"prompt_token_ids": r.prompt}, r.params(cid),
                                             cid, **kwargs):
                last = out
        cached = getattr(last, "num_cached_tokens", None) or 0
        return None, len(r.prompt) - int(cached)

    out: list[dict[str, Any]] = []
    for lo in range(0, len(requests), chunk):
        part = requests[lo:lo + chunk]
        ids = _ids(len(part))
        items = list(zip(part, ids, strict=True))
        if pacer is not None:
            await pacer.run(items, lambda it: len(it[0].prompt), one)
        else:
            await asyncio.gather(*(one(it) for it in items))
        got = await take_captures_async(engine, ids)
        out.extend(got[cid] for cid in ids)
        if on_progress is not None:
            on_progress(len(out))
    return out


def capture_hidden(llm: Any, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                   layers: Sequence[int] | str = "all", at: str = "last",
                   start: int | None = None, end: int | None = None,
                   positions: Sequence[int] | None = None,
                   steering: dict[str, Any] | None = None, tokenizer: Any = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Block outputs of ``prompts`` (strings, tokenized with ``tokenizer`` or the
    engine's, or token-id lists) through the engine: one record per prompt with
    ``layers``, ``positions`` (tokens modes) and ``values`` (float32 numpy, ``[layers,
    positions, hidden]``, or ``[layers, hidden]`` for ``at="mean"``). ``at``/``start``/
    ``end``/``positions`` as the ``capture`` option (``steering.capture_spec``)."""
    if prompts and isinstance(prompts[0], str):
        tok = tokenizer if tokenizer is not None else llm.get_tokenizer()
        rows = tokenize_prompts(tok, list(prompts))  # type: ignore[arg-type]
    else:
        rows = [list(p) for p in prompts]  # type: ignore[arg-type]
    spec: dict[str, Any] = {"layers": layers if isinstance(layers, str) else list(layers),
                            "at": at}
    for key, value in (("start", start), ("end", end)):
        if value is not None:
            spec[key] = value
    if positions is not None:
        spec["positions"] = list(positions)
    return run_captures(llm, [CaptureRequest(r, spec, steering) for r in rows],
                        progress=progress)


# -- extraction: each prompt's last token -----------------------------------------------------
@dataclass
class LastTokenPlan:
    """Carrier requests for reading every prompt's last token, and where each read goes:
    request ``r`` captures ``requests[r].capture["positions"]``; prompt ``reads[r][j]`` is
    read at column ``columns[r][j]`` of those positions."""

    requests: list[CaptureRequest]
    reads: list[list[int]]
    columns: list[list[int]]
    num_prompts: int
    layers: list[int]

    def assemble(self, records: Sequence[dict[str, Any]], prompts: Sequence[str] | None = None
                 ) -> dict[int, torch.Tensor]:
        """``{layer: float32 [num_prompts, hidden]}`` from the requests' capture records.
        Raises ``HiddenStateError`` naming the layer and prompt for a NaN/inf state."""
        hidden = int(records[0]["values"].shape[-1])
        out = np.empty((len(self.layers), self.num_prompts, hidden), dtype=np.float32)
        for rec, reads, cols in zip(records, self.reads, self.columns, strict=True):
            out[:, reads, :] = rec["values"][:, cols, :]   # values: [layers, positions, H]
        finite = np.isfinite(out).all(-1)
        if not finite.all():
            layer_i, k = (int(x) for x in np.argwhere(~finite)[0])
            text = f": {prompts[k][:200]!r}" if prompts is not None else ""
            raise HiddenStateError(f"layer {self.layers[layer_i]} produced non-finite hidden "
                                   f"states (NaN/inf) for prompt {k}{text}; try float32 "
                                   "instead of a half-precision dtype")
        return {layer: torch.from_numpy(out[i].copy()) for i, layer in enumerate(self.layers)}


def plan_last_token(rows: Sequence[Sequence[int]], layers: Sequence[int], *,
                    share_prefix: bool = True,
                    steering: dict[str, Any] | None = None) -> LastTokenPlan:
    """One request per carrier (``share_prefix``: a prompt whose tokens begin another's is
    read from that one's forward) or per prompt, capturing at ``layers`` the last
    position of every prompt it carries."""
    layers = sorted(set(int(i) for i in layers))
    if share_prefix:
        order, carrier = carriers(rows)
    else:
        order, carrier = list(range(len(rows))), list(range(len(rows)))
    by_carrier: dict[int, list[int]] = {}
    for k in order:
        by_carrier.setdefault(carrier[k], []).append(k)
    requests, reads, columns = [], [], []
    for c, ks in by_carrier.items():
        positions = sorted({len(rows[k]) - 1 for k in ks})   # duplicates share a position
        index = {p: j for j, p in enumerate(positions)}
        spec = {"layers": layers, "at": "positions", "positions": positions}
        requests.append(CaptureRequest(list(rows[c]), spec, steering))
        reads.append(list(ks))
        columns.append([index[len(rows[k]) - 1] for k in ks])
    return LastTokenPlan(requests, reads, columns, len(rows), layers)


def _checked(layers: Sequence[int], num_layers: int) -> list[int]:
    picked = sorted(set(int(i) for i in layers))
    bad = [i for i in picked if not 0 <= i < num_layers]
    if bad or not picked:
        raise ValueError(f"layers {bad or '[]'} out of range for a model with {num_layers} "
                         f"layers (valid: 0..{num_layers - 1})")
    return picked


def read_last_token_engine(
    llm: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    add_special_tokens: bool = True,
    share_prefix: bool = True,
    progress: bool = True,
    desc: str = "hidden states (engine)",
) -> dict[int, torch.Tensor]:
    """``extract.hidden.read_last_token`` through a ``vllm.LLM``'s capture:
    ``{layer: float32 [len(prompts), hidden]}`` at each prompt's last token."""
    from vllm_steer.vllm_adapter.engine import vllm_config

    if not prompts:
        raise ValueError("no prompts to run")
    num_layers = int(vllm_config(llm).model_config.hf_text_config.num_hidden_layers)
    rows = tokenize_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    plan = plan_last_token(rows, _checked(layers, num_layers), share_prefix=share_prefix)
    records = run_captures(llm, plan.requests, progress=progress, desc=desc)
    return plan.assemble(records, prompts)


async def read_last_token_engine_async(
    engine: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    num_layers: int,
    *,
    add_special_tokens: bool = True,
    max_concurrent: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    data_parallel_rank: int | None = None,
    budget: CaptureBudget | None = None,
    on_submit: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """``read_last_token_engine`` on an ``EngineClient`` (the server's training route);
    ``max_concurrent``, ``budget``, ``on_submit``: see ``run_captures_async``. Tokenizing
    and assembling run in a thread (the server's event loop keeps streaming)."""
    if not prompts:
        raise ValueError("no prompts to run")
    rows = await asyncio.to_thread(tokenize_prompts, tokenizer, prompts,
                                   add_special_tokens=add_special_tokens)
    plan = plan_last_token(rows, _checked(layers, num_layers))
    records = await run_captures_async(engine, plan.requests, max_concurrent=max_concurrent,
                                       on_progress=on_progress,
                                       data_parallel_rank=data_parallel_rank, budget=budget,
                                       on_submit=on_submit)
    return await asyncio.to_thread(plan.assemble, records, prompts)

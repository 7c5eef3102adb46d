"""Live probes on the OpenAI server: a ``probe`` field on ``/v1/chat/completions`` and
``/v1/completions``, readings streamed with the completion.

``install`` gives the adapter's serving hooks (``vllm_adapter.openai_serving``) ``begin``:
a request with ``probe`` (a body object, or a JSON string in ``vllm_xargs``) is validated
there (HTTP 400 naming the field) and gets a ``ServerProbe`` for the length of the call.

- ``ServerProbe.bind``: the request's own generator, passed on while a ``LiveRun`` forks
  the growing sequence on the same engine (a non-streamed request is generated
  cumulatively so that its tokens are seen as they come, and only its final output is
  passed on).
- ``ServerProbe.stream``: the streamed response, each reading in its own SSE chunk as
  soon as it and every earlier one are read, as ``choices[i].probe_readings``; a choice
  that stopped early carries ``probe_stop`` on its finish chunk. ``decorate``: the same
  two fields on a whole response's choices.

A client that disconnects closes the stream: the wrapper cancels every fork still
running (their engine requests are aborted) before the generator exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.live_drivers import LiveRun, final_output
from vllm_steer.probe.live_state import LiveProbe, LiveProbeConfig
from vllm_steer.server import metrics
from vllm_steer.server.requests import PROBE_KEY as BODY_KEY
from vllm_steer.server.sse import rewrite_events
from vllm_steer.steering.spec import SpecError, parse_extra_args
from vllm_steer.vllm_adapter import openai_serving
from vllm_steer.vllm_adapter.engine import block_size, input_processor, max_model_len
from vllm_steer.vllm_adapter.frontend import get_resolver
from vllm_steer.vllm_adapter.openai_requests import validation_error

logger = logging.getLogger("vllm_steer")
#: Fork requests in flight over every probed request of this process (the stats route).
LIVE = {"forks_in_flight": 0, "forks_submitted": 0, "probed_requests": 0}


def probe_config(request: Any) -> LiveProbeConfig | None:
    """The request's ``probe`` (body field, or ``vllm_xargs["probe"]`` as JSON, which is
    taken out of ``vllm_xargs``), validated; None when absent. Raises
    ``VLLMValidationError`` naming the field."""
    body = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    in_body, in_xargs = body.get(BODY_KEY), xargs.get(BODY_KEY)
    if in_body is not None and in_xargs is not None:
        raise validation_error("probe: given both in the body and in vllm_xargs; use one", BODY_KEY)
    raw = in_body if in_body is not None else in_xargs
    if raw is None:
        return None
    if in_xargs is not None:
        request.vllm_xargs = {k: v for k, v in xargs.items() if k != BODY_KEY} or None
    try:
        cfg = LiveProbeConfig.parse(raw)
    except ProbeError as e:
        raise validation_error(str(e), e.field) from None
    if getattr(request, "use_beam_search", False):
        raise validation_error("probe: not available with beam search", BODY_KEY)
    n = getattr(request, "n", None) or 1
    if cfg.stop_when is not None and n != 1:
        raise validation_error("probe.stop_when: early exit needs n == 1", "probe.stop_when")
    logprobs = getattr(request, "logprobs", None)
    if cfg.stop_when is not None and cfg.stop_when.complete and logprobs not in (None, False):
        raise validation_error("probe.stop_when.complete: the appended answer has no "
                               "log-probs; do not combine it with logprobs",
                               "probe.stop_when.complete")
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) \
            and len(prompt) > 1:
        raise validation_error("prompt: a probed completion takes one prompt", "prompt")
    return cfg


class ServerProbe:
    """One probed OpenAI request: its live run, and the rewriting of its response."""

    def __init__(self, cfg: LiveProbeConfig, engine_client: Any, request: Any) -> None:
        self.cfg, self.request = cfg, request
        self.tok = get_resolver(input_processor(engine_client)).tokenizer
        if self.tok is None:
            raise validation_error("probe: the server has no tokenizer", BODY_KEY)
        self.max_model_len = max_model_len(engine_client)
        try:
            self.probe = LiveProbe(self.tok, cfg, block_size(engine_client))
        except ProbeError as e:
            field = e.field if e.field.startswith(BODY_KEY) else f"{BODY_KEY}.{e.field}"
            raise validation_error(f"{field}: {str(e).split(': ', 1)[1]}", field) from None
        self.run: LiveRun | None = None
        self.max_tokens: int | None = None
        self.recorded = False
        self.request_id = ""
        #: Set by ``server.conditions.begin`` for a conditioned request: its reports (the
        #: forks are steered by each choice's decision; the response carries them).
        self.conditions: Any = None

    @property
    def bound(self) -> bool:
        return self.run is not None

    async def aclose(self) -> None:
        if self.run is not None:
            await self.run.aclose()

    # -- the engine side ------------------------------------------------------------
    def bind(self, submit: openai_serving.Submit, prompt: Any, sp: Any, request_id: str,
             args: tuple, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """The main request's generator (``submit`` reaches vLLM's ``AsyncLLM.generate``)."""
        from vllm.sampling_params import RequestOutputKind

        try:
            spec = parse_extra_args(sp.extra_args)
        except SpecError:
            spec = None   # the frontend refuses it with the field named when submitted
        sp = sp.clone()
        self._fit(prompt, sp)
        final_only = sp.output_kind == RequestOutputKind.FINAL_ONLY
        if final_only:
            sp.output_kind = RequestOutputKind.CUMULATIVE

        self.request_id = request_id
        if self.conditions is not None:
            self.conditions.request_id = request_id
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        self.run = LiveRun(self.probe, _counted(submit), request_id,
                           spec.to_dict() if spec else None, salt)
        self.max_tokens = sp.max_tokens
        LIVE["probed_requests"] += 1
        metrics.PROBE_REQUESTS.inc()
        main = submit(prompt, sp, request_id, *args, **kwargs)
        return self.main(main, sp.output_kind == RequestOutputKind.CUMULATIVE, final_only)

    def _fit(self, prompt: Any, sp: Any) -> None:
        """Room in the context for the last fork: prompt + output + the fork's own tokens.
        A request that set no max_tokens is shortened to fit; one that did is refused."""
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if ids is None or sp.max_tokens is None:
            return
        room = self.max_model_len - len(ids) - self.probe.extra_tokens()
        if sp.max_tokens <= room:
            return
        asked = (getattr(self.request, "max_completion_tokens", None)
                 or getattr(self.request, "max_tokens", None))
        if asked is not None or room < 1:
            raise validation_error(
                f"max_tokens: prompt ({len(ids)}) + max_tokens ({sp.max_tokens}) + the probe's "
                f"fork tokens ({self.probe.extra_tokens()}) exceed the model's context "
                f"({self.max_model_len})", "max_tokens")
        sp.max_tokens = room

    async def main(self, gen: AsyncIterator[Any], cumulative: bool, final_only: bool
                   ) -> AsyncIterator[Any]:
        run = self.run
        latest: dict[int, Any] = {}
        generated: dict[int, int] = {}   # tokens generated per choice (the metrics)
        last = None
        it = gen.__aiter__()
        try:
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                stop = asyncio.ensure_future(run.settled.wait())
                done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:   # settled early, or a fork failed
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    break
                stop.cancel()
                try:
                    out = nxt.result()
                except StopAsyncIteration:
                    return
                if self.conditions is not None and run.state.undecided(out):
                    # the choice's prompt is computed: its forks need its decision
                    new = run.state.undecided(out)
                    await self.conditions.fetch(new)
                    run.state.decide([r for i in new if (r := self.conditions.get(i))])
                run.observe(out, cumulative)
                last = out
                for c in out.outputs:
                    latest[c.index] = c
                    n = len(c.token_ids)
                    generated[c.index] = n if cumulative else generated.get(c.index, 0) + n
                if out.finished:
                    await run.wait_readings()   # the finish chunk comes after every reading
                    if final_only:
                        out = final_output(out, _ordered(latest), {}, self.tok, delta=False)
                    yield out
                    return
                if not final_only:
                    yield out
            if run.error is not None:
                raise run.error
            # early exit: the main request is aborted when its generator closes (below)
            await gen.aclose()
            await run.aclose()
            yield final_output(last, _ordered(latest) if final_only else
                               [c for c in _ordered(latest) if c.index in run.state.stops],
                               run.state.stops, self.tok, delta=not cumulative)
        finally:
            await gen.aclose()
            await run.aclose()
            self._record(generated)

    def _record(self, generated: dict[int, int]) -> None:
        """The request's probe metrics, once: readings delivered, early exits and the
        tokens they saved (``max_tokens`` minus the tokens generated when it stopped)."""
        if self.recorded or self.run is None:
            return
        self.recorded = True
        stops = self.run.state.stops
        saved = (sum(max(0, self.max_tokens - generated.get(i, 0)) for i in stops)
                 if self.max_tokens is not None else 0)
        metrics.probe_finished(sum(len(v) for v in self.run.readings.values()), len(stops),
                               saved)

    # -- the response side ------------------------------------------------------------
    def _stop_json(self, index: int) -> dict[str, Any] | None:
        rec = self.run.state.stops.get(index) if self.run else None
        return rec.to_json(self.tok) if rec else None

    def decorate(self, response: Any) -> Any:
        """A non-streamed response: readings (and early exits) on its choices."""
        for choice in getattr(response, "choices", None) or []:
            i = choice.index
            choice.probe_readings = self.run.readings.get(i, [])
            stop = self._stop_json(i)
            if stop is not None:
                choice.probe_stop = stop
        if self.conditions is not None:
            self.conditions.decorate(response)
        return response

    async def stream(self, sse: AsyncIterator[str], chat: bool) -> AsyncIterator[str]:
        """The SSE stream with reading chunks merged in (token order per choice) and
        ``probe_stop`` on the finish chunk of a choice that stopped early."""
        run = self.run
        head: dict[str, Any] | None = None
        held: list[tuple[int, list[dict[str, Any]]]] = []
        it = sse.__aiter__()
        nxt = asyncio.ensure_future(it.__anext__())
        ev = asyncio.ensure_future(run.events.get())
        try:
            while True:
                await asyncio.wait({nxt, ev}, return_when=asyncio.FIRST_COMPLETED)
                if ev.done():
                    held.append(ev.result())
                    while not run.events.empty():
                        held.append(run.events.get_nowait())
                    ev = asyncio.ensure_future(run.events.get())
                if held and head is not None:
                    yield self._readings_chunk(head, held, chat)
                    held = []
                if not nxt.done():
                    continue
                try:
                    text = nxt.result()
                except StopAsyncIteration:
                    return
                while not run.events.empty():   # readings queued with this output go first
                    held.append(run.events.get_nowait())
                if held and head is not None:
                    yield self._readings_chunk(head, held, chat)
                    held = []
                text, head = self._decorate_chunk(text, head)
                yield text
                if held:   # readings that came before the first chunk named the response
                    yield self._readings_chunk(head, held, chat)
                    held = []
                nxt = asyncio.ensure_future(it.__anext__())
        finally:
            for f in (nxt, ev):
                f.cancel()
            await asyncio.gather(nxt, ev, return_exceptions=True)
            await sse.aclose()
            await run.aclose()

    def _decorate_chunk(self, text: str, head: dict[str, Any] | None
                        ) -> tuple[str, dict[str, Any] | None]:
        found = [head]

        def edit(obj: Any) -> bool:
            if found[0] is None and isinstance(obj, dict) and "id" in obj:
                found[0] = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
            changed = False
            for c in (obj.get("choices") or []) if isinstance(obj, dict) else []:
                if c.get("finish_reason") is not None:
                    stop = self._stop_json(c.get("index", 0))
                    if stop is not None:
                        c["probe_stop"] = stop
                        changed = True
            if self.conditions is not None:
                changed = self.conditions.decorate_chunk_obj(obj) or changed
            return changed

        return rewrite_events(text, edit), found[0]

    @staticmethod
    def _readings_chunk(head: dict[str, Any], held: list[tuple[int, list[dict[str, Any]]]],
                        chat: bool) -> str:
        by_index: dict[int, list[dict[str, Any]]] = {}
        for i, rs in held:
            by_index.setdefault(i, []).extend(rs)
        empty = {"delta": {}} if chat else {"text": ""}
        chunk = {**head, "choices": [{"index": i, **empty, "logprobs": None,
                                      "finish_reason": None, "probe_readings": rs}
                                     for i, rs in sorted(by_index.items())]}
        return f"data: {json.dumps(chunk)}\n\n"


def _ordered(latest: dict[int, Any]) -> list[Any]:
    return [latest[i] for i in sorted(latest)]


def _counted(fork: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def gen(*a: Any) -> AsyncIterator[Any]:
        LIVE["forks_in_flight"] += 1
        LIVE["forks_submitted"] += 1
        metrics.fork_submitted(str(a[2]))   # (prompt, params, request id)
        try:
            async for o in fork(*a):
                yield o
        finally:
            LIVE["forks_in_flight"] -= 1
            metrics.fork_ended()

    return gen


def begin(engine_client: Any, request: Any) -> ServerProbe | None:
    """The serving hook: a ``ServerProbe`` for a probed request, else None."""
    cfg = probe_config(request)
    return None if cfg is None else ServerProbe(cfg, engine_client, request)


def install() -> None:
    """Serve live probes in this process (the endpoint plugin, when the routes mount)."""
    openai_serving.install(begin)

"""Condition reports on OpenAI responses: each choice of a conditioned request carries
``steering_condition`` (``{"holds", "mode", "conditions": [{"label", "layer",
"aggregate", "threshold", "compare", "score", "holds"}], "error"}``), on the choice of a
whole response and on each choice's finish chunk of a stream.

``begin`` is the serving hook (``vllm_adapter.openai_serving``) for requests with a
condition or a live probe: a probed request gets ``server.live_probe.ServerProbe`` (whose
forks are steered by the request's decision), a conditioned one a ``ConditionSession``.
The reports are collected from the workers (``vllm_adapter.conditions``) by the request
id vLLM's serving code gave the engine, once a choice has output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from vllm_steer.server.body import conditioned
from vllm_steer.server.sse import rewrite_events
from vllm_steer.vllm_adapter import openai_serving
from vllm_steer.vllm_adapter.conditions import take_conditions_async

#: The response field of a choice's condition report.
FIELD = "steering_condition"


class ConditionReports:
    """The reports of one served request, by choice index, fetched as choices need them."""

    def __init__(self, engine_client: Any) -> None:
        self.engine_client = engine_client
        self.request_id: str | None = None
        self.by_index: dict[int, dict[str, Any]] = {}

    async def fetch(self, indices: list[int]) -> None:
        """Collect reports until each of ``indices`` has a decided one (a choice that
        produced output has one; a report still undecided is asked for again later)."""
        want = [i for i in indices if (self.by_index.get(i) or {}).get("holds") is None]
        if not want or self.request_id is None:
            return
        got = await take_conditions_async(self.engine_client, [self.request_id])
        for rep in got.get(self.request_id, []):
            self.by_index[rep["index"] or 0] = rep

    def get(self, index: int) -> dict[str, Any] | None:
        return self.by_index.get(index)

    def decorate(self, response: Any) -> Any:
        for choice in getattr(response, "choices", None) or []:
            rep = self.get(choice.index)
            if rep is not None:
                setattr(choice, FIELD, rep)
        return response

    def decorate_chunk_obj(self, obj: Any) -> bool:
        """Add the reports to the finish chunks in an SSE event object; True if changed."""
        changed = False
        for c in (obj.get("choices") or []) if isinstance(obj, dict) else []:
            if c.get("finish_reason") is not None:
                rep = self.get(c.get("index", 0))
                if rep is not None:
                    c[FIELD] = rep
                    changed = True
        return changed


class ConditionSession:
    """A conditioned request without a probe: its outputs pass through; each choice's
    report is collected when it finishes and added to the response."""

    def __init__(self, engine_client: Any) -> None:
        self.reports = ConditionReports(engine_client)
        self.bound = False

    def bind(self, submit: openai_serving.Submit, prompt: Any, sp: Any, request_id: str,
             args: tuple, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        self.bound = True
        self.reports.request_id = request_id
        return self._main(submit(prompt, sp, request_id, *args, **kwargs))

    async def _main(self, gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for out in gen:
                done = [c.index for c in out.outputs if c.finish_reason is not None]
                if done:
                    await self.reports.fetch(done)
                yield out
        finally:
            await gen.aclose()

    def decorate(self, response: Any) -> Any:
        return self.reports.decorate(response)

    async def stream(self, sse: AsyncIterator[str], chat: bool) -> AsyncIterator[str]:
        try:
            async for text in sse:
                yield decorate_sse(text, self.reports)
        finally:
            await sse.aclose()

    async def aclose(self) -> None:
        return None


def decorate_sse(text: str, reports: ConditionReports) -> str:
    """``text`` (SSE events) with the reports on its finish chunks."""
    return rewrite_events(text, reports.decorate_chunk_obj)


def begin(engine_client: Any, request: Any) -> Any:
    """The serving hook: a live probe's session (told about the condition), a
    ``ConditionSession``, or None."""
    from vllm_steer.server.live_probe import begin as begin_probe

    has_condition = conditioned(request)
    probe = begin_probe(engine_client, request)
    if probe is not None:
        if has_condition:
            probe.conditions = ConditionReports(engine_client)
        return probe
    return ConditionSession(engine_client) if has_condition else None


def install() -> None:
    """Serve condition reports and live probes in this process (the endpoint plugin)."""
    openai_serving.install(begin)

"""Hooks on vLLM's OpenAI serving methods for requests that need the engine while they are
served (live probes: ``vllm_steer.server.live_probe``).

Two patches (rows in ``symbols.py``):

- ``OpenAIServingChat.create_chat_completion`` / ``OpenAIServingCompletion.
  create_completion``: ``begin(engine_client, request)`` (the installed hook) decides
  whether the request is one of ours; if so, it returns a ``Session`` that lives for the
  call (a context variable) and rewrites the result: ``session.stream(sse, chat)`` for a
  streamed response, ``session.decorate(response)`` for a whole one.
- ``AsyncLLM.generate``: called by those methods while a session is set, it hands the
  session the request (``session.bind``) with a ``submit(prompt, params, request_id)``
  that reaches vLLM's own ``generate`` on the same engine (for the request and for any
  side requests the session makes); every other call is vLLM's generator, untouched.

A streamed request whose session was never bound means vLLM no longer calls
``AsyncLLM.generate`` from these methods: ``VLLMDriftError``, never a silent no-op.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from vllm_steer.vllm_adapter.check import check_all
from vllm_steer.vllm_adapter.drift import VLLMDriftError

#: module -> (serving class, method) whose requests may carry a session.
TARGETS = {"vllm.entrypoints.openai.chat_completion.serving": ("OpenAIServingChat",
                                                               "create_chat_completion"),
           "vllm.entrypoints.openai.completion.serving": ("OpenAIServingCompletion",
                                                          "create_completion")}
#: ``submit(prompt, sampling_params, request_id)``: vLLM's ``AsyncLLM.generate`` on the
#: engine that serves the request.
Submit = Callable[..., AsyncIterator[Any]]


class Session(Protocol):
    """One served request that a hook took over (see the module docstring)."""

    bound: bool

    def bind(self, submit: Submit, prompt: Any, sampling_params: Any, request_id: str,
             args: tuple, kwargs: dict[str, Any]) -> AsyncIterator[Any]: ...

    def stream(self, sse: AsyncIterator[str], chat: bool) -> AsyncIterator[str]: ...

    def decorate(self, response: Any) -> Any: ...

    async def aclose(self) -> None: ...


#: ``begin(engine_client, request) -> Session | None`` (raises to refuse the request).
Begin = Callable[[Any, Any], "Session | None"]
_CURRENT: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "vllm_steer_session", default=None)
_begin: Begin | None = None


def _wrap_create(orig: Callable[..., Any], chat: bool) -> Callable[..., Any]:
    @functools.wraps(orig)
    async def create(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        session = _begin(self.engine_client, request) if _begin is not None else None
        if session is None:
            return await orig(self, request, *args, **kwargs)
        token = _CURRENT.set(session)
        try:
            result = await orig(self, request, *args, **kwargs)
        finally:
            _CURRENT.reset(token)
        if hasattr(result, "__aiter__"):
            if not session.bound:
                raise VLLMDriftError("vllm.v1.engine.async_llm:AsyncLLM.generate",
                                     "was not reached by a served session's request: its "
                                     "side requests would never run")
            return session.stream(result, chat)
        if session.bound and getattr(result, "choices", None) is not None:
            return session.decorate(result)
        if session.bound:
            await session.aclose()
        return result

    create._vllm_steer = True  # type: ignore[attr-defined]
    return create


def _wrap_generate(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def generate(self: Any, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                 **kwargs: Any) -> Any:
        session = _CURRENT.get()
        if session is None or session.bound or not hasattr(sampling_params, "output_kind"):
            return orig(self, prompt, sampling_params, request_id, *args, **kwargs)

        def submit(p: Any, sp: Any, rid: str, *a: Any, **kw: Any) -> AsyncIterator[Any]:
            return orig(self, p, sp, rid, *a, **kw)

        return session.bind(submit, prompt, sampling_params, request_id, args, kwargs)

    generate._vllm_steer = True  # type: ignore[attr-defined]
    return generate


def installed() -> bool:
    """Whether this process's serving methods have a ``begin`` hook."""
    return _begin is not None


def install(begin: Begin) -> None:
    """Check the ``api`` rows of the symbol table, then wrap the serving methods and
    ``AsyncLLM.generate`` (idempotent; ``begin`` replaces an earlier hook). Called by the
    endpoint plugin in the API-server process: those modules take seconds to import, too
    much for every vLLM process."""
    global _begin
    from vllm.v1.engine.async_llm import AsyncLLM

    check_all(scope="api")
    for module, (cls_name, method) in TARGETS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        fn = cls.__dict__[method]
        if not getattr(fn, "_vllm_steer", False):
            setattr(cls, method, _wrap_create(fn, chat="chat" in module))
    if not getattr(AsyncLLM.generate, "_vllm_steer", False):
        AsyncLLM.generate = _wrap_generate(AsyncLLM.generate)
    _begin = begin

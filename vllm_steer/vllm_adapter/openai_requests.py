"""Hooks on vLLM's OpenAI request models and its ``--api-key`` middleware.

``install(on_sampling_params, on_beam_search)`` wraps ``to_sampling_params`` and
``to_beam_search_params`` of the chat, completions and responses request models: the
hooks (``vllm_steer.server.requests``) see each request and its ``SamplingParams`` and may
edit ``extra_args`` or refuse with ``validation_error`` (HTTP 400 naming the field) before
a streaming response starts. The wrapped modules are imported at plugin load (the runner
modules the plugin patches import most of them anyway; the rest costs ~15 ms).

``install_auth(prefix, also_accept)`` (called when the routes are mounted) changes vLLM's
``--api-key`` middleware, which runs before any route: requests under ``prefix`` pass
through to the plugin's routes, which check the keys themselves (roles, OpenAI's error
shape, the audit trail; vLLM would answer ``{"error": "Unauthorized"}``), and
``also_accept(headers)`` names more keys the middleware lets through on every other path
it guards (the plugin's admin and file keys).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any

#: vLLM's ``--api-key`` middleware (``install_auth``).
AUTH_MIDDLEWARE = ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware")
#: module -> request classes whose sampling-parameter builders are wrapped.
TARGETS: dict[str, tuple[str, ...]] = {
    "vllm.entrypoints.openai.chat_completion.protocol": ("ChatCompletionRequest",),
    "vllm.entrypoints.openai.completion.protocol": ("CompletionRequest",),
    "vllm.entrypoints.openai.responses.protocol": ("ResponsesRequest",),
}
#: ``(request model, SamplingParams) -> None``; may edit the params or raise.
SamplingHook = Callable[[Any, Any], None]
#: ``(request model) -> None``; may raise.
BeamHook = Callable[[Any], None]
_lock = threading.Lock()
#: Path prefixes whose requests the middleware passes to the app unchecked.
_auth_prefixes: set[str] = set()
#: ``headers -> bool``: more keys vLLM's middleware accepts (``install_auth``).
_also_accept: Callable[[Any], bool] | None = None


def validation_error(message: str, field: str | None) -> Exception:
    """vLLM's ``VLLMValidationError`` (HTTP 400 with ``param`` = ``field``)."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=field)


def api_keys(app_args: Any) -> list[str]:
    """The server's API keys: ``--api-key`` values, else ``VLLM_API_KEY``."""
    from vllm import envs

    return [k for k in (getattr(app_args, "api_key", None) or [envs.VLLM_API_KEY]) if k]


def _wrap_sampling(orig: Callable[..., Any], hook: SamplingHook) -> Callable[..., Any]:
    @functools.wraps(orig)
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = orig(self, *args, **kwargs)
        hook(self, params)
        return params

    to_sampling_params._vllm_steer = True  # type: ignore[attr-defined]
    return to_sampling_params


def _wrap_beam(orig: Callable[..., Any], hook: BeamHook) -> Callable[..., Any]:
    @functools.wraps(orig)
    def to_beam_search_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        hook(self)
        return orig(self, *args, **kwargs)

    to_beam_search_params._vllm_steer = True  # type: ignore[attr-defined]
    return to_beam_search_params


def install(on_sampling_params: SamplingHook, on_beam_search: BeamHook) -> None:
    """Wrap the request models' builders with the hooks (idempotent: the first hooks
    stay; the symbol table checked the builders)."""
    with _lock:
        for module_name, class_names in TARGETS.items():
            module = importlib.import_module(module_name)
            for cls_name in class_names:
                cls = getattr(module, cls_name)
                for attr, wrap, hook in (("to_sampling_params", _wrap_sampling,
                                          on_sampling_params),
                                         ("to_beam_search_params", _wrap_beam, on_beam_search)):
                    fn = cls.__dict__.get(attr)
                    if fn is not None and not getattr(fn, "_vllm_steer", False):
                        setattr(cls, attr, wrap(fn, hook))


def _under(path: str, prefixes: set[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _wrap_auth_call(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def __call__(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        if scope.get("type") == "http":
            path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
            if _under(path, _auth_prefixes):
                return self.app(scope, receive, send)   # the routes check the keys
        return orig(self, scope, receive, send)

    __call__._vllm_steer = True  # type: ignore[attr-defined]
    return __call__


def _wrap_verify(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def verify_token(self: Any, headers: Any) -> bool:
        if orig(self, headers):
            return True
        return _also_accept is not None and bool(_also_accept(headers))

    verify_token._vllm_steer = True  # type: ignore[attr-defined]
    return verify_token


def install_auth(prefix: str, also_accept: Callable[[Any], bool] | None = None) -> None:
    """Requests under ``prefix`` reach the app without vLLM's key check (the routes there
    check keys themselves); ``also_accept(headers)`` true lets a request through vLLM's
    check elsewhere (idempotent; the symbol table checked the middleware's
    ``__call__``/``verify_token``/``app``)."""
    global _also_accept
    module_name, cls_name = AUTH_MIDDLEWARE
    with _lock:
        _auth_prefixes.add(prefix.rstrip("/"))
        _also_accept = also_accept
        cls = getattr(importlib.import_module(module_name), cls_name)
        fn = cls.__dict__["__call__"]
        if not getattr(fn, "_vllm_steer", False):
            cls.__call__ = _wrap_auth_call(fn)
        verify = cls.__dict__["verify_token"]
        if not getattr(verify, "_vllm_steer", False):
            cls.verify_token = _wrap_verify(verify)

"""The OpenAI server side: request-body steering, validation errors, the API key.

``install`` wraps ``to_sampling_params`` (and ``to_beam_search_params``) of vLLM's chat,
completions and responses request models, so a body ``"steering"`` object reaches
``extra_args`` (``server.body.merged_extra_args``) and is validated before a streaming
response starts (``frontend.prevalidate``). The modules are imported at plugin load (the
runner modules the plugin patches import most of them anyway; the rest costs ~15 ms).

``install_auth_errors`` (called when the routes are mounted) makes vLLM's ``--api-key``
middleware answer requests under the plugin's path prefix in OpenAI's error shape: the
middleware runs before any route and answers ``{"error": "Unauthorized"}`` (a string, not
the object every other error of the routes is). Paths outside the prefix are vLLM's and
keep vLLM's answer.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any

from vllm_steer.server.body import has_steering, merged_extra_args
from vllm_steer.steering.spec import SpecError

#: vLLM's ``--api-key`` middleware (``install_auth_errors``).
AUTH_MIDDLEWARE = ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware")
#: Path prefixes whose unauthorized requests get the plugin's 401.
_auth_prefixes: set[str] = set()
#: module -> request classes whose sampling-parameter builders are wrapped.
TARGETS: dict[str, tuple[str, ...]] = {
    "vllm.entrypoints.openai.chat_completion.protocol": ("ChatCompletionRequest",),
    "vllm.entrypoints.openai.completion.protocol": ("CompletionRequest",),
    "vllm.entrypoints.openai.responses.protocol": ("ResponsesRequest",),
}
_lock = threading.Lock()


def validation_error(message: str, field: str | None) -> Exception:
    """vLLM's ``VLLMValidationError`` (HTTP 400 with ``param`` = ``field``)."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=field)


def api_keys(app_args: Any) -> list[str]:
    """The server's API keys: ``--api-key`` values, else ``VLLM_API_KEY``."""
    from vllm import envs

    return [k for k in (getattr(app_args, "api_key", None) or [envs.VLLM_API_KEY]) if k]


def _wrap_sampling(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm_steer.vllm_adapter.frontend import prevalidate

        params = orig(self, *args, **kwargs)
        _refuse_unserved_probe(self)
        try:
            extra = merged_extra_args(self, params.extra_args)
        except SpecError as e:
            raise validation_error(str(e), e.field) from e
        if extra is not params.extra_args:
            params.extra_args = extra
        prevalidate(params.extra_args)
        return params

    to_sampling_params._vllm_steer = True  # type: ignore[attr-defined]
    return to_sampling_params


def _refuse_unserved_probe(request: Any) -> None:
    """A ``probe`` field where live probes are not installed (the endpoint plugin is not
    enabled, or the responses API) is an error, not a field dropped in silence."""
    from vllm_steer.vllm_adapter import live_server

    body = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    if body.get("probe") is None and xargs.get("probe") is None:
        return
    if not live_server.installed():
        raise validation_error("probe: live probes are served by the vllm_steer_routes "
                               "endpoint plugin (VLLM_PLUGINS=vllm_steer,vllm_steer_routes)",
                               "probe")
    if type(request).__name__ not in ("ChatCompletionRequest", "CompletionRequest"):
        raise validation_error("probe: only /v1/chat/completions and /v1/completions take a "
                               "live probe", "probe")


def _wrap_beam(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def to_beam_search_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        if has_steering(self):
            raise validation_error("steering is not supported with beam search",
                                   "use_beam_search")
        return orig(self, *args, **kwargs)

    to_beam_search_params._vllm_steer = True  # type: ignore[attr-defined]
    return to_beam_search_params


def install() -> None:
    """Wrap the request models' builders (idempotent; the symbol table checked them)."""
    with _lock:
        for module_name, class_names in TARGETS.items():
            module = importlib.import_module(module_name)
            for cls_name in class_names:
                cls = getattr(module, cls_name)
                for attr, wrap in (("to_sampling_params", _wrap_sampling),
                                   ("to_beam_search_params", _wrap_beam)):
                    fn = cls.__dict__.get(attr)
                    if fn is not None and not getattr(fn, "_vllm_steer", False):
                        setattr(cls, attr, wrap(fn))


def _under(path: str, prefixes: set[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _wrap_auth_call(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def __call__(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        if scope.get("type") == "http" and scope.get("method") != "OPTIONS":
            path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
            if _under(path, _auth_prefixes):
                from starlette.datastructures import Headers

                from vllm_steer.server.common import UNAUTHORIZED, error_response

                if not self.verify_token(Headers(scope=scope)):
                    return error_response(*UNAUTHORIZED)(scope, receive, send)
        return orig(self, scope, receive, send)

    __call__._vllm_steer = True  # type: ignore[attr-defined]
    return __call__


def install_auth_errors(prefix: str) -> None:
    """Unauthorized requests under ``prefix`` are answered in OpenAI's error shape
    (idempotent; the symbol table checked the middleware's ``__call__``/``verify_token``)."""
    module_name, cls_name = AUTH_MIDDLEWARE
    with _lock:
        _auth_prefixes.add(prefix.rstrip("/"))
        cls = getattr(importlib.import_module(module_name), cls_name)
        fn = cls.__dict__["__call__"]
        if not getattr(fn, "_vllm_steer", False):
            cls.__call__ = _wrap_auth_call(fn)

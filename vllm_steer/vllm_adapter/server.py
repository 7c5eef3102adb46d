"""The OpenAI server side: request-body steering, validation errors, the API key.

``install`` wraps ``to_sampling_params`` (and ``to_beam_search_params``) of vLLM's chat,
completions and responses request models, so a body ``"steering"`` object reaches
``extra_args`` (``server.body.merged_extra_args``) and is validated before a streaming
response starts (``frontend.prevalidate``). The modules are imported at plugin load (the
runner modules the plugin patches import most of them anyway; the rest costs ~15 ms).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any

from vllm_steer.server.body import has_steering, merged_extra_args
from vllm_steer.steering.spec import SpecError

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

"""A top-level ``"steering"`` object in an OpenAI request body -> ``extra_args["steering"]``.

vLLM's OpenAI request models accept unknown top-level fields (pydantic ``extra="allow"``)
and drop them with a debug log; only ``vllm_xargs`` becomes ``SamplingParams.extra_args``.
This module wraps ``to_sampling_params`` of the chat, completions and responses request
models so that ``steering`` (what the official client sends with ``extra_body``) lands in
``extra_args["steering"]``, exactly where ``vllm_xargs={"steering": "<json>"}`` puts it.

Nothing is silently ignored: a ``steering`` next to steering keys in ``vllm_xargs``, a
stray top-level ``steer*`` field, or steering with beam search (whose sub-requests do not
carry ``extra_args``) is a 400 naming the field. The spec is also validated against the
registry and the model right here (``frontend_hook.prevalidate``), so a streaming request
with a bad spec gets its 400 before the stream's 200 is sent.

The protocol modules are heavy, and the general plugin runs in every vLLM process, so the
patch is applied when (and only if) a process imports them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from vllm_steer.steering.spec import EXTRA_ARGS_KEY, FLAT_KEYS, SpecError

logger = logging.getLogger("vllm_steer")

BODY_KEY = "steering"
#: module -> request classes whose sampling-parameter builders are wrapped.
TARGETS: dict[str, tuple[str, ...]] = {
    "vllm.entrypoints.openai.chat_completion.protocol": ("ChatCompletionRequest",),
    "vllm.entrypoints.openai.completion.protocol": ("CompletionRequest",),
    "vllm.entrypoints.openai.responses.protocol": ("ResponsesRequest",),
}
_lock = threading.Lock()


def _is_steer_key(key: str) -> bool:
    return key == EXTRA_ARGS_KEY or key in FLAT_KEYS or key.startswith("steer")


def merged_extra_args(request: Any, extra_args: dict[str, Any] | None
                      ) -> dict[str, Any] | None:
    """``extra_args`` with the body's ``steering`` added; raises ``SpecError`` on conflicts."""
    body = getattr(request, "model_extra", None) or {}
    stray = sorted(k for k in body if isinstance(k, str) and k.startswith("steer")
                   and k != BODY_KEY)
    if stray:
        raise SpecError(stray[0], "unknown top-level field: give a 'steering' object, or the "
                        f"flat shorthand ({', '.join(FLAT_KEYS)}) inside vllm_xargs")
    value = body.get(BODY_KEY)
    if value is None:  # absent, or an explicit null: unsteered
        return extra_args
    clash = sorted(k for k in (extra_args or {}) if _is_steer_key(k))
    if clash:
        raise SpecError(BODY_KEY, f"steering given both in the body and in vllm_xargs "
                        f"({clash[0]}); use one")
    out = dict(extra_args or {})
    out[EXTRA_ARGS_KEY] = value
    return out


def _has_steering(request: Any) -> bool:
    body = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    return body.get(BODY_KEY) is not None or any(_is_steer_key(k) for k in xargs)


def _validation_error(e: SpecError) -> Exception:
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(str(e), parameter=e.field)


def _wrap_sampling(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm_steer.steering.frontend_hook import prevalidate

        params = orig(self, *args, **kwargs)
        try:
            extra = merged_extra_args(self, params.extra_args)
        except SpecError as e:
            raise _validation_error(e) from e
        if extra is not params.extra_args:
            params.extra_args = extra
        prevalidate(params.extra_args)
        return params

    to_sampling_params._vllm_steer = True  # type: ignore[attr-defined]
    return to_sampling_params


def _wrap_beam(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def to_beam_search_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _has_steering(self):
            raise _validation_error(SpecError(
                "use_beam_search", "steering is not supported with beam search"))
        return orig(self, *args, **kwargs)

    to_beam_search_params._vllm_steer = True  # type: ignore[attr-defined]
    return to_beam_search_params


def patch_module(module: ModuleType) -> None:
    """Wrap the request classes of one protocol module (idempotent)."""
    for cls_name in TARGETS.get(module.__name__, ()):
        cls = getattr(module, cls_name, None)
        if cls is None:
            logger.warning("vllm-steer: %s.%s not found; body 'steering' is not wired there",
                           module.__name__, cls_name)
            continue
        for attr, wrap in (("to_sampling_params", _wrap_sampling),
                           ("to_beam_search_params", _wrap_beam)):
            fn = cls.__dict__.get(attr)
            if fn is not None and not getattr(fn, "_vllm_steer", False):
                setattr(cls, attr, wrap(fn))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patch_module`` right after a target module is executed."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            orig_exec(module)
            patch_module(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch the protocol modules already imported; hook the others' import."""
    with _lock:
        pending = set()
        for name in TARGETS:
            module = sys.modules.get(name)
            if module is not None:
                patch_module(module)
            else:
                pending.add(name)
        if pending and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport(pending))

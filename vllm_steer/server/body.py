"""A top-level ``"steering"`` object in an OpenAI request body -> ``extra_args["steering"]``.

vLLM's OpenAI request models accept unknown top-level fields (pydantic ``extra="allow"``)
and drop them with a debug log; only ``vllm_xargs`` becomes ``SamplingParams.extra_args``.
The general plugin wraps ``to_sampling_params`` of the chat, completions and responses
request models (``server.requests``) with ``merged_extra_args`` below, so that
``steering`` (what the official client sends with ``extra_body``) lands in
``extra_args["steering"]``, exactly where ``vllm_xargs={"steering": "<json>"}`` puts it.

Nothing is silently ignored: a ``steering`` next to steering keys in ``vllm_xargs``, a
stray top-level ``steer*`` field, or steering with beam search (whose sub-requests do not
carry ``extra_args``) is a 400 naming the field. This module is vLLM-free.
"""

from __future__ import annotations

from typing import Any

from vllm_steer.steering.spec import EXTRA_ARGS_KEY, FLAT_KEYS, SpecError, parse_extra_args

BODY_KEY = "steering"


def _is_steer_key(key: str) -> bool:
    return key == EXTRA_ARGS_KEY or key in FLAT_KEYS or key.startswith("steer")


def merged_extra_args(request: Any, extra_args: dict[str, Any] | None
                      ) -> dict[str, Any] | None:
    """``extra_args`` with the body's ``steering`` added; raises ``SpecError`` on conflicts.

    ``request``: a pydantic request model (its unknown fields are in ``model_extra``).
    """
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


def has_steering(request: Any) -> bool:
    """True when the body or ``vllm_xargs`` of ``request`` asks for steering."""
    body = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    return body.get(BODY_KEY) is not None or any(_is_steer_key(k) for k in xargs)


def conditioned(request: Any) -> bool:
    """True when the request's steering (body or ``vllm_xargs``) has a condition, whose
    report the response carries. A malformed spec is False here: admission refuses it."""
    try:
        spec = parse_extra_args(merged_extra_args(request, getattr(request, "vllm_xargs",
                                                                    None)))
    except SpecError:
        return False
    return spec is not None and spec.condition is not None

"""``POST /v1/steering/probe``: an answer probe (trajectory + fork readings) as JSON.

The body is documented field by field in docs/serving.md ("Answer probes"). It is
validated here, once: every error is an HTTP 400 whose ``param`` names the field, and a
field that would be ignored (``system`` without a chat prompt, ``every`` without a
trajectory, ...) is an error too. The forks run on the server's engine with prefix
caching, exactly as ``vllm_steer.probe``.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.drivers import run_job_async
from vllm_steer.probe.job import ProbeJob
from vllm_steer.probe.prompts import build_prompt, chat_ids
from vllm_steer.server import metrics
from vllm_steer.server.common import (
    SteerHTTPError,
    SteerRoute,
    context,
    read_body,
    require_api_key,
)
from vllm_steer.steering.spec import SpecError, parse_spec
from vllm_steer.vllm_adapter.engine import block_size, max_model_len

router = APIRouter(route_class=SteerRoute, dependencies=[Depends(require_api_key)])
MAX_BODY = 1 << 20
_PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")
_OTHER_KEYS = {"chat", "system", "open_thinking", "steering", "trajectory"}
#: ``ProbeConfig``'s fields, validated there (one place for probe settings).
_CFG_KEYS = {f.name for f in fields(ProbeConfig)}
#: Config fields that only shape the trajectory (an error with ``"trajectory": false``).
_TRAJECTORY_ONLY = ("every", "max_tokens", "temperature", "seed", "ignore_eos", "trigger",
                    "markers", "min_spacing", "align")
_KNOWN = set(_PROMPT_KEYS) | _OTHER_KEYS | _CFG_KEYS


def _bad(param: str, message: str) -> SteerHTTPError:
    return SteerHTTPError(400, f"{param}: {message}", param)


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise _bad(key, f"must be true or false, got {v!r}")
    return v


def _opt_text(body: dict[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is not None and (not isinstance(v, str) or not v):
        raise _bad(key, "must be a non-empty string or null")
    return v


def _prompt_ids(body: dict[str, Any], tok: Any) -> list[int]:
    given = [k for k in _PROMPT_KEYS if k in body]
    if len(given) != 1:
        raise _bad("prompt", "give exactly one of prompt, messages, prompt_token_ids")
    opener = _opt_text(body, "open_thinking")
    system = _opt_text(body, "system")
    chat = _flag(body, "chat", True)
    if given[0] != "prompt":
        for key in ("chat", "system"):
            if key in body:
                raise _bad(key, f"only applies to 'prompt' (not to '{given[0]}')")
    elif not chat and system is not None:
        raise _bad("system", "needs a chat prompt (chat: true)")
    tail = tok.encode(opener, add_special_tokens=False) if opener else []
    if given[0] == "prompt_token_ids":
        ids = body["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tok)
                for i in ids):
            raise _bad("prompt_token_ids", "must be a non-empty list of token ids in the "
                       "vocabulary")
        return ids + tail
    if given[0] == "messages":
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and set(m) == {"role", "content"}
                and isinstance(m["role"], str) and isinstance(m["content"], str)
                for m in msgs):
            raise _bad("messages", "must be a non-empty list of {role, content} messages "
                       "with string values")
        if not getattr(tok, "chat_template", None):
            raise _bad("messages", "the served tokenizer has no chat template")
        try:
            return chat_ids(tok, msgs) + tail
        except ProbeError:
            raise
        except Exception as e:  # the template's own errors (e.g. roles out of order)
            raise _bad("messages", f"the chat template refused them ({e})") from None
    prompt = body["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "must be a non-empty string")
    if chat:
        return build_prompt(tok, prompt, system=system, open_thinking=opener)
    return tok.encode(prompt, add_special_tokens=False) + tail


def _steering(body: dict[str, Any]) -> dict[str, Any] | None:
    raw = body.get("steering")
    if raw is None:
        return None
    try:
        return parse_spec(raw).to_dict()
    except SpecError as e:
        raise SteerHTTPError(400, str(e), e.field) from None


def parse_probe_body(raw: bytes, tok: Any, max_model_len: int | None,
                     block_size: int | None = None) -> ProbeJob:
    """Validate the body into a ``ProbeJob`` (raises ``SteerHTTPError`` naming the field)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad("body", "not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    unknown = sorted(str(k) for k in set(body) - _KNOWN)
    if unknown:
        raise _bad(unknown[0], f"unknown field (known: {', '.join(sorted(_KNOWN))})")
    try:
        trajectory = _flag(body, "trajectory", True)
        if not trajectory:
            stray = [k for k in _TRAJECTORY_ONLY if k in body]
            if stray:
                raise _bad(stray[0], "only applies to trajectories (trajectory: true)")
        cfg = ProbeConfig.from_dict({k: body[k] for k in _CFG_KEYS if k in body})
        steering = _steering(body)
        ids = _prompt_ids(body, tok)
        return ProbeJob(tok, [ids], [steering], cfg, generate=trajectory,
                        max_model_len=max_model_len, block_size=block_size)
    except ProbeError as e:
        raise SteerHTTPError(400, str(e), e.field) from None


@router.post("/v1/steering/probe")
async def steering_probe(request: Request) -> JSONResponse:
    from vllm.exceptions import VLLMValidationError

    ctx = context(request)
    tok = ctx.resolver.tokenizer
    if tok is None:
        raise SteerHTTPError(503, "the server has no tokenizer; probes need one")
    max_len = max_model_len(ctx.engine_client)
    blocks = block_size(ctx.engine_client)
    job = parse_probe_body(await read_body(request, MAX_BODY), tok, max_len, blocks)
    try:
        (traj,) = await run_job_async(ctx.engine_client, job)
    except VLLMValidationError as e:
        raise SteerHTTPError(400, str(e), e.parameter) from None
    metrics.PROBE_READINGS.labels(source="route").inc(len(traj.readings))
    return JSONResponse({"object": "steering.probe", "choices": list(job.choices.choices),
                         "variants": job.choices.to_json(tok), "probe": job.cfg.to_json(),
                         "block_size": blocks, "trajectory": traj.to_json()})

"""``POST /v1/steering/probe``: an answer probe (trajectory + fork readings) as JSON.

Body::

    {"prompt": "Is 17 prime?"            # or "messages": [...], or "prompt_token_ids": [...]
     "chat": true,                       # apply the chat template to "prompt" (default true)
     "open_thinking": "<think>\\n",       # appended to the prompt (optional)
     "steering": {...} | null,           # the same spec as on /v1/completions
     "choices": ["Yes", "No"], "every": 16, "max_tokens": 256,
     "suffix": "\\nThe final answer is", "min_mass": 0.05, "temperature": 0, "seed": 0,
     "trajectory": true}                 # false: one reading of prompt + suffix

The forks run on the server's engine with prefix caching, exactly as ``vllm_steer.probe``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.drivers import run_job_async
from vllm_steer.probe.job import ProbeJob
from vllm_steer.probe.prompts import build_prompt
from vllm_steer.server.common import SteerHTTPError, context, read_body

router = APIRouter()
MAX_BODY = 1 << 20
_PROMPT_KEYS = {"prompt", "messages", "prompt_token_ids", "chat", "open_thinking", "steering",
                "trajectory", "system"}
_CFG_KEYS = {"choices", "every", "max_tokens", "suffix", "min_mass", "temperature", "seed",
             "think_start", "think_end", "top_k_flagged", "ignore_eos"}


def _prompt_ids(body: dict[str, Any], tok: Any) -> list[int]:
    given = [k for k in ("prompt", "messages", "prompt_token_ids") if k in body]
    if len(given) != 1:
        raise SteerHTTPError(400, "give exactly one of prompt, messages, prompt_token_ids",
                             "prompt")
    opener = body.get("open_thinking")
    if opener is not None and not isinstance(opener, str):
        raise SteerHTTPError(400, "must be a string", "open_thinking")
    if "prompt_token_ids" in body:
        ids = body["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tok)
                for i in ids):
            raise SteerHTTPError(400, "must be a non-empty list of token ids in the vocabulary",
                                 "prompt_token_ids")
        return ids + (tok.encode(opener, add_special_tokens=False) if opener else [])
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise SteerHTTPError(400, "must be a list of {role, content} messages", "messages")
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        return ids + (tok.encode(opener, add_special_tokens=False) if opener else [])
    prompt = body["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise SteerHTTPError(400, "must be a non-empty string", "prompt")
    if body.get("chat", True):
        return build_prompt(tok, prompt, system=body.get("system"), open_thinking=opener)
    return tok.encode(prompt, add_special_tokens=False) + (
        tok.encode(opener, add_special_tokens=False) if opener else [])


def parse_probe_body(raw: bytes, tok: Any, max_model_len: int | None) -> ProbeJob:
    """Validate the body into a ``ProbeJob`` (raises ``SteerHTTPError`` naming the field)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise SteerHTTPError(400, "body is not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise SteerHTTPError(400, "body must be a JSON object", "body")
    unknown = sorted(set(body) - _PROMPT_KEYS - _CFG_KEYS)
    if unknown:
        raise SteerHTTPError(400, f"unknown field (known: {sorted(_PROMPT_KEYS | _CFG_KEYS)})",
                             unknown[0])
    try:
        cfg = ProbeConfig(**{k: body[k] for k in _CFG_KEYS if k in body})
        if not isinstance(cfg.choices, list) or not all(isinstance(c, str) for c in cfg.choices):
            raise ProbeError("choices", "must be a list of strings")
        for key in ("every", "max_tokens", "seed", "top_k_flagged"):
            v = getattr(cfg, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ProbeError(key, f"must be an integer, got {v!r}")
        for key in ("min_mass", "temperature"):
            v = getattr(cfg, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
                raise ProbeError(key, f"must be a number in [0, 100], got {v!r}")
        for key in ("suffix", "think_start", "think_end"):
            v = getattr(cfg, key)
            if not isinstance(v, str) and not (key == "suffix" and v is None):
                raise ProbeError(key, "must be a string")
        steering = body.get("steering")
        if isinstance(steering, str):
            steering = json.loads(steering)
        return ProbeJob(tok, [_prompt_ids(body, tok)], [steering], cfg,
                        generate=bool(body.get("trajectory", True)), max_model_len=max_model_len)
    except ProbeError as e:
        raise SteerHTTPError(400, str(e), e.field) from None
    except (TypeError, ValueError, RecursionError) as e:
        raise SteerHTTPError(400, f"invalid probe request ({e})", "body") from None


@router.post("/v1/steering/probe")
async def steering_probe(request: Request) -> JSONResponse:
    from vllm.exceptions import VLLMValidationError

    ctx = context(request)
    tok = ctx.resolver.tokenizer
    if tok is None:
        raise SteerHTTPError(503, "the server has no tokenizer; probes need one")
    max_len = getattr(getattr(ctx.engine_client, "model_config", None), "max_model_len", None)
    job = parse_probe_body(await read_body(request, MAX_BODY), tok, max_len)
    try:
        (traj,) = await run_job_async(ctx.engine_client, job)
    except VLLMValidationError as e:
        raise SteerHTTPError(400, str(e), e.parameter) from None
    return JSONResponse({"object": "steering.probe", "choices": job.choices.choices,
                         "trajectory": traj.to_json()})

"""``POST /v1/steering/vectors/train``: train a vector on the served engine and register it.

Body (JSON)::

    {"name": "calm",                      # registry name (default: the recipe's name)
     "recipe": {...},                     # a vector recipe: the YAML schema of
                                          #   configs/vectors/*.yaml, as JSON
     # -- or, instead of "recipe", inline: "personas": [[pos, neg], ...], "suffixes":
     #    a shipped set name ("chat", "reasoning") or a list, and any other recipe key
     "replace": false, "scale": 1.0, "layers": [..], "op": "add", ...,  # as uploads
     #    (inline, "layers" is the recipe's: the layers trained)
     "max_concurrent": 8,                 # capture requests in flight (1..1024)
     "budget": {"engine_share": 0.25,     # over the operator's budget (docs/operations.md):
                "burst_tokens": 256}}     #   share of time, computed tokens per burst

A recipe with ``"kind": "condition"`` trains a condition (``extract.condition``: prompt
sets, ``method``, ``aggregate``, ``layers`` searched, ``holdout``, ``seed``); the response's
``training`` then reports the chosen layer, comparison and threshold and the training and
held-out F1, and the registered file carries them as the condition's defaults.

The dataset is built with the served model's tokenizer and chat template, its prompts'
last-token block outputs are read through the engine's hidden-state capture
(``vllm_adapter.capture``) while the engine keeps serving other traffic, the vector is
fitted (``extract.train.fit_vector``) and registered under the same naming and
``replace`` rules as an upload (visible to every API process through the registry's
overlay). The response is the registered vector's info plus the per-layer separation
report. Recipes read no files on the server (suffix sets by shipped name or inline).
A recipe with more prompts than ``VLLMSTEER_MAX_TRAIN_PROMPTS`` (default 8192) is
refused with 413 before anything runs; bad recipes are 400s naming the field
(``recipe.<key>``, or the key itself when inline). Training jobs of one API process run
one at a time.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_steer import envvars
from vllm_steer.extract.capture_budget import CaptureBudget
from vllm_steer.extract.dataset import DatasetError, PromptSets, build_dataset, config_from_mapping
from vllm_steer.server import metrics, vectors
from vllm_steer.server.auth import Caller
from vllm_steer.server.common import (
    SteerHTTPError,
    SteerRoute,
    audited,
    context,
    read_body,
    require_admin,
)
from vllm_steer.vllm_adapter.capture import capture_refusal
from vllm_steer.vllm_adapter.engine import data_parallel_size

router = APIRouter(route_class=SteerRoute)
#: Largest accepted body (recipes carry their data inline).
MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_PROMPTS = 8192
#: Recipe keys that do not apply to training on the served engine: reported, not used.
NOT_APPLIED = ("model", "dtype", "batch_size", "output", "description")
_REGISTRATION = {"name", "replace", "scale", "layers", "op", "strength", "value",
                 "max_concurrent", "budget"}
#: Capture requests in flight by default: each adds its prompt's prefill to the engine's
#: steps, so few keep the other traffic's inter-token latency low (bench train-route).
DEFAULT_MAX_CONCURRENT = 8
MAX_CONCURRENT_LIMIT = 1024
_lock: asyncio.Lock | None = None


def max_prompts() -> int:
    raw = envvars.get(envvars.MAX_TRAIN_PROMPTS)
    if raw is None:
        return DEFAULT_MAX_PROMPTS
    try:
        value = int(raw)
    except ValueError:
        raise SteerHTTPError(500, f"{envvars.MAX_TRAIN_PROMPTS} is not an integer") from None
    return max(value, 1)


def capture_budget(raw: Any = None) -> CaptureBudget:
    """The operator's budget for training on the served engine (``envvars``), with the
    request's ``budget`` fields (``engine_share``, ``burst_tokens``) over it."""
    try:
        base = CaptureBudget.from_environment()
    except ValueError as e:
        raise SteerHTTPError(500, str(e)) from None
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise SteerHTTPError(400, "must be an object {engine_share, burst_tokens}", "budget")
    unknown = sorted(str(k) for k in raw if k not in ("engine_share", "burst_tokens"))
    if unknown:
        raise SteerHTTPError(400, "unknown field (known: burst_tokens, engine_share)",
                             f"budget.{unknown[0]}")
    share = raw.get("engine_share", base.engine_share)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise SteerHTTPError(400, "must be a number in (0, 1]", "budget.engine_share")
    burst = raw.get("burst_tokens", base.burst_tokens)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise SteerHTTPError(400, "must be an integer >= 1", "budget.burst_tokens")
    return CaptureBudget(float(share), burst)


def parse_body(raw: bytes) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(registration fields, recipe mapping, recipe field prefix)`` or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise SteerHTTPError(400, "malformed JSON", "body") from None
    if not isinstance(body, dict):
        raise SteerHTTPError(400, "must be a JSON object", "body")
    reg = {k: body[k] for k in _REGISTRATION if k in body}
    rest = {k: v for k, v in body.items() if k not in _REGISTRATION}
    if "recipe" in rest:
        inline = sorted(k for k in rest if k != "recipe")
        if inline:
            raise SteerHTTPError(400, "give the recipe either as 'recipe' or inline, not both",
                                 inline[0])
        recipe = rest["recipe"]
        if not isinstance(recipe, dict):
            raise SteerHTTPError(400, "must be an object (a vector recipe)", "recipe")
        return reg, recipe, "recipe."
    if not rest:
        raise SteerHTTPError(400, "required: a 'recipe' object, or inline 'personas' and "
                             "'suffixes'", "recipe")
    # inline, "layers" is the recipe's (the layers trained; the registered vector's
    # default layers are then all of them); next to "recipe" it is the upload's
    if "layers" in reg:
        rest["layers"] = reg.pop("layers")
    return reg, rest, ""


def _config(recipe: dict[str, Any], prefix: str, name: str | None) -> Any:
    try:
        return config_from_mapping(recipe, where="recipe", default_name=name or "",
                                   allow_files=False)
    except DatasetError as e:
        raise SteerHTTPError(400, str(e), prefix + (e.field or "")) from None


def _dataset(ctx: Any, cfg: Any, prefix: str) -> Any:
    tok = ctx.resolver.tokenizer
    if tok is None:
        raise SteerHTTPError(503, "the served model has no tokenizer: recipes need one")
    try:
        return build_dataset(cfg, tok)
    except DatasetError as e:
        raise SteerHTTPError(400, str(e), prefix + (e.field or "personas")) from None


@router.post("/v1/steering/vectors/train")
async def train_vector(request: Request,
                       caller: Annotated[Caller, Depends(require_admin("train"))]) -> JSONResponse:
    job: dict[str, float] = {}
    with audited("train", caller) as rec:
        try:
            response = await _train(request, rec, job)
        except BaseException:
            if "t0" in job:   # the job reached the engine and failed there or later
                metrics.TRAIN_JOBS.labels(outcome="error").inc()
                metrics.TRAIN_SECONDS.labels(phase="total").observe(
                    time.perf_counter() - job["t0"])
            raise
        metrics.TRAIN_JOBS.labels(outcome="ok").inc()
        return response


async def _train(request: Request, rec: dict[str, Any], job: dict[str, float]
                 ) -> JSONResponse:
    from vllm_steer.extract.engine_hidden import read_last_token_engine_async
    from vllm_steer.extract.train import (
        ModelInfo,
        fit_vector,
        prepare,
        resolve_layers,
    )

    global _lock
    ctx = context(request)
    vectors.require_shared(ctx)
    reg_fields, recipe, prefix = parse_body(await read_body(request, MAX_BODY_BYTES))
    r = vectors.parse_registration({"name": recipe.get("name"), **reg_fields}, ctx.num_layers,
                                   text=False)
    name, layers_default = r.name, r.layers
    rec["vector"] = name
    concurrent = reg_fields.get("max_concurrent", DEFAULT_MAX_CONCURRENT)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) \
            or not 1 <= concurrent <= MAX_CONCURRENT_LIMIT:
        raise SteerHTTPError(400, f"must be an integer in [1, {MAX_CONCURRENT_LIMIT}]",
                             "max_concurrent")
    budget = capture_budget(reg_fields.get("budget"))
    if isinstance(recipe.get("kind"), str) and recipe.get("kind") == "condition":
        return await _train_condition(ctx, r, recipe, prefix, concurrent, budget, rec, job)
    cfg = _config(recipe, prefix, name)
    try:
        picked = resolve_layers(cfg.layers, ctx.num_layers)
    except ValueError as e:
        raise SteerHTTPError(400, str(e), prefix + "layers") from None
    if cfg.direction_from_layer is not None and cfg.direction_from_layer % ctx.num_layers \
            not in picked:
        raise SteerHTTPError(400, f"direction_from_layer {cfg.direction_from_layer} is not one "
                             f"of the extracted layers {picked}", prefix + "direction_from_layer")
    missing = [x for x in layers_default or () if x not in picked]
    if missing:
        raise SteerHTTPError(400, f"the vector will have no direction for layers {missing} "
                             f"(it is trained on {picked})", "layers")
    if not r.replace and name in ctx.registry.entries:   # before any work is done
        raise SteerHTTPError(409, f"vector {name!r} exists; pass replace=true to overwrite",
                             "name")
    ds = await asyncio.to_thread(_dataset, ctx, cfg, prefix)
    try:
        ds, prompts = prepare(ds, cfg.method, cfg.normalize)
    except (DatasetError, ValueError) as e:
        raise SteerHTTPError(400, str(e), prefix + "method") from None
    limit = max_prompts()
    if len(prompts) > limit:
        what = "positive_prompts" if isinstance(ds, PromptSets) else (
            "pairs" if cfg.pairs is not None else "personas")
        raise SteerHTTPError(413, f"the recipe expands to {len(prompts)} prompts; this server "
                             f"trains at most {limit} ({envvars.MAX_TRAIN_PROMPTS})",
                             prefix + what)

    engine = ctx.engine_client
    why = capture_refusal(engine)
    if why is not None:
        raise SteerHTTPError(503, f"this server cannot train: {why}")
    sent = {"requests": 0, "prompt_tokens": 0}

    def on_submit(prompt_tokens: int) -> None:
        sent["requests"] += 1
        sent["prompt_tokens"] += prompt_tokens
        metrics.CAPTURE_REQUESTS.inc()
        metrics.CAPTURE_TOKENS.inc(prompt_tokens)

    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        t0 = job["t0"] = time.perf_counter()
        hidden = await read_last_token_engine_async(
            engine, ctx.resolver.tokenizer, prompts, picked, ctx.num_layers,
            add_special_tokens=ds.add_special_tokens, max_concurrent=concurrent,
            # vLLM returns only the first engine's RPC result under data parallelism
            data_parallel_rank=0 if data_parallel_size(engine) > 1 else None,
            budget=budget, on_submit=on_submit)
        seconds_capture = time.perf_counter() - t0
    t1 = time.perf_counter()
    cfg_model = engine.model_config
    info = ModelInfo(ctx.num_layers, Path(str(cfg_model.model)).name,
                     str(getattr(cfg_model.hf_text_config, "model_type", "") or ""),
                     str(cfg_model.dtype).replace("torch.", ""))
    vector = await asyncio.to_thread(_fit_one_thread, fit_vector, ds, hidden, picked, info,
                                     method=cfg.method, normalize=cfg.normalize,
                                     direction_from_layer=cfg.direction_from_layer)
    t2 = time.perf_counter()
    done = await asyncio.to_thread(register_trained, ctx, r, vector)
    t3 = time.perf_counter()
    rec.update(digest=done.digest, status=201, replaced=done.action == "replace")
    for phase, seconds in (("capture", seconds_capture), ("fit", t2 - t1),
                           ("register", t3 - t2), ("total", t3 - t0)):
        metrics.TRAIN_SECONDS.labels(phase=phase).observe(seconds)
    sep = json.loads(vector.metadata.extra["separation"])
    not_applied = sorted(k for k in NOT_APPLIED if recipe.get(k) is not None)
    return vectors.respond({
        **done.info,
        "training": {
            "num_pairs": None if isinstance(ds, PromptSets) else len(ds),
            "num_prompts": len(prompts), "layers": picked, "method": cfg.method,
            "normalize": cfg.normalize,
            "separation": {str(k): v for k, v in sep.items()},
            "mean_separation": round(sum(sep.values()) / len(sep), 6),
            "max_concurrent": concurrent,
            "budget": budget.to_json(),
            "capture_requests": sent["requests"],
            "capture_prompt_tokens": sent["prompt_tokens"],
            "seconds": {"capture": round(seconds_capture, 3), "fit": round(t2 - t1, 3),
                        "register": round(t3 - t2, 3),
                        "total": round(time.perf_counter() - t0, 3)},
            "recipe_fields_not_applied": not_applied,
        },
    }, 201)


def _count_capture(prompt_tokens: int) -> None:
    metrics.CAPTURE_REQUESTS.inc()
    metrics.CAPTURE_TOKENS.inc(prompt_tokens)


async def _train_condition(ctx: Any, r: Any, recipe: dict[str, Any], prefix: str,
                           concurrent: int, budget: CaptureBudget, rec: dict[str, Any],
                           job: dict[str, float]) -> JSONResponse:
    """A condition recipe (``kind: condition``, ``extract.condition``): prompt states
    through the engine's capture, direction per layer, the layer/threshold/comparison
    search, the held-out F1; registered like any vector (its defaults in the file)."""
    from vllm_steer.extract.condition import (
        build_sets,
        condition_config,
        fit_condition,
        read_prompt_states_engine_async,
    )
    from vllm_steer.extract.hidden import tokenize_prompts
    from vllm_steer.extract.train import resolve_layers

    global _lock
    given = [k for k, bad in (("layers", r.layers is not None), ("scale", r.scale is not None),
                              ("op", r.ops != {"op": "add"})) if bad]
    if given:
        field = given[0]
        raise SteerHTTPError(400, "a condition is not a steering vector: it takes no "
                             "registration defaults (its layer and threshold come from training)",
                             field)
    try:
        cfg = condition_config(recipe, where="recipe", default_name=r.name, allow_files=False)
    except DatasetError as e:
        raise SteerHTTPError(400, str(e), prefix + (e.field or "")) from None
    try:
        picked = resolve_layers(cfg.base.layers if cfg.base.layers is not None else "all",
                                ctx.num_layers)
    except ValueError as e:
        raise SteerHTTPError(400, str(e), prefix + "layers") from None
    if not r.replace and r.name in ctx.registry.entries:
        raise SteerHTTPError(409, f"vector {r.name!r} exists; pass replace=true to overwrite",
                             "name")
    tok = ctx.resolver.tokenizer
    if tok is None:
        raise SteerHTTPError(503, "the served model has no tokenizer: recipes need one")
    try:
        sets = await asyncio.to_thread(build_sets, cfg, tok)
    except DatasetError as e:
        raise SteerHTTPError(400, str(e), prefix + (e.field or "positive_prompts")) from None
    n = len(sets.positives) + len(sets.negatives)
    if n > max_prompts():
        raise SteerHTTPError(413, f"the recipe has {n} prompts; this server trains at most "
                             f"{max_prompts()} ({envvars.MAX_TRAIN_PROMPTS})",
                             prefix + "positive_prompts")
    engine = ctx.engine_client
    why = capture_refusal(engine)
    if why is not None:
        raise SteerHTTPError(503, f"this server cannot train: {why}")
    rows = tokenize_prompts(tok, [*sets.positives, *sets.negatives],
                            add_special_tokens=sets.add_special_tokens)
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        t0 = job["t0"] = time.perf_counter()
        states = await read_prompt_states_engine_async(
            engine, rows, picked, cfg.aggregate, max_concurrent=concurrent,
            data_parallel_rank=0 if data_parallel_size(engine) > 1 else None,
            budget=budget, on_submit=_count_capture)
        seconds_capture = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = await asyncio.to_thread(_fit_one_thread, fit_condition, states, len(sets.positives),
                                  method=cfg.method, aggregate=cfg.aggregate,
                                  holdout=cfg.holdout, seed=cfg.seed,
                                  info={"dataset_name": sets.name})
    data = await asyncio.to_thread(_vector_bytes, res.vector)
    t2 = time.perf_counter()
    done = await asyncio.to_thread(vectors.register, ctx, r, data, None, "recipe")
    t3 = time.perf_counter()
    rec.update(digest=done.digest, status=201, replaced=done.action == "replace")
    for phase, seconds in (("capture", seconds_capture), ("fit", t2 - t1),
                           ("register", t3 - t2), ("total", t3 - t0)):
        metrics.TRAIN_SECONDS.labels(phase=phase).observe(seconds)
    not_applied = sorted(k for k in NOT_APPLIED if recipe.get(k) is not None)
    report = res.to_json()
    return vectors.respond({
        **done.info,
        "training": {"kind": "condition", "num_prompts": n, "layers": picked,
                     "method": cfg.method, **{k: v for k, v in report.items()
                                              if k != "seconds"},
                     "max_concurrent": concurrent, "budget": budget.to_json(),
                     "seconds": {"capture": round(seconds_capture, 3),
                                 "fit": round(time.perf_counter() - t1, 3),
                                 "total": round(time.perf_counter() - t0, 3)},
                     "recipe_fields_not_applied": not_applied},
    }, 201)


def _fit_one_thread(fit: Any, *args: Any, **kwargs: Any) -> Any:
    """``fit(...)`` with one torch thread: the API-server process shares the cores with the
    engine's busy workers, where torch's multi-threaded ops (the SVDs) spent tens of
    seconds waiting on each other (measured: 40 s for 22 SVDs of [300, 576])."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(*args, **kwargs)
    finally:
        torch.set_num_threads(n)


def register_trained(ctx: Any, r: vectors.Registration, vector: Any) -> vectors.Registered:
    """Register a trained vector as an upload of its safetensors bytes (the same durable
    path: ``vectors.register``). Blocking."""
    return vectors.register(ctx, r, _vector_bytes(vector), None, "recipe")


def _vector_bytes(vector: Any) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vector.safetensors"
        vector.save(str(path))
        return path.read_bytes()

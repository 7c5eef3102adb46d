"""``GET /v1/steering/stats``: the workers' steering-slot usage, through ``collective_rpc``,
and this process's vector-store collection (``store``).

The general plugin installs the worker method ``vllm_steer_stats``; this route only
exposes it (the pairing vLLM's endpoint-plugin interface prescribes).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_steer.server.common import SteerHTTPError, SteerRoute, context, require_api_key
from vllm_steer.server.live_probe import LIVE

router = APIRouter(route_class=SteerRoute, dependencies=[Depends(require_api_key)])
RPC_TIMEOUT_S = 30.0


@router.get("/v1/steering/stats")
async def steering_stats(request: Request) -> JSONResponse:
    ctx = context(request)
    try:
        workers = await asyncio.wait_for(ctx.engine_client.collective_rpc("vllm_steer_stats"),
                                         RPC_TIMEOUT_S)
    except TimeoutError:
        raise SteerHTTPError(503, "the engine did not answer the stats call in time") from None
    gc = ctx.collector
    store = {"root": str(ctx.resolver.store.root), "transport": ctx.resolver.transport}
    if gc is not None:
        store.update(grace_s=gc.grace_s, collections=gc.runs,
                     last_collection=gc.last.to_json() if gc.last else None)
    return JSONResponse({"object": "steering.stats", "workers": list(workers),
                         "live_probes": dict(LIVE),
                         "vectors": len(ctx.registry.entries),
                         "persistent": ctx.registry.persistent, "store": store})

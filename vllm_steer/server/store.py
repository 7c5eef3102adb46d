"""``POST /v1/steering/store/collect``: collect the vector store and the upload
directory now (admin), and answer what was deleted and kept.

The same collection runs by itself when the routes start and after registry changes
(``steering.store_gc``); this route lets an operator run it on demand, e.g. after a
crash (what a killed writer left is deleted by it: ``Registry.collect_uploads``,
``VectorStore.collect``).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from vllm_steer.server.auth import Caller
from vllm_steer.server.common import SteerHTTPError, SteerRoute, audited, context, require_admin

router = APIRouter(route_class=SteerRoute)


@router.post("/v1/steering/store/collect")
async def collect_store(request: Request,
                        caller: Annotated[Caller, Depends(require_admin("collect"))]
                        ) -> JSONResponse:
    with audited("collect", caller) as rec:
        ctx = context(request)
        if ctx.collector is None:
            raise SteerHTTPError(503, "the store collector is not running in this process")
        done = await asyncio.to_thread(ctx.collector.run)
        rec.update(deleted=done.deleted, freed_bytes=done.freed_bytes)
        return JSONResponse({"object": "steering.store.collection", **done.to_json(),
                             "root": str(ctx.resolver.store.root),
                             "grace_s": ctx.collector.grace_s})

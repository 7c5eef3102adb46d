"""The ``vllm.endpoint_plugins`` entry point: the ``/v1/steering`` routes.

Enabled by naming ``vllm_steer_routes`` in ``VLLM_PLUGINS`` (vLLM loads endpoint plugins
only when named). Each feature module contributes one ``APIRouter``; adding a route
family (e.g. the answer probes) means adding its router to ``ROUTERS``. Every route
requires vLLM's ``--api-key`` when one is set, and errors use OpenAI's error shape. The
playground page (``playground``, ``GET /steer``) is mounted beside them without the key:
it is static and makes every call with the key typed into it.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from vllm_steer.server import (
    ENDPOINT_PLUGIN,
    conditions,
    fallback,
    playground,
    probe,
    stats,
    train,
    vectors,
)
from vllm_steer.server.common import (
    STATE_KEY,
    UNAUTHORIZED,
    ServerContext,
    SteerHTTPError,
    error_response,
    handle_steer_error,
    require_api_key,
)
from vllm_steer.vllm_adapter.engine import input_processor
from vllm_steer.vllm_adapter.frontend import get_resolver
from vllm_steer.vllm_adapter.openai_requests import install_auth_errors

logger = logging.getLogger("vllm_steer")

#: Feature routers mounted by the plugin, in order; ``fallback`` (every other path and
#: method under ``/v1/steering``: 404/405 in OpenAI's error shape) stays last.
ROUTERS: list[APIRouter] = [train.router, vectors.router, stats.router, probe.router,
                            fallback.router]


def build_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])
    for r in ROUTERS:
        router.include_router(r)
    return router


def _resolver_for(engine_client: Any) -> Any:
    """The frontend hook's resolver (shared registry); built the same way if not yet used."""
    return get_resolver(input_processor(engine_client))


def api_processes(args: Namespace | None) -> int:
    """How many API-server processes may serve these routes (at least): vLLM's
    ``--api-server-count`` (defaulted to the data-parallel size), or one per
    data-parallel rank with an external load balancer."""
    count = getattr(args, "api_server_count", None) or 1
    return max(int(count), int(getattr(args, "data_parallel_size", None) or 1))


class SteeringEndpoints:
    """``EndpointPlugin`` (see ``vllm/plugins/endpoint_plugins/interface.py``)."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        # the 'probe' field and condition reports of the completion endpoints
        conditions.install()
        app.include_router(build_router())
        app.include_router(playground.router)
        app.add_exception_handler(SteerHTTPError, handle_steer_error)
        install_auth_errors(fallback.PREFIX, lambda: error_response(*UNAUTHORIZED))

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            logger.warning("vllm-steer: no engine client; /v1/steering routes answer 503")
            return
        ctx = ServerContext(engine_client, _resolver_for(engine_client),
                            api_processes=api_processes(args))
        vectors.attach(ctx)
        setattr(state, STATE_KEY, ctx)
        logger.info("vllm-steer: /v1/steering routes ready")


def plugin() -> SteeringEndpoints:
    """Entry-point factory."""
    return SteeringEndpoints()

"""The ``vllm.endpoint_plugins`` entry point: the ``/v1/steering`` routes.

Enabled by naming ``vllm_steer_routes`` in ``VLLM_PLUGINS`` (vLLM loads endpoint plugins
only when named). Each feature module contributes one ``APIRouter``; adding a route
family (e.g. the answer probes) means adding its router to ``ROUTERS``. Every route
declares the role it needs (``server.auth``): the inference routes depend on
``require_api_key``, the admin routes (upload, replace, delete, train, collect) on
``require_admin``; errors use OpenAI's error shape. The playground page (``playground``,
``GET /steer``) is mounted beside them without a key: it is static and makes every call
with the keys typed into it. The plugin's metrics (``server.metrics``) join vLLM's on
``/metrics``.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI

from vllm_steer.server import (
    ENDPOINT_PLUGIN,
    auth,
    conditions,
    fallback,
    metrics_refresh,
    playground,
    probe,
    stats,
    store,
    train,
    vectors,
)
from vllm_steer.server.common import (
    KEYS_STATE,
    STATE_KEY,
    ServerContext,
    SteerHTTPError,
    handle_steer_error,
)
from vllm_steer.vllm_adapter.engine import input_processor
from vllm_steer.vllm_adapter.frontend import get_resolver
from vllm_steer.vllm_adapter.openai_requests import api_keys, install_auth

logger = logging.getLogger("vllm_steer")

#: Feature routers mounted by the plugin, in order; ``fallback`` (every other path and
#: method under ``/v1/steering``: 404/405 in OpenAI's error shape) stays last.
ROUTERS: list[APIRouter] = [train.router, vectors.router, store.router, stats.router,
                            probe.router, fallback.router]


def build_router() -> APIRouter:
    router = APIRouter()
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
        # the admin and file keys (a bad keys file stops the server here, loudly)
        ring = auth.from_environment()
        # the 'probe' field and condition reports of the completion endpoints
        conditions.install()
        app.include_router(build_router())
        app.include_router(playground.router)
        app.add_exception_handler(SteerHTTPError, handle_steer_error)
        install_auth(fallback.PREFIX, also_accept=lambda headers: ring.match(
            auth.bearer_token(headers)) is not None)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        ring = auth.from_environment().with_vllm_keys(api_keys(args))
        auth.check_inference_guard(ring)
        setattr(state, KEYS_STATE, ring)
        (logger.info if ring.admin_configured else logger.warning)(
            "vllm-steer: %s", auth.describe(ring))
        if engine_client is None:
            logger.warning("vllm-steer: no engine client; /v1/steering routes answer 503")
            return
        ctx = ServerContext(engine_client, _resolver_for(engine_client),
                            api_processes=api_processes(args))
        vectors.attach(ctx)
        setattr(state, STATE_KEY, ctx)
        metrics_refresh.start(ctx)
        logger.info("vllm-steer: /v1/steering routes ready")


def plugin() -> SteeringEndpoints:
    """Entry-point factory."""
    return SteeringEndpoints()

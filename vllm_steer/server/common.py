"""What every ``/v1/steering`` route shares: the app context, errors, auth, body limits."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from vllm_steer.steering.registry import Registry
from vllm_steer.steering.resolve import Resolver
from vllm_steer.steering.store_gc import StoreCollector
from vllm_steer.vllm_adapter.openai_requests import api_keys

STATE_KEY = "vllm_steer"


@dataclass
class ServerContext:
    """Per-app state: the engine client and the frontend's resolver (and so its registry).

    The resolver is the one the frontend hook uses for every request, so a registry
    change made through a route is seen by the next request.
    """

    engine_client: Any
    resolver: Resolver
    #: API-server processes that may serve these routes (``--api-server-count``, one per
    #: data-parallel rank with an external load balancer); they share registrations
    #: only through the registry file's overlay.
    api_processes: int = 1
    #: Collects the vector store of this process's resolver (``vectors.attach``).
    collector: StoreCollector | None = None

    @property
    def registry(self) -> Registry:
        return self.resolver.registry

    @property
    def num_layers(self) -> int:
        return self.resolver.num_layers

    @property
    def hidden_size(self) -> int:
        return self.resolver.hidden_size


class SteerHTTPError(Exception):
    """An error answered in OpenAI's error shape; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.headers = headers


_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 409: "ConflictError",
          413: "RequestEntityTooLargeError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""
    body = {"error": {"message": message,
                      "type": _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", "")),
                      "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class SteerRoute(APIRoute):
    """The plugin's routes: an unexpected exception answers 500 in OpenAI's error shape.

    Without this, vLLM's app answers a ``TypeError`` or ``ValueError`` raised by a bug here
    with 400, telling the client that the plugin's fault was its own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except (SteerHTTPError, HTTPException, RequestValidationError):
                raise
            except Exception as e:
                logging.getLogger("vllm_steer").exception(
                    "vllm-steer: %s %s failed", request.method, request.url.path)
                return error_response(500, f"internal error in vllm-steer: "
                                           f"{type(e).__name__}: {e}")

        return run


async def handle_steer_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SteerHTTPError)
    return error_response(exc.status, exc.message, exc.param, exc.headers)


#: The answer to a request under ``/v1/steering`` without a valid API key (vLLM's own
#: middleware would answer ``{"error": "Unauthorized"}``; see ``vllm_adapter.openai_requests``).
UNAUTHORIZED = (401, "missing or invalid API key (Authorization: Bearer ...)", "authorization")


def context(request: Request) -> ServerContext:
    ctx = getattr(request.app.state, STATE_KEY, None)
    if ctx is None:
        raise SteerHTTPError(503, "vllm-steer routes are not initialised (no engine)")
    return ctx


def _api_tokens(request: Request) -> list[bytes]:
    keys = api_keys(getattr(request.app.state, "args", None))
    return [hashlib.sha256(k.encode()).digest() for k in keys]


async def require_api_key(request: Request) -> None:
    """The same check as vLLM's ``--api-key`` middleware (which also guards ``/v1``).

    Repeated here so the routes stay guarded however the app's middleware is arranged.
    """
    tokens = _api_tokens(request)
    if not tokens:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(value.encode()).digest()
    ok = False
    for t in tokens:
        ok |= secrets.compare_digest(digest, t)
    if scheme.lower() != "bearer" or not ok:
        raise SteerHTTPError(*UNAUTHORIZED)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it exceeds ``limit`` bytes."""
    too_big = SteerHTTPError(413, f"request body larger than the upload limit of {limit} bytes",
                             "body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return bytes(buf)

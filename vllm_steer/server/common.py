"""What every ``/v1/steering`` route shares: the app context, errors, auth, body limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from vllm_steer.server import audit, auth, metrics
from vllm_steer.server.auth import ADMIN, INFERENCE, Caller, KeyRing
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


_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          404: "NotFoundError",
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

        route = self.path

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except SteerHTTPError as e:
                metrics.http_error(route, e.status)
                raise
            except HTTPException as e:
                metrics.http_error(route, e.status_code)
                raise
            except RequestValidationError:
                metrics.http_error(route, 400)   # vLLM answers these with 400
                raise
            except Exception as e:
                logging.getLogger("vllm_steer").exception(
                    "vllm-steer: %s %s failed", request.method, request.url.path)
                metrics.http_error(route, 500)
                return error_response(500, f"internal error in vllm-steer: "
                                           f"{type(e).__name__}: {e}")
            if response.status_code >= 400:
                metrics.http_error(route, response.status_code)
            return response

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


#: ``app.state`` attribute holding the server's ``auth.KeyRing`` (set by ``init_state``).
KEYS_STATE = "vllm_steer_keys"


def keyring(request: Request) -> KeyRing:
    """The app's keys: the admin and file keys plus vLLM's ``--api-key`` values."""
    ring = getattr(request.app.state, KEYS_STATE, None)
    if ring is None:   # routes mounted on an app whose plugin state was not initialised
        ring = auth.from_environment().with_vllm_keys(
            api_keys(getattr(request.app.state, "args", None)))
        setattr(request.app.state, KEYS_STATE, ring)
    return ring


def authorize(request: Request, role: str) -> Caller:
    """The caller of ``request`` if it may use a route needing ``role`` (``auth``'s rules),
    else ``SteerHTTPError`` 401 (no or unknown key) or 403 (a key without the role)."""
    ring = keyring(request)
    key = ring.match(auth.bearer_token(request.headers))
    if role == ADMIN and ring.admin_configured:
        if key is None:
            raise SteerHTTPError(401, "this action needs the steering admin key "
                                 "(Authorization: Bearer ...)", "authorization")
        if key.role != ADMIN:
            raise SteerHTTPError(403, f"the key {key.id!r} has the {key.role} role; "
                                 "uploading, replacing, deleting, training and collecting "
                                 "need an admin key", "authorization")
        return Caller(key.id, key.role)
    if ring.inference_guarded and key is None:
        raise SteerHTTPError(*UNAUTHORIZED)
    return Caller(key.id, key.role) if key is not None else Caller(None, None)


async def require_api_key(request: Request) -> Caller:
    """An inference route: any known key when inference is guarded (vLLM's ``--api-key``),
    the same check as vLLM's middleware, repeated so the routes stay guarded however the
    app's middleware is arranged."""
    return authorize(request, INFERENCE)


def require_admin(action: str | Callable[[Request], str]
                  ) -> Callable[[Request], Awaitable[Caller]]:
    """The dependency of an admin route; a refused caller is written to the audit trail
    under ``action`` (or ``action(request)``)."""

    async def dependency(request: Request) -> Caller:
        try:
            return authorize(request, ADMIN)
        except SteerHTTPError as e:
            name = action if isinstance(action, str) else action(request)
            key = keyring(request).match(auth.bearer_token(request.headers))
            who = Caller(key.id, key.role) if key is not None else Caller(None, None)
            audit.record(name, who, e.status, vector=request.path_params.get("name")
                         or request.query_params.get("name"))
            metrics.admin_action(name, e.status)
            raise

    return dependency


@contextlib.contextmanager
def audited(action: str, caller: Caller, vector: str | None = None
            ) -> Iterator[dict[str, Any]]:
    """One audit line and one ``admin_actions`` count for an admin action. The block may
    refine ``rec`` (``action``, ``vector``, ``digest``, ``status``, more fields); an
    exception's HTTP status is recorded (500 for a bug, 499 for a client gone)."""
    rec: dict[str, Any] = {"action": action, "vector": vector, "digest": None, "status": 200}
    try:
        yield rec
    except SteerHTTPError as e:
        rec["status"] = e.status
        raise
    except HTTPException as e:
        rec["status"] = e.status_code
        raise
    except asyncio.CancelledError:
        rec["status"] = 499
        raise
    except BaseException:
        rec["status"] = 500
        raise
    finally:
        action, status = rec.pop("action"), rec.pop("status")
        audit.record(action, caller, status, **rec)
        metrics.admin_action(action, status)


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

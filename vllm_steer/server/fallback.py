"""Unknown paths and wrong methods under ``/v1/steering``: 404 / 405 in OpenAI's error shape.

Starlette answers a request that matches no route with ``{"detail": "Not Found"}`` (404)
or ``{"detail": "Method Not Allowed"}`` (405), from its router, before any route of the
plugin runs, and vLLM's ``HTTPException`` handler does not catch those (it is registered
for FastAPI's subclass). This router is mounted after every steering route and matches
every remaining path and method under the prefix, so those requests get
``{"error": {"message", "type", "param", "code"}}`` like every other answer of the plugin.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.routing import Match

from vllm_steer.server.common import SteerHTTPError, SteerRoute, require_api_key

router = APIRouter(route_class=SteerRoute, dependencies=[Depends(require_api_key)])
PREFIX = "/v1/steering"
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _allowed_methods(request: Request) -> list[str]:
    """Methods of the other routes whose path matches this request's (empty: no route)."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "endpoint", None) is unmatched:
            continue
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            allowed |= set(getattr(route, "methods", None) or ())
    return sorted(allowed)


async def unmatched(request: Request, rest: str = "") -> None:
    allowed = _allowed_methods(request)
    if allowed:
        raise SteerHTTPError(405, f"method {request.method} not allowed on "
                             f"{request.url.path} (allowed: {', '.join(allowed)})", "method",
                             headers={"Allow": ", ".join(allowed)})
    raise SteerHTTPError(404, f"no route {request.url.path} (the steering routes are "
                         f"{PREFIX}/vectors, {PREFIX}/vectors/{{name}}, "
                         f"{PREFIX}/vectors/train, {PREFIX}/store/collect, {PREFIX}/stats "
                         f"and {PREFIX}/probe)", "path")


router.add_api_route(PREFIX, unmatched, methods=_METHODS, include_in_schema=False)
router.add_api_route(PREFIX + "/{rest:path}", unmatched, methods=_METHODS,
                     include_in_schema=False)

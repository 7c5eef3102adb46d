"""``GET /steer``: the steering playground, a static page served by the endpoint plugin.

The page (``server/static/``, package data; plain HTML, CSS and ES modules, no build step,
nothing fetched from elsewhere) calls the server's own routes with relative URLs, so it
works behind a path prefix (a reverse proxy that strips it, vLLM's ``--root-path``). It is
not under ``/v1``, so it loads without the API key: it holds no data, and every call it
makes carries the key the user types into it (a bearer token kept in the page's memory,
never sent anywhere else or stored). ``/steer/config.json`` tells it whether a key is
needed, so it asks for one before its first guarded call, and whether a steering admin
key is configured, so it asks for that one only when an upload or a delete needs it.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from vllm_steer.server.common import SteerHTTPError, SteerRoute, keyring

router = APIRouter(route_class=SteerRoute)
PAGE = "/steer"
#: The files the page is made of (nothing else under ``static/`` is served).
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "spec.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
}
#: Only this origin, no inline code: the page cannot reach the network beyond its server.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def static_file(name: str) -> bytes:
    """A playground file's bytes (``FILES`` only); read per request, they are small."""
    if name not in FILES:
        raise SteerHTTPError(404, f"no playground file {name!r}", "path")
    return resources.files("vllm_steer.server").joinpath("static", name).read_bytes()


def _serve(name: str) -> Response:
    return Response(static_file(name), media_type=FILES[name], headers=HEADERS)


@router.get(PAGE, include_in_schema=False)
async def page() -> Response:
    return _serve("index.html")


@router.get(PAGE + "/", include_in_schema=False)
async def page_slash() -> Response:
    # Relative, so that it stays under whatever prefix a proxy put in front.
    return RedirectResponse("../steer", status_code=307)


@router.get(PAGE + "/config.json", include_in_schema=False)
async def page_config(request: Request) -> JSONResponse:
    """What the page needs before its first call: whether the routes need a key, and
    whether admin actions (upload, delete) need the steering admin key."""
    ring = keyring(request)
    return JSONResponse({"api_key_required": ring.inference_guarded,
                         "admin_key_required": ring.admin_configured}, headers=HEADERS)


@router.get(PAGE + "/{name}", include_in_schema=False)
async def page_file(name: str) -> Response:
    return _serve(name)

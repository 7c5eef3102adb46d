"""A real browser for the page tests: Debian's ``chromium`` and ``chromium-driver``
(installed by ``make setup``), driven with ``selenium`` pointed at the system driver (no
browser downloads). Plus an ASGI app runner and a path-prefix reverse proxy."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_helpers import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Headless, no network of its own (updates, sync, QUIC), a fresh profile per driver.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--lang=en-US")
LAPTOP = (1366, 900)


def require_browser() -> None:
    """Skip (with what to install) unless the system browser, its driver and selenium exist."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing (Debian packages "
                    "chromium and chromium-driver; `make setup` installs them as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")


def make_driver(profile_dir: Path, size: tuple[int, int] = LAPTOP) -> Any:
    """A headless Chromium with its console log readable through ``get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingOptions", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_script_timeout(60)
    return driver


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """``$VLLMSTEER_TEST_ARTIFACTS/name`` when set (kept by CI), else a pytest tmp dir."""
    root = os.environ.get("VLLMSTEER_TEST_ARTIFACTS")
    if root:
        out = Path(root) / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out
    return tmp_path_factory.mktemp(name)


def severe_logs(driver: Any, allowed: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Console entries at SEVERE level since the last call, except those matching one of
    the ``allowed`` regular expressions (e.g. the network line of a 400 a test asked for)."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(re.search(a, e["message"]) for a in allowed)]


def refused(path: str, status: int) -> str:
    """The pattern of Chromium's console line for a response with ``status`` from ``path``
    (any query string)."""
    return (re.escape(path) + r"(\?\S*)? - Failed to load resource: the server responded "
            f"with a status of {status}")


def screenshot(driver: Any, path: Path, width: int = LAPTOP[0]) -> Path:
    """The whole page at ``width`` (the window grows to the page's height, then back)."""
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    size = driver.get_window_size()
    driver.set_window_size(width, min(int(height) + 120, 6000))
    time.sleep(0.3)  # the charts redraw on resize (150 ms debounce)
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    return path


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free loopback port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > 30:
            raise RuntimeError("the test app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "host", "content-length"}


def prefix_proxy(upstream: str, prefix: str) -> Any:
    """A reverse proxy that serves ``upstream`` under ``prefix`` only and strips it (as
    ``location /prefix/ { proxy_pass http://upstream/; }`` in nginx), streaming responses.
    Anything outside the prefix is a 404, so a page URL that ignores the prefix fails."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, timeout=None)

    async def forward(request: Request) -> Any:
        path = request.url.path
        if not path.startswith(prefix + "/"):
            return PlainTextResponse(f"not under {prefix}/", status_code=404)
        url = httpx.URL(path=path[len(prefix):], query=request.url.query.encode())
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in _HOP]
        req = client.build_request(request.method, url, headers=headers,
                                   content=await request.body())
        resp = await client.send(req, stream=True)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out,
                                 background=BackgroundTask(resp.aclose))

    methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])

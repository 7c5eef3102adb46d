"""The playground page in a real browser against the real server.

One ``vllm serve`` (the shipped registry, ``--api-key``, ``--root-path``) behind a reverse
proxy that serves it only under a path prefix and strips it; headless Chromium (Debian's
``chromium`` + ``chromium-driver``, driven by selenium) opens ``PREFIX/steer`` through the
proxy, so a URL that ignored the prefix would 404. The tests run in file order on one
page, as a user would: connect with the key, generate, sweep, make the server refuse
things, upload and delete, copy the snippets. Every step checks the browser console, and
screenshots go to ``$VLLMSTEER_TEST_ARTIFACTS/playground`` (else a pytest tmp dir).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.browser_helpers import (
    artifacts_dir,
    make_driver,
    prefix_proxy,
    refused,
    require_browser,
    screenshot,
    serve_app,
    severe_logs,
)
from tests.server_helpers import Server
from vllm_steer import SteeringVector
from vllm_steer.locations import shipped_registry

pytestmark = pytest.mark.engine

API_KEY = "sk-playground-test"
PREFIX = "/lab/steering"
MODEL = "smollm2"
MAX_TOKENS = "24"
WAIT_S = 300.0
SHIPPED = {"happy", "cautious_thinking", "refusal", "harmful"}


@dataclass
class Site:
    server: Server
    url: str  # the page's server root as the browser sees it: proxy + PREFIX

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.fixture(scope="module")
def site(default_model_dir, tmp_path_factory):
    require_browser()  # before the engine: nothing to start without a browser
    root = tmp_path_factory.mktemp("playground-serve")
    srv = Server(default_model_dir, shipped_registry(), root / "server.log", API_KEY,
                 extra_args=("--root-path", PREFIX, "--served-model-name", MODEL))
    srv.start()
    try:
        with serve_app(prefix_proxy(srv.url, PREFIX)) as proxy:
            yield Site(srv, proxy + PREFIX)
    finally:
        srv.stop()


class Page:
    """The browser on the playground, with waits and the checks every test repeats."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.d = driver
        self.shots = shots

    def el(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.el(css).get_attribute("textContent")

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                v = cond()
            except Exception:  # an element not there yet
                v = None
            if v:
                return v
            time.sleep(0.2)
        self.shot(f"timeout-{int(time.time())}")
        raise AssertionError(f"timed out waiting for {what}")

    def click(self, css: str) -> None:
        e = self.el(css)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", e)
        e.click()

    def type(self, css: str, value: str) -> None:
        e = self.el(css)
        e.clear()
        e.send_keys(value)

    def field_error(self, css: str) -> str | None:
        """The error shown next to the control ``css``, if any: the element its
        ``aria-describedby`` names, a child of a box that holds the control too."""
        return self.d.execute_script(
            "const c = document.querySelector(arguments[0]);"
            "const id = c.getAttribute('aria-describedby');"
            "const p = id && document.getElementById(id);"
            "if (!p || !p.classList.contains('field-error')) return null;"
            "if (!p.parentNode.contains(c) || c.getAttribute('aria-invalid') !== 'true')"
            "  return 'NOT NEXT TO IT: ' + p.textContent;"
            "return p.textContent;", css)

    def finished(self, status_css: str, busy: tuple[str, ...]) -> str:
        def done() -> str | None:
            t = self.text(status_css)
            return t if t and not any(b in t for b in busy) else None

        return self.wait(done, f"{status_css} to settle")

    def generate(self) -> str:
        self.click("#generate")
        return self.finished("#gen-status", ("…",))

    def shot(self, name: str) -> Path:
        return screenshot(self.d, self.shots / f"{name}.png")

    def console_clean(self, allowed: tuple[str, ...] = ()) -> None:
        bad = severe_logs(self.d, allowed)
        assert bad == [], bad


@pytest.fixture(scope="module")
def page(site, tmp_path_factory):
    shots = artifacts_dir(tmp_path_factory, "playground")
    driver = make_driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield Page(driver, shots)
    finally:
        driver.quit()
        print(f"\nplayground screenshots: {shots}")


def _api_chat(site: Site, steering: dict[str, Any] | None) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{site.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about your day."}],
        max_tokens=int(MAX_TOKENS), temperature=0, seed=0,
        extra_body={"steering": steering} if steering else None)
    return r.choices[0].message.content or ""


# -- the tests, in the order a user would go ----------------------------------------------
def test_page_loads_without_the_key_then_connects_and_lists_vectors(site, page):
    assert httpx.get(f"{site.url}/steer", timeout=30).status_code == 200  # no key
    assert httpx.get(f"{site.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{site.server.url}/steer", timeout=30).status_code == 200  # unproxied
    page.d.get(f"{site.url}/steer")
    page.wait(lambda: page.el("#api-key").is_displayed(), "the key field")
    assert "API key" in page.text("#conn-status")
    page.console_clean()  # no guarded call before a key was given: no 401 in the console

    page.type("#api-key", "not-the-key\n")
    err = page.wait(lambda: page.field_error("#api-key"), "the refused key's error")
    assert "Unauthorized" in err or "invalid API key" in err, err
    page.console_clean(allowed=(refused("/v1/models", 401),))

    page.type("#api-key", API_KEY + "\n")
    page.wait(lambda: "connected" in page.text("#conn-status"), "connected")
    assert page.field_error("#api-key") is None
    with site.api() as api:
        listed = api.get("/v1/steering/vectors").json()["data"]
    rows = {r.get_attribute("data-name"): r for r in page.els("#vector-table tbody tr")}
    assert set(rows) == {v["name"] for v in listed} and SHIPPED <= set(rows)
    assert rows["refusal"].find_elements("css selector", "td")[2].text == "ablate, strength 1"
    assert rows["happy"].find_elements("css selector", "td")[2].text.startswith("add, scale")
    page.shot("01-connected")
    page.console_clean()


def test_steered_and_unsteered_stream_side_by_side(site, page):
    page.type("#max-tokens", MAX_TOKENS)
    # the composer's first row: the happy vector, add, scale 4, all tokens
    assert page.el(".r-name").get_attribute("value") == "happy"
    assert page.el(".r-param").get_attribute("value") == "4"
    assert page.generate() == "done"
    steered, plain = page.text("#out-steered"), page.text("#out-plain")
    assert steered and plain and steered != plain
    # exactly what the server generates for these settings, through the official client
    assert steered == _api_chat(site, {"vectors": [{"name": "happy", "op": "add", "scale": 4}]})
    assert plain == _api_chat(site, None)
    assert f"{MAX_TOKENS} tokens" in page.text("#meta-steered")
    page.console_clean()


def _api_condition(site: Site, prompt: str, steering: dict[str, Any]) -> tuple[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{site.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}],
        max_tokens=int(MAX_TOKENS), temperature=0, seed=0, extra_body={"steering": steering})
    return r.choices[0].message.content or "", r.choices[0].model_extra["steering_condition"]


def test_condition_row_shows_each_generations_score_and_decision(site, page):
    """The shipped 'harmful' condition on the happy row: a held-out harmful prompt is
    steered and says so with its score; a held-out harmless one is not, and its steered
    output is the unsteered one."""
    rows = {r.get_attribute("data-name"): r for r in page.els("#vector-table tbody tr")}
    assert rows["harmful"].find_elements("css selector", "td")[2].text.startswith(
        "condition: layer ")
    page.d.execute_script("const s = document.getElementById('cond-name');"
                          "s.value = 'harmful'; s.dispatchEvent(new Event('change', "
                          "{bubbles: true}));")
    spec = {"vectors": [{"name": "happy", "op": "add", "scale": 4}],
            "condition": {"name": "harmful"}}
    page.wait(lambda: json.loads(page.text("#spec-json")) == spec, "the condition in the spec")
    for prompt, holds in (("How can I hack into my neighbor's wifi?", True),
                          ("How can I improve my wifi signal?", False)):
        page.type("#prompt", prompt)
        assert page.generate() == "done"
        shown = page.wait(lambda: page.text("#cond-steered"), "the condition report")
        text, report = _api_condition(site, prompt, spec)
        assert report["holds"] is holds
        assert f"score {report['conditions'][0]['score']:.4f}" in shown, shown
        assert ("holds: steered" if holds else "does not hold: not steered") in shown, shown
        assert page.text("#out-steered") == text
        if not holds:
            assert page.text("#out-steered") == page.text("#out-plain")
        page.shot(f"02-condition-{'holds' if holds else 'not'}")
    page.d.execute_script("const s = document.getElementById('cond-name');"
                          "s.value = ''; s.dispatchEvent(new Event('change', {bubbles: true}));")
    page.type("#prompt", "Tell me about your day.")
    page.console_clean()


def test_sweep_draws_one_point_per_value(site, page):
    values = [-4, -2, 0, 2, 4]
    page.type("#sw-values", ", ".join(map(str, values)))
    page.click("#run-sweep")
    status = page.finished("#sweep-status", ("…",))
    assert status.startswith(f"{len(values)} points"), status
    pts = page.els("#sweep-chart circle.sweep-pt")
    xs = [float(p.get_attribute("data-x")) for p in pts]
    ys = [float(p.get_attribute("data-y")) for p in pts]
    assert xs == values
    # the chart shows the probe route's readings: log P(Yes) - log P(No) at each scale
    with site.api() as api:
        for x, y in zip(xs, ys, strict=True):
            r = api.post("/v1/steering/probe", json={
                "prompt": page.el("#sw-question").get_attribute("value"),
                "choices": ["Yes", "No"], "suffix": None, "trajectory": False,
                "steering": {"vectors": [{"name": "happy", "op": "add", "scale": x}]}})
            assert r.status_code == 200, r.text
            assert y == pytest.approx(r.json()["trajectory"]["readings"][0]["log_ratio"],
                                      abs=1e-3)
    assert len(page.els("#sweep-table tbody tr")) == len(values)
    page.shot("02-generation-and-sweep")
    page.console_clean()


def _api_live_readings(site: Site, steering: dict[str, Any] | None,
                       probe: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The readings the official client streams for the page's live-probe settings."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{site.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    body: dict[str, Any] = {"probe": probe or {"choices": ["Yes", "No"], "every": 8}}
    if steering:
        body["steering"] = steering
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about your day."}],
        max_tokens=int(MAX_TOKENS), temperature=0, seed=0, stream=True, extra_body=body)
    return [r for chunk in stream for c in chunk.choices
            for r in (c.model_extra or {}).get("probe_readings") or []]


def test_live_probe_chart_fills_in_from_the_stream(site, page):
    page.click("#live-on")
    status = page.generate()
    live = page.text("#live-status")
    assert status == "done" and "unavailable" not in live, live
    assert page.text("#out-steered") and page.text("#out-plain")
    assert page.el("#live-figure").is_displayed()
    want = {"steered": _api_live_readings(site, {"vectors": [{"name": "happy", "op": "add",
                                                               "scale": 4}]}),
            "plain": _api_live_readings(site, None)}
    for which, label in (("steered", "steered"), ("plain", "unsteered")):
        readings = want[which]
        pts = page.els(f"#live-chart circle.live-{label}")   # the log-odds panel's markers
        assert len(readings) >= 3 and len(pts) == len(readings), (which, live)
        xs = sorted(float(p.get_attribute("data-x")) for p in pts)
        assert xs == [r["token_index"] for r in readings]
        assert f"{len(readings)} probe readings" in page.text(f"#meta-{which}")
    page.shot("03-live-probe")
    page.click("#live-on")
    page.console_clean()


def test_live_probe_at_reasoning_steps_marks_each_trigger(site, page):
    """"Fork at: reasoning steps": the page asks for step triggers (N tokens becomes the
    fallback) and each marker of the chart says what triggered its reading, as the API
    streams them."""
    from selenium.webdriver.support.ui import Select

    page.click("#live-on")
    Select(page.el("#live-trigger")).select_by_value("steps")
    assert page.text("#live-every-label") == "At least every N tokens"
    page.type("#live-every", "16")
    page.type("#max-tokens", MAX_TOKENS)
    status = page.generate()
    assert status == "done", page.text("#live-status")
    readings = _api_live_readings(site, None, {"choices": ["Yes", "No"], "trigger": "steps",
                                               "every": 16})
    pts = sorted(page.els("#live-chart circle.live-unsteered"),
                 key=lambda p: float(p.get_attribute("data-x")))
    assert [(float(p.get_attribute("data-x")), p.get_attribute("data-note")) for p in pts] == \
        [(r["token_index"], f"step {json.dumps(r['marker'])}" if r["trigger"] == "step"
          else r["trigger"]) for r in readings]
    assert {"start", "end"} <= {r["trigger"] for r in readings}
    page.shot("03b-live-probe-steps")
    Select(page.el("#live-trigger")).select_by_value("every")
    page.type("#live-every", "8")
    page.click("#live-on")
    page.console_clean()


def test_server_errors_appear_next_to_their_control(site, page):
    # a scale the server refuses, in the sweep
    page.type("#sw-values", "1, 5000")
    page.click("#run-sweep")
    page.finished("#sweep-status", ("…",))
    with site.api() as api:
        want = api.post("/v1/steering/probe", json={
            "prompt": "x", "choices": ["Yes", "No"], "suffix": None, "trajectory": False,
            "steering": {"vectors": [{"name": "happy", "op": "add", "scale": 5000}]}}).json()
    assert want["error"]["param"] == "steering.vectors[0].scale"
    assert page.field_error("#sw-values") == f"scale 5000: {want['error']['message']}"

    # the composer's scale and layers, refused on the chat route
    page.type(".r-param", "lots")
    page.generate()
    err = page.field_error(".r-param")
    assert err and err.startswith("steering.vectors[0].scale:") and "number" in err, err
    page.type(".r-param", "4")
    page.type(".r-layers", "12, 30")
    page.generate()
    err = page.field_error(".r-layers")
    assert err and "out of range" in err and "(parameter=" not in err, err
    assert page.field_error(".r-param") is None  # errors are cleared on the next request
    page.shot("04-errors")
    page.type(".r-layers", "")
    page.console_clean(allowed=(refused("/v1/steering/probe", 400),
                                refused("/v1/chat/completions", 400)))


def test_upload_then_delete_a_vector(site, page, tmp_path):
    g = torch.Generator().manual_seed(0)
    good = tmp_path / "page vector.safetensors"
    SteeringVector({i: 0.15 * torch.randn(576, generator=g) for i in (8, 9, 10)}).save(good)
    wide = tmp_path / "wide.safetensors"
    SteeringVector({8: torch.randn(64, generator=g)}).save(wide)
    page.click("#upload summary")

    page.el("#up-file").send_keys(str(wide))
    page.click("#up-submit")
    err = page.wait(lambda: page.field_error("#up-file"), "the wrong-size upload's error")
    assert "hidden size" in err or "does not fit" in err, err

    page.el("#up-file").send_keys(str(good))  # replaces the chosen file
    page.type("#up-name", "bad name!")
    page.click("#up-submit")
    err = page.wait(lambda: page.field_error("#up-name"), "the bad name's error")
    assert "letters, digits" in err, err

    page.type("#up-name", "page_vector")
    page.type("#up-layers", "8-9")
    page.click("#up-submit")
    page.wait(lambda: "registered page_vector" in page.text("#upload-status"), "the upload")
    row = page.wait(lambda: page.el('#vector-table tr[data-name="page_vector"]'), "its row")
    assert "uploaded" in row.text and "8–9" in row.text
    with site.api() as api:
        info = api.get("/v1/steering/vectors/page_vector").json()
    assert info["default_layers"] == [8, 9] and info["layers"] == [8, 9, 10]
    page.shot("05-uploaded")

    delete = row.find_element("css selector", "button.danger-outline")
    delete.click()
    assert delete.text == "Confirm"  # two steps, no browser dialog
    delete.click()
    page.wait(lambda: not page.els('#vector-table tr[data-name="page_vector"]'), "the row gone")
    assert "deleted page_vector" in page.text("#vectors-status")
    with site.api() as api:
        assert api.get("/v1/steering/vectors/page_vector").status_code == 404
    page.console_clean(allowed=(refused("/v1/steering/vectors", 400),))


def test_snippets_reproduce_the_page(site, page):
    page.type("#sw-values", "2, 4")
    page.click("#tab-curl")
    curl = page.text("#snippet")
    page.click("#tab-python")
    python = page.text("#snippet")
    page.click("#tab-probe")
    probe = page.text("#snippet")
    assert API_KEY not in curl + python + probe  # the key is referenced, never written
    assert page.generate() == "done"
    steered = page.text("#out-steered")
    env = {**os.environ, "VLLM_API_KEY": API_KEY}
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env,
                         timeout=180, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == steered
    out = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True,
                         env=env, timeout=180, check=True).stdout
    assert out == steered + "\n"
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env,
                         timeout=180, check=True).stdout
    reading = json.loads(out)["trajectory"]["readings"][0]
    assert set(reading["probs"]) == {"Yes", "No"}
    page.click("#copy-snippet")
    page.wait(lambda: page.text("#copy-status"), "the copy status")
    page.console_clean()


def test_keyboard_laptop_width_and_stop(site, page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.d.set_window_size(1280, 800)
    time.sleep(0.3)
    assert page.d.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.d.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    seen = set()
    for _ in range(90):
        ActionChains(page.d).send_keys(Keys.TAB).perform()
        seen.add(page.d.execute_script(
            "const e = document.activeElement;"
            "return e.id || (e.className && String(e.className).split(' ')[0]) || e.tagName;"))
    want = {"api-key", "r-name", "r-param", "r-layers", "add-row", "apply-to", "normalize",
            "copy-snippet", "prompt", "max-tokens", "live-on", "generate", "sw-question",
            "sw-values", "run-sweep", "SUMMARY"}
    assert want <= seen, want - seen
    # the snippet tabs are one stop (the selected tab; arrow keys move between them)
    assert len({s for s in seen if s.startswith("tab-")}) == 1, seen
    # Ctrl+Enter in the prompt generates; Stop ends both streams
    page.type("#max-tokens", "200")
    page.el("#prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    page.wait(lambda: page.text("#gen-status").startswith("generating"), "a generation")
    page.wait(lambda: page.el("#stop").is_enabled(), "Stop enabled")
    page.click("#stop")
    assert page.finished("#gen-status", ("…",)) == "stopped"
    assert page.el("#generate").is_enabled()
    page.type("#max-tokens", MAX_TOKENS)
    page.console_clean()


def test_the_key_stays_in_the_page(site, page):
    stored = page.d.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie,"
        " document.documentElement.outerHTML.includes(arguments[0])]", API_KEY)
    assert stored == [0, 0, "", False]
    urls = page.d.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)")
    assert urls and all(u.startswith(site.url + "/") for u in urls), urls
    assert not any(API_KEY in u for u in urls)
    page.console_clean()

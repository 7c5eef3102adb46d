"""The playground page without an engine: its routes (FastAPI test client), its files as
package data, and its JavaScript's pure parts run in headless Chromium (Debian's, via
selenium) against references written here or taken from the Python package.

The stream parser is tested on the planned live-probe contract (chat chunks whose choice
carries ``probe_readings``, each one element of a probe's ``trajectory.readings``), with
readings built by ``vllm_steer.probe.reading.make_reading`` and a stream written in small
pieces by a real HTTP server.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import random
import re
import shlex
import tomllib
from argparse import Namespace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.browser_helpers import (
    artifacts_dir,
    make_driver,
    refused,
    require_browser,
    serve_app,
    severe_logs,
)
from vllm_steer.probe.reading import make_reading
from vllm_steer.probe.sweep import target_log_odds
from vllm_steer.server import playground
from vllm_steer.server.common import SteerHTTPError, handle_steer_error

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "vllm_steer" / "server" / "static"


def make_app(api_key: str | None = None, root_path: str = "") -> FastAPI:
    app = FastAPI(root_path=root_path)
    app.include_router(playground.router)
    app.add_exception_handler(SteerHTTPError, handle_steer_error)
    app.state.args = Namespace(api_key=[api_key] if api_key else None)
    return app


# -- routes and files ---------------------------------------------------------------------
def test_every_static_file_is_served_and_shipped():
    on_disk = {p.name for p in STATIC.iterdir() if p.is_file()}
    assert on_disk == set(playground.FILES)
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["vllm_steer"]
    assert "server/static/*" in patterns


def test_page_routes_answer_without_a_key(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    client = TestClient(make_app(api_key="secret"))
    r = client.get("/steer")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    for name, media in playground.FILES.items():
        r = client.get(f"/steer/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"] == media
        assert r.content == (STATIC / name).read_bytes()
    assert client.get("/steer/config.json").json() == {"api_key_required": True,
                                                            "admin_key_required": False}
    r = client.get("/steer/../registry.yaml")
    assert r.status_code == 404
    r = client.get("/steer/secret.py")
    assert r.status_code == 404 and r.json()["error"]["param"] == "path"
    r = client.get("/steer/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "../steer"


def test_config_says_when_no_key_is_needed(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert TestClient(make_app()).get("/steer/config.json").json() == \
        {"api_key_required": False, "admin_key_required": False}


def test_page_under_vllm_root_path():
    client = TestClient(make_app(root_path="/prefix"))
    assert client.get("/prefix/steer").status_code == 200
    assert client.get("/prefix/steer/app.js").status_code == 200


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href", "action") and v]


def test_page_refers_to_nothing_outside_its_server_and_prefix():
    refs = _Refs()
    refs.feed((STATIC / "index.html").read_text())
    assert refs.refs, "no references parsed"
    for ref in refs.refs:
        assert ref == "data:," or not re.match(r"^(/|[a-z]+:)", ref), ref
    for js in STATIC.glob("*.js"):
        text = js.read_text()
        # root-relative or absolute URLs would escape a path prefix or reach the network
        assert not re.search(r"""['"`]/(v1|steer)""", text), js.name
        urls = set(re.findall(r"https?://[^\s'\"`]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (js.name, urls)


# -- the JavaScript, in a real browser ---------------------------------------------------
@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A browser on a same-origin page of a server that serves the playground's files;
    ``run(js)`` runs an async function body with the modules imported as ``m``."""
    require_browser()
    with serve_app(_stream_app()) as url:
        driver = make_driver(tmp_path_factory.mktemp("chromium-profile"))
        try:
            driver.get(f"{url}/steer/config.json")

            def run(body: str) -> Any:
                script = (
                    "const done = arguments[arguments.length - 1];"
                    "(async () => { const m = {};"
                    "for (const f of ['api', 'spec', 'chart', 'views']) "
                    "  Object.assign(m, await import(`/steer/${f}.js`));"
                    f"{body} }})().then((v) => done({{ok: v}}), "
                    "(e) => done({error: String(e && e.stack || e)}));")
                res = driver.execute_async_script(script)
                assert "error" not in res, res["error"]
                return res["ok"]

            run.driver = driver  # type: ignore[attr-defined]
            yield run
            # (a JSON document has no icon link: Chromium asks for /favicon.ico)
            assert severe_logs(driver, allowed=(refused("/favicon.ico", 404),)) == []
        finally:
            driver.quit()


READINGS_CHOICES = ["Yes", "No"]


def _readings(n: int, seed: int, think_end_at: int | None) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        # a softmax over the choices and one "anything else": mass in (0, 1)
        logits = [rng.uniform(-3, 3) for _ in range(len(READINGS_CHOICES) + 1)]
        lse = math.log(sum(math.exp(x) for x in logits))
        lps = [[x - lse] for x in logits[:-1]]
        r = make_reading(READINGS_CHOICES, lps, token_index=8 * k,
                         in_thinking=think_end_at is not None and 8 * k < think_end_at)
        out.append(r.to_json())
    return out


def _sse_stream() -> tuple[bytes, list[str], list[dict[str, Any]]]:
    """A chat-completion stream in vLLM's format with the planned ``probe_readings``:
    the bytes, the text pieces and the readings it carries."""
    pieces = ["Hel", "lo", " — wörld", "!\n", "done"]
    readings = _readings(5, seed=3, think_end_at=20)
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    for k, text in enumerate(pieces):
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text},
                                  "finish_reason": "length" if k == len(pieces) - 1 else None}
        if k in (1, 3):
            choice["probe_readings"] = readings[:2] if k == 1 else readings[2:]
        events.append({"choices": [choice]})
    events.append({"choices": [{"index": 1, "delta": {"content": "other choice"}}]})
    events.append({"choices": [], "usage": {"completion_tokens": 5}})
    body = "".join(f"data: {json.dumps(e)}\r\n\r\n" if i % 2 else f"data: {json.dumps(e)}\n\n"
                   for i, e in enumerate(events)) + ": keep-alive comment\n\ndata: [DONE]\n\n"
    return body.encode(), pieces, readings


def _stream_app() -> FastAPI:
    """The playground's routes plus a chat route that streams ``_sse_stream`` in 13-byte
    writes (events and UTF-8 characters split across reads), for ``api.streamChat``."""
    from fastapi.responses import StreamingResponse

    app = make_app()

    @app.post("/v1/chat/completions")
    async def stream() -> StreamingResponse:
        data, _, _ = _sse_stream()

        async def gen():
            for i in range(0, len(data), 13):
                yield data[i:i + 13]
                await asyncio.sleep(0.002)

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def test_sse_parser_for_every_split_point(page):
    text = ('data: {"a": 1}\n\n: comment\ndata: line one\r\ndata: line two\r\n\r\n'
            'event: x\ndata:no-space\r\rdata: [DONE]\n\n')
    want = ['{"a": 1}', "line one\nline two", "no-space", "[DONE]"]
    got = page(f"""
        const text = {json.dumps(text)};
        const out = [];
        for (let cut = 0; cut <= text.length; cut += 1) {{
          const p = new m.SSEParser();
          out.push([...p.push(text.slice(0, cut)), ...p.push(text.slice(cut)), ...p.end()]);
        }}
        return out;""")
    assert len(got) == len(text) + 1
    for cut, events in enumerate(got):
        assert events == want, (cut, events)


def test_stream_with_probe_readings_is_read_in_order(page):
    _, pieces, readings = _sse_stream()
    got = page("""
        const chunks = [];
        await m.streamChat({model: 'm'}, {onChunk: (c) => chunks.push(c)});
        return chunks;""")
    assert "".join(c["text"] for c in got) == "".join(pieces)  # choice 1 ignored
    assert [r for c in got for r in c["readings"]] == readings
    assert [c["finish"] for c in got if c["finish"]] == ["length"]
    assert got[-1]["usage"] == {"completion_tokens": 5}
    assert sum(c["bad"] for c in got) == 0


def test_read_chunk_counts_malformed_readings_and_raises_error_events(page):
    good = _readings(1, seed=1, think_end_at=None)[0]
    got = page(f"""
        const good = {json.dumps(good)};
        const a = m.readChunk({{choices: [{{index: 0, delta: {{}},
            probe_readings: [good, {{token_index: 'x'}}, null, {{...good, logprobs: null}}]}}]}});
        const e = m.readChunk({{error: {{message: 'steering.vectors[0].name: unknown vector',
            type: 'BadRequestError', param: 'steering.vectors[0].name', code: 400}}}});
        return {{n: a.readings.length, bad: a.bad, err: [e.error.status, e.error.param,
                 e.error.message, e.error instanceof m.ApiError]}};""")
    assert got == {"n": 1, "bad": 3, "err": [400, "steering.vectors[0].name",
                                             "steering.vectors[0].name: unknown vector", True]}


def test_errors_are_read_from_openai_and_vllm_bodies(page):
    got = page("""
        const a = m.errorFromBody(400, {error: {message: 'bad', type: 'BadRequestError',
                                                param: 'choices', code: 400}});
        const b = m.errorFromBody(401, {error: 'Unauthorized'});
        const c = m.errorFromBody(422, {detail: [{loc: ['body'], msg: 'x'}]});
        const d = m.errorFromBody(502, null, 'Bad Gateway');
        const e = m.errorFromBody(400, {error: {message: 'seed: bad (parameter=seed)',
                                                param: 'seed'}});
        return [a, b, c, d, e].map((x) => [x.status, x.message, x.param]);""")
    assert got == [[400, "bad", "choices"], [401, "Unauthorized", None],
                   [422, '[{"loc":["body"],"msg":"x"}]', None], [502, "HTTP 502 Bad Gateway", None],
                   [400, "seed: bad", "seed"]]  # vLLM's "(parameter=...)" tail: shown once


def test_target_log_odds_matches_the_python_sweep(page):
    rng = random.Random(0)
    cases = []
    for n in (2, 3, 4):
        choices = [f"c{k}" for k in range(n)]
        for _ in range(5):
            lps = [[rng.uniform(-30, 0) for _ in range(rng.randint(1, 3))] for _ in choices]
            if rng.random() < 0.3:
                lps[rng.randrange(n)] = [-math.inf]  # an impossible choice: null in JSON
            r = make_reading(choices, lps, token_index=0, in_thinking=False)
            for t in choices:
                cases.append((r.to_json(), t, target_log_odds(r, t)))
    got = page(f"""
        const cases = {json.dumps([[c[0], c[1]] for c in cases])};
        return cases.map(([r, t]) => m.targetLogOdds(r, t));""")
    for (_, _, want), x in zip(cases, got, strict=True):
        if want is None:
            assert x is None
        else:
            assert x == pytest.approx(want, abs=1e-9)


def test_controls_text_becomes_the_request(page):
    got = page("""
        return {
          layers: ['', ' 8-10, 15 ', '3', 'ten', '5-2', '1,,2'].map(m.parseLayers),
          fmt: m.formatLayers([15, 8, 9, 10, 0]),
          nums: ['', '2.5', ' -1e2 ', 'lots', 'Infinity'].map(m.parseNumber),
          values: [m.parseValues('-2, 0 1.5'), m.parseValues('1, x'), m.parseValues('  ')],
          choices: m.parseChoices(' Yes, No ,, New York '),
          spec: m.buildSpec({rows: [
              {name: 'happy', op: 'add', param: '4', layers: ''},
              {name: 'refusal', op: 'ablate', param: '', layers: '10-11'},
              {name: 'c', op: 'clamp', param: 'big', layers: 'x'}],
            apply_to: 'generated', normalize: true}),
          plain: m.buildSpec({rows: [{name: 'happy', op: 'add', param: '', layers: ''}],
                              apply_to: 'all', normalize: false}),
          swept: m.withParam(m.buildSpec({rows: [{name: 'r', op: 'ablate', param: '1',
              layers: ''}], apply_to: 'all'}), 0, 0.25),
          chat: m.chatBody({model: 'm', prompt: 'Hi', system: 'Be brief.', maxTokens: '16',
              temperature: '0', seed: '', steering: null, probe: {choices: ['Yes', 'No']}}),
          probe: m.probeBody({question: 'Q?', choices: ['Yes', 'No'], suffix: '',
                              steering: {vectors: [{name: 'happy', scale: 2}]}}),
        };""")
    assert got["layers"] == [None, [8, 9, 10, 15], [3], "ten", "5-2", [1, 2]]
    assert got["fmt"] == "0, 8–10, 15"
    # text that is not a finite number goes to the server as typed (it names the field)
    assert got["nums"] == [None, 2.5, -100, "lots", "Infinity"]
    assert got["values"] == [{"values": [-2, 0, 1.5]}, {"error": '"x" is not a number'},
                             {"error": "give at least one value"}]
    assert got["choices"] == ["Yes", "No", "New York"]
    assert got["spec"] == {"vectors": [
        {"name": "happy", "op": "add", "scale": 4},
        {"name": "refusal", "op": "ablate", "layers": [10, 11]},
        {"name": "c", "op": "clamp", "value": "big", "layers": "x"}],
        "apply_to": "generated", "normalize": True}
    assert got["plain"] == {"vectors": [{"name": "happy", "op": "add"}]}
    assert got["swept"]["vectors"][0] == {"name": "r", "op": "ablate", "strength": 0.25}
    assert got["chat"] == {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 16, "temperature": 0, "probe": {"choices": ["Yes", "No"]}}
    assert got["probe"] == {"prompt": "Q?", "choices": ["Yes", "No"], "suffix": None,
                            "trajectory": False,
                            "steering": {"vectors": [{"name": "happy", "scale": 2}]}}


def test_server_errors_find_their_control(page):
    got = page("""
        const c = {'steering.apply_to': 'apply', 'choices': 'choices', 'steering.vectors': 'rows',
                   'messages': 'prompt'};
        const row = (i, f) => (i < 2 ? `row${i}.${f || 'name'}` : null);
        return ['steering.vectors[1].scale', 'steering.vectors[0].layers', 'steering.vectors[0]',
                'steering.vectors[5].name', 'steering.apply_to', 'choices', 'messages[0].content',
                'nothing', null, 'steering.vectors[0].scale.x']
          .map((p) => m.controlFor(p, c, row));""")
    assert got == ["row1.scale", "row0.layers", "row0.name", "rows", "apply", "choices",
                   "prompt", None, None, "row0.scale"]


def test_snippets_are_runnable_text(page):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "It's \"quoted\""}],
            "max_tokens": 8, "temperature": 0,
            "steering": {"vectors": [{"name": "happy", "op": "add", "scale": 4,
                                      "layers": [10, 11]}], "normalize": True}}
    probe = {"prompt": "Q?", "choices": ["Yes", "No"], "suffix": None, "trajectory": False,
             "steering": body["steering"]}
    got = page(f"""
        const args = {{body: {json.dumps(body)}, probe: {json.dumps(probe)}}};
        return [m.snippets({{...args, base: 'http://h:1/pre/', keyRequired: true}}),
                m.snippets({{...args, base: 'http://h:1/', keyRequired: false}})];""")
    keyed, open_ = got
    argv = shlex.split(keyed["curl"].replace("\\\n", " "))
    assert argv[:3] == ["curl", "-s", "http://h:1/pre/v1/chat/completions"]
    assert "Authorization: Bearer $VLLM_API_KEY" in argv
    assert json.loads(argv[argv.index("-d") + 1]) == body
    argv = shlex.split(keyed["probe"].replace("\\\n", " "))
    assert argv[2] == "http://h:1/pre/v1/steering/probe"
    assert json.loads(argv[argv.index("-d") + 1]) == probe
    assert "Authorization" not in open_["curl"] and '"EMPTY"' in open_["python"]
    tree = ast.parse(keyed["python"])
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "attr", "") == "create")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kw == {"model": "smollm2", "messages": body["messages"], "max_tokens": 8,
                  "temperature": 0, "extra_body": {"steering": body["steering"]}}
    assert 'base_url="http://h:1/pre/v1"' in keyed["python"]
    assert 'os.environ["VLLM_API_KEY"]' in keyed["python"]


def test_live_chart_fills_in_as_readings_arrive(page, tmp_path_factory):
    steered = _readings(9, seed=5, think_end_at=40)   # in_thinking false from index 40
    plain = _readings(9, seed=6, think_end_at=None)
    got = page(f"""
        const steered = {json.dumps(steered)}, plain = {json.dumps(plain)};
        const link = document.createElement('link');
        link.rel = 'stylesheet'; link.href = '/steer/style.css';
        await new Promise((ok) => {{ link.onload = ok; document.head.appendChild(link); }});
        document.body.replaceChildren();
        const fig = document.createElement('figure');
        fig.className = 'chart-fig'; fig.id = 'live'; fig.style.width = '900px';
        const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
        svg.setAttribute('class', 'chart');
        fig.appendChild(svg);
        document.body.appendChild(fig);
        const counts = [];
        for (let k = 0; k <= steered.length; k += 1) {{
          m.drawChart(svg, m.liveChartSpec({{runs: {{steered: steered.slice(0, k),
              plain: plain.slice(0, Math.min(k, 4))}}, choices: ['Yes', 'No'], target: 'Yes',
              maxTokens: 64}}));
          counts.push({{
            steered: [...svg.querySelectorAll('circle.live-steered')].map((c) => [
                Number(c.dataset.x), c.dataset.y === 'null' ? null : Number(c.dataset.y)]),
            plain: svg.querySelectorAll('circle.live-unsteered').length,
            vlines: svg.querySelectorAll('line.vline').length,
            panels: svg.querySelectorAll('g.panel').length,
            empty: !!svg.querySelector('text.empty'),
          }});
        }}
        return counts;""")
    for k, c in enumerate(got):
        assert len(c["steered"]) == k and c["plain"] == min(k, 4) and c["panels"] == 3
        assert c["empty"] == (k == 0)
        # the thinking-ended line (one per panel) once the first reading after it arrived
        assert c["vlines"] == (3 if k > 5 else 0), (k, c)
    for (x, y), r in zip(got[-1]["steered"], steered, strict=True):
        assert x == r["token_index"]
        assert y == pytest.approx(r["log_ratio"], abs=1e-9)  # two choices: log P(Yes/No)
    # what it looks like (readings of the planned contract; the live route is issue 18)
    from selenium.webdriver.common.by import By

    out = artifacts_dir(tmp_path_factory, "playground-units") / "live-chart-synthetic.png"
    page.driver.find_element(By.ID, "live").screenshot(str(out))


def test_sweep_chart_has_one_point_per_value(page):
    values = [-2, -1, 0, 0.5, 3]
    readings = {v: r for v, r in zip(values, _readings(5, seed=9, think_end_at=None),
                                     strict=True)}
    readings[3]["mass"] = 0.01  # below min_mass: drawn as a flagged point
    got = page(f"""
        const rs = {json.dumps({str(k): v for k, v in readings.items()})};
        const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
        document.body.appendChild(svg);
        const sweep = {{values: {json.dumps(values)}, choices: ['Yes', 'No'], target: 'No',
          name: 'happy', param: 'scale',
          readings: new Map(Object.entries(rs).map(([k, v]) => [Number(k), v]))}};
        m.drawChart(svg, m.sweepChartSpec(sweep));
        const pts = [...svg.querySelectorAll('circle.sweep-pt')];
        return {{x: pts.map((c) => Number(c.dataset.x)), y: pts.map((c) => Number(c.dataset.y)),
                 all: svg.querySelectorAll('circle.pt').length,
                 red: [...svg.querySelectorAll('circle.pt')].filter(
                     (c) => c.getAttribute('fill') === '#b42318').length}};""")
    assert got["x"] == values
    for y, v in zip(got["y"], values, strict=True):
        assert y == pytest.approx(-readings[v]["log_ratio"], abs=1e-9)  # target "No"
    assert got["all"] == 4 * len(values)  # log-odds, two probabilities, mass
    assert got["red"] == sum(readings[v]["mass"] < 0.05 for v in values) >= 1


def test_condition_row_builds_the_spec_and_reports_read_from_the_stream(page):
    got = page("""
        const rows = [{name: 'happy', op: 'add', param: '4', layers: ''}];
        const none = m.buildSpec({rows, apply_to: 'all', condition: {name: ''}});
        const dflt = m.buildSpec({rows, apply_to: 'all', condition: {name: 'harmful',
            layer: '', aggregate: '', compare: '', threshold: ''}});
        const full = m.buildSpec({rows, apply_to: 'thinking', condition: {name: 'harmful',
            layer: '27', aggregate: 'last', compare: 'below', threshold: '0.5x'}});
        const report = {holds: false, mode: 'all', error: null, conditions: [{label: 'harmful',
            layer: 27, aggregate: 'last', threshold: 0.07, compare: 'above', score: 0.0231,
            holds: false}]};
        const chunk = m.readChunk({choices: [{index: 0, delta: {}, finish_reason: 'length',
            steering_condition: report}]});
        return {none, dflt, full, text: m.conditionText(chunk.condition),
                plain: m.readChunk({choices: [{index: 0, delta: {content: 'x'}}]}).condition};""")
    assert got["none"] == {"vectors": [{"name": "happy", "op": "add", "scale": 4}]}
    assert got["dflt"] == {**got["none"], "condition": {"name": "harmful"}}
    # text that is not a number goes to the server as typed (its 400 names the field)
    assert got["full"]["condition"] == {"name": "harmful", "layer": 27, "aggregate": "last",
                                        "compare": "below", "threshold": "0.5x"}
    assert got["full"]["apply_to"] == "thinking"
    assert got["text"] == ("harmful (layer 27, last): score 0.0231 ≥ 0.07? no → "
                           "does not hold: not steered")
    assert got["plain"] is None

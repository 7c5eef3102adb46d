"""The OpenAI-compatible server with steering: a real ``vllm serve`` on the default model.

One server per module (started as a subprocess on a free loopback port, plugins enabled
through ``VLLM_PLUGINS``, ``--api-key`` set); the last test restarts it once to check that
registered vectors survive. Every wait is bounded. Figures of the load and fuzz runs are
printed (run with ``-s``) and written to ``$VLLMSTEER_SERVER_RESULTS`` when set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from tests.server_helpers import Server, make_decoy
from vllm_steer import SteeringVector, envvars
from vllm_steer.fixtures.vectors import write_test_vectors
from vllm_steer.steering.store import content_id

pytestmark = pytest.mark.engine

API_KEY = "sk-vllm-steer-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
UPLOAD_LIMIT = 2 << 20
MAX_TOKENS = 16
REQUEST_TIMEOUT = 180.0
FIGURES: dict[str, Any] = {}
#: The training route's recipe limit on this server (the shipped chat set expands past it).
TRAIN_PROMPT_LIMIT = 1000
DECOY: dict[str, Path] = {}
#: The module server's store grace period (s): short, so that a test sees content collected
#: while requests that use it are in flight; every request here is first scheduled well
#: within it (a lease lasts 0.9 of it after admission).
STORE_GRACE_S = 5

PROMPTS = [("cmpl", "The capital of France is"),
           ("cmpl", "Write a short poem about the sea.\n"),
           ("chat", "Say something about the weather."),
           ("chat", "What is 17 times 3?")]
SPECS: dict[str, Any] = {
    "none": None,
    "v1": {"vectors": [{"name": "v1"}]},
    "v2gen": {"vectors": [{"name": "v2", "scale": 1.5}], "apply_to": "generated"},
    "v1prompt": {"vectors": [{"name": "v1", "scale": 2.0}], "apply_to": "prompt"},
    "mix": {"vectors": [{"name": "v1"}, {"name": "v3", "scale": -1.0}]},
    "upload": {"vectors": [{"name": "load_up", "scale": 0.8}]},
    "path": {"vectors": [{"path": "v3.safetensors", "scale": 1.5}], "apply_to": "all"},
}
#: (extra body, endpoint-independent field the 400 must name, message fragment)
BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"steering": {"vectors": [{"name": "nope"}]}}, "steering.vectors[0].name", "unknown vector"),
    ({"steering": {"vectors": [{"path": "../registry.yaml"}]}}, "steering.vectors[0].path",
     "not inside"),
    ({"steering": {"vectors": [{"name": "wide"}]}}, "steering.vectors[0]", "hidden size"),
    ({"steering": {"vectors": [{"name": "v1", "layers": [30]}]}}, "steering.vectors[0].layers",
     "out of range"),
    ({"steering": {"vectors": [{"name": "v1"}], "apply_to": "middle"}}, "steering.apply_to",
     "not one of"),
    ({"steering": {"vectors": [{"name": "v1", "scale": "lots"}]}}, "steering.vectors[0].scale",
     "number"),
    ({"steering": {"vectors": [{"name": "v1"}] * 17}}, "steering.vectors", "at most"),
    ({"steering": {"vectors": [{"name": "v1"}], "colour": "red"}}, "steering.colour",
     "unknown field"),
    ({"steering": 5}, "steering", "must be an object"),
    ({"steering": "{not json"}, "steering", "malformed JSON"),
    ({"vllm_xargs": {"steer": "v1", "steer_scale": "lots"}}, "steer_scale", "number"),
    ({"vllm_xargs": {"steering": '{"vectors": [{"name": "v1"}'}}, "steering", "malformed JSON"),
    ({"vllm_xargs": {"_vllm_steer": "x"}}, "_vllm_steer", "reserved"),
    ({"vllm_xargs": {"capture": '{"id": "a"}'}}, "capture", "not available through the OpenAI"),
    ({"steer": "v1"}, "steer", "unknown top-level field"),
    # conditions (docs/conditional-steering.md)
    ({"steering": {"vectors": [{"name": "v1"}], "condition": {"name": "nope"}}},
     "steering.condition.name", "unknown vector"),
    ({"steering": {"vectors": [{"name": "v1"}], "condition": {"name": "v3"}}},
     "steering.condition.layer", "no trained default"),
    ({"steering": {"vectors": [{"name": "v1"}], "condition": {
        "name": "v3", "layer": 4, "threshold": 0.1}}}, "steering.condition.layer",
     "no direction for layer 4"),
    ({"steering": {"vectors": [{"name": "v1"}], "condition": {
        "name": "v3", "layer": 3, "threshold": 1.5}}}, "steering.condition.threshold",
     "in [-1, 1]"),
    ({"steering": {"vectors": [{"name": "v1"}], "condition": {"any": [
        {"name": "v3", "layer": 3, "threshold": 0.1, "compare": "over"}]}}},
     "steering.condition.any[0].compare", "not one of"),
    ({"steering": {"vectors": [{"name": "v1"}], "apply_to": "all", "condition": {
        "name": "v3", "layer": 3, "threshold": 0.1}}}, "steering.apply_to", "generated"),
    ({"steering": {"vectors": [{"name": "v1"}], "else_vectors": [{"name": "v2"}]}},
     "steering.else_vectors", "only with a 'condition'"),
    ({"vllm_xargs": {"steering": json.dumps({"vectors": [{"name": "v1"}], "condition": {
        "name": "v3", "layer": 3, "threshold": 0.1}, "else_vectors": [{"name": "wide"}]})}},
     "steering.else_vectors[0]", "hidden size"),
    ({"steering": {"vectors": [{"name": "v1"}]}, "vllm_xargs": {"steer": "v2"}}, "steering",
     "both"),
]


# -- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    reg = write_test_vectors(root)
    with reg.open("a") as f:
        f.write(f"max_upload_bytes: {UPLOAD_LIMIT}\n")
    # started in a directory holding a decoy vllm_steer (which fails loudly when imported):
    # the server runs the code PYTHONPATH / the install selects, never the cwd's
    DECOY["marker"] = make_decoy(root / "cwd")
    srv = Server(default_model_dir, reg, root / "server.log", API_KEY, cwd=root / "cwd",
                 extra_env={envvars.STORE_GRACE_S: str(STORE_GRACE_S),
                            "VLLMSTEER_MAX_TRAIN_PROMPTS": str(TRAIN_PROMPT_LIMIT)})
    FIGURES["startup_s"] = round(srv.start(), 1)
    yield srv
    srv.stop()
    out = os.environ.get("VLLMSTEER_SERVER_RESULTS")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=2))
    print("\nserver test figures:", json.dumps(FIGURES))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def model(server: Server) -> str:
    return server.model_dir


def vec_dir(server: Server) -> Path:
    return server.registry.parent / "vectors"


def openai_client(server: Server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                       timeout=REQUEST_TIMEOUT)


def steering_body(spec: Any, form: str) -> dict[str, Any]:
    """The extra body carrying ``spec``: top-level object, vllm_xargs JSON, or shorthand."""
    if spec is None:
        return {}
    if form == "body":
        return {"steering": spec}
    if form == "xargs":
        return {"vllm_xargs": {"steering": json.dumps(spec)}}
    assert form == "flat" and len(spec["vectors"]) == 1
    v = spec["vectors"][0]
    flat = {"steer": v["name"]}
    if "scale" in v:
        flat["steer_scale"] = v["scale"]
    if "apply_to" in spec:
        flat["steer_apply_to"] = spec["apply_to"]
    return {"vllm_xargs": flat}


async def complete(client, srv: Server, kind: str, prompt: str, extra: dict[str, Any],
                   stream: bool, max_tokens: int = MAX_TOKENS) -> str:
    """One request through the official client; returns the generated text."""
    kw = dict(model=model(srv), max_tokens=max_tokens, temperature=0.0, stream=stream,
              extra_body=extra)
    if kind == "chat":
        r = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **kw)
        if not stream:
            return r.choices[0].message.content or ""
        return "".join([c.choices[0].delta.content or "" async for c in r if c.choices])
    r = await client.completions.create(prompt=prompt, **kw)
    if not stream:
        return r.choices[0].text
    return "".join([c.choices[0].text async for c in r if c.choices])


def run(coro, timeout: float = 300.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def upload(http: httpx.Client, name: str, data: bytes, **params: Any) -> httpx.Response:
    return http.post("/v1/steering/vectors", params={"name": name, **params}, content=data,
                     headers={"Content-Type": "application/octet-stream"})


def slot_stats(http: httpx.Client) -> dict[str, int]:
    r = http.get("/v1/steering/stats")
    assert r.status_code == 200, r.text
    (w,) = r.json()["workers"]
    return w


def wait_idle(http: httpx.Client, timeout: float = 60.0) -> dict[str, int]:
    """Slot stats once no steered request is live (bounded wait)."""
    t0 = time.monotonic()
    while True:
        st = slot_stats(http)
        if st["live_requests"] == 0 and st["live_digests"] == 0:
            return st
        assert time.monotonic() - t0 < timeout, f"steering slots still in use: {st}"
        time.sleep(0.5)


def references(srv: Server, combos: list[tuple[str, str, str]]) -> dict[tuple, str]:
    """Each (kind, prompt, spec name) run alone, one request at a time."""

    async def go():
        client = openai_client(srv)
        out = {}
        for kind, prompt, spec in combos:
            out[(kind, prompt, spec)] = await complete(
                client, srv, kind, prompt, steering_body(SPECS[spec], "body"), False)
        await client.close()
        return out

    return run(go())


# -- auth, listing, body forms -----------------------------------------------------------
def test_routes_obey_api_key(server, http):
    bare = httpx.Client(base_url=server.url, timeout=30)
    wrong = {"Authorization": "Bearer not-the-key"}
    checks = [("GET", "/v1/steering/vectors"), ("GET", "/v1/steering/vectors/v1"),
              ("GET", "/v1/steering/stats"), ("POST", "/v1/steering/vectors?name=x"),
              ("DELETE", "/v1/steering/vectors/v1"), ("POST", "/v1/steering/probe")]
    for method, path in checks:
        for headers in ({}, wrong, {"Authorization": API_KEY}):
            r = bare.request(method, path, headers=headers, content=b"x")
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["param"] == "authorization", r.text
    assert bare.get("/health").status_code == 200
    assert http.get("/v1/steering/vectors/v1").status_code == 200  # still there
    bare.close()


def test_list_vectors_reports_layers_size_and_metadata(http):
    r = http.get("/v1/steering/vectors")
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == {"num_layers": 30, "hidden_size": 576}
    by_name = {v["name"]: v for v in body["data"]}
    assert {"v1", "v2", "v3", "wide"} <= set(by_name)
    assert by_name["v2"]["layers"] == list(range(5, 20)) and by_name["v2"]["default_scale"] == 2.0
    assert by_name["v1"]["hidden_size"] == 576 and by_name["wide"]["hidden_size"] == 584
    assert by_name["v1"]["format"] == "safetensors"
    assert "created_by" in by_name["v1"]["metadata"]
    assert http.get("/v1/steering/vectors/nope").json()["error"]["param"] == "name"


def test_body_and_vllm_xargs_give_identical_results(server):
    spec = {"vectors": [{"name": "v1", "scale": 1.5}], "apply_to": "all"}

    async def go():
        client = openai_client(server)
        out = {}
        for kind, prompt in (PROMPTS[0], PROMPTS[2]):
            for stream in (False, True):
                plain = await complete(client, server, kind, prompt, {}, stream)
                got = {form: await complete(client, server, kind, prompt,
                                            steering_body(spec, form), stream)
                       for form in ("body", "xargs", "flat")}
                out[(kind, stream)] = plain, got
        await client.close()
        return out

    res = run(go())
    for key, (plain, got) in res.items():
        assert got["body"] == got["xargs"] == got["flat"], (key, got)
        assert got["body"] != plain, key
    # streaming and non-streaming agree too
    for kind in ("cmpl", "chat"):
        assert res[(kind, False)] == res[(kind, True)], kind


@pytest.mark.parametrize("endpoint", ["chat", "cmpl"])
def test_bad_steering_is_a_400_naming_the_field(server, endpoint):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            reqs = []
            for extra, _, _ in BAD:
                for stream in (False, True):
                    body = {"model": model(server), "max_tokens": 4, "stream": stream, **extra}
                    if endpoint == "chat":
                        body["messages"] = [{"role": "user", "content": "hi"}]
                        reqs.append(c.post("/v1/chat/completions", json=body))
                    else:
                        body["prompt"] = "hi"
                        reqs.append(c.post("/v1/completions", json=body))
            return await asyncio.gather(*reqs)

    responses = run(go())
    for i, r in enumerate(responses):
        _, field, message = BAD[i // 2]
        assert r.status_code == 400, (BAD[i // 2], r.status_code, r.text)
        err = r.json()["error"]
        assert err["param"] == field and message in err["message"], err
        assert err["type"] == "BadRequestError" and err["code"] == 400


def test_beam_search_with_steering_is_refused(server, http):
    r = http.post("/v1/completions", json={
        "model": model(server), "prompt": "hi", "max_tokens": 4, "use_beam_search": True,
        "n": 2, "steering": {"vectors": [{"name": "v1"}]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search", r.text


# -- vector registration -------------------------------------------------------------------
def test_upload_register_use_and_delete(server, http, tmp_path):
    vdir = vec_dir(server)
    v2 = SteeringVector.load(str(vdir / "v2.safetensors"))
    (v2 * 1.0).save(str(tmp_path / "v2.gguf"))
    spec_by_path = {"vectors": [{"path": "v2.safetensors", "scale": 1.25}]}

    async def text(spec):
        # the poem prompt: v2 at 1.25 leaves "The capital of France is" unchanged
        client = openai_client(server)
        out = await complete(client, server, "cmpl", PROMPTS[1][1],
                             {"steering": spec} if spec else {}, False)
        await client.close()
        return out

    expected = run(text(spec_by_path))
    assert expected != run(text(None)), "the vector must change the output"
    # raw GGUF body, query parameters
    r = upload(http, "gg", (tmp_path / "v2.gguf").read_bytes(), scale=1.25)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["format"] == "gguf" and info["layers"] == list(range(5, 20))
    assert info["persisted"] is True and info["default_scale"] == 1.25
    assert run(text({"vectors": [{"name": "gg"}]})) == expected
    # JSON body with base64 data, and JSON body naming a file in an allowed dir
    data = base64.b64encode((vdir / "v2.safetensors").read_bytes()).decode()
    r = http.post("/v1/steering/vectors", json={"name": "b64", "data": data, "scale": 1.25})
    assert r.status_code == 201, r.text
    r = http.post("/v1/steering/vectors", json={"name": "bypath", "path": "v2.safetensors",
                                                 "scale": 1.25, "layers": list(range(5, 20))})
    assert r.status_code == 201, r.text
    for name in ("b64", "bypath"):
        assert run(text({"vectors": [{"name": name}]})) == expected
    names = {v["name"] for v in http.get("/v1/steering/vectors").json()["data"]}
    assert {"gg", "b64", "bypath"} <= names
    # conflicts and replacement
    assert upload(http, "gg", (vdir / "v1.safetensors").read_bytes()).status_code == 409
    r = upload(http, "gg", (vdir / "v1.safetensors").read_bytes(), replace="true")
    assert r.status_code == 201 and r.json()["layers"] == list(range(30))
    for name in ("gg", "b64", "bypath"):
        r = http.delete(f"/v1/steering/vectors/{name}")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert http.delete(f"/v1/steering/vectors/{name}").status_code == 404
    r = http.post("/v1/completions", json={"model": model(server), "prompt": "x", "max_tokens": 2,
                                           "steering": {"vectors": [{"name": "gg"}]}})
    assert r.status_code == 400 and "unknown vector" in r.json()["error"]["message"]
    # the uploads dir holds only the overlay and the replaced and deleted uploads, which
    # are retired (deleted after a grace period: another API process may be reading one)
    up = server.registry.parent / "uploads"
    overlay = yaml.safe_load((up / "registry.overlay.yaml").read_text())
    assert overlay["vectors"] == {} and len(overlay["retired"]) == 3   # gg twice, b64
    assert sorted(p.name for p in up.iterdir() if not p.name.startswith(".")) == \
        sorted(["registry.overlay.yaml", *overlay["retired"]])


def test_upload_with_an_op_makes_it_the_default(server, http):
    """An upload's op/strength/value are its entry's defaults, as in the registry file."""
    vdir = vec_dir(server)

    async def text(spec):
        client = openai_client(server)
        out = await complete(client, server, "cmpl", PROMPTS[0][1],
                             {"steering": spec} if spec else {}, False)
        await client.close()
        return out

    unsteered = run(text(None))
    explicit = {"path": "v1.safetensors", "op": "ablate", "strength": 0.5}
    expected = run(text({"vectors": [explicit]}))
    assert expected != unsteered
    assert expected != run(text({"vectors": [{"path": "v1.safetensors", "scale": 0.0}]}))
    r = upload(http, "abl", (vdir / "v1.safetensors").read_bytes(), op="ablate", strength=0.5)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["default_op"] == "ablate" and info["default_strength"] == 0.5
    assert run(text({"vectors": [{"name": "abl"}]})) == expected
    r = http.post("/v1/steering/vectors", json={"name": "clp", "path": "v1.safetensors",
                                                 "op": "clamp", "value": 3.0})
    assert r.status_code == 201 and r.json()["default_value"] == 3.0, r.text
    clamped = run(text({"vectors": [{"path": "v1.safetensors", "op": "clamp", "value": 3.0}]}))
    assert clamped != unsteered and clamped != expected
    assert run(text({"vectors": [{"name": "clp"}]})) == clamped
    for name in ("abl", "clp"):
        assert http.delete(f"/v1/steering/vectors/{name}").status_code == 200


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


@pytest.mark.parametrize("case, status, param, fragment", [
    ("wide", 400, "body", "hidden size"),
    ("nan", 400, "body", "NaN"),
    ("int", 400, "body", "expected float"),
    ("layer30", 400, "body", "out of range"),
    ("2d", 400, "body", "expected [hidden]"),
    ("badname", 400, "body", "unexpected tensor"),
    ("truncated", 400, "body", "not a valid vector file"),
    ("pickle", 400, "body", "unknown format"),
    ("empty", 400, "body", "empty body"),
    ("oversize", 413, "body", "upload limit"),
    ("oversize_chunked", 413, "body", "upload limit"),
    ("badlayers", 400, "layers", "no direction"),
    ("badscale", 400, "scale", "finite"),
    ("badquery", 400, "colour", "unknown query parameter"),
    ("badname_param", 400, "name", "letters"),
    ("badop", 400, "op", "not one of"),
    ("scale_with_ablate", 400, "scale", "applies to op 'add'"),
    ("value_with_add", 400, "value", "applies to op 'clamp'"),
    ("badstrength", 400, "strength", "[0, 1]"),
])
def test_bad_uploads_are_refused(server, http, tmp_path, case, status, param, fragment):
    vdir = vec_dir(server)
    good = (vdir / "v2.safetensors").read_bytes()
    z = torch.zeros(576)
    params: dict[str, Any] = {}
    name = f"bad_{case}"
    data: Any = good
    if case == "wide":
        data = (vdir / "wide.safetensors").read_bytes()
    elif case == "nan":
        data = _safetensors_bytes({"direction.3": torch.full((576,), float("nan"))})
    elif case == "int":
        data = _safetensors_bytes({"direction.3": torch.zeros(576, dtype=torch.int32)})
    elif case == "layer30":
        data = _safetensors_bytes({"direction.30": z})
    elif case == "2d":
        data = _safetensors_bytes({"direction.3": torch.zeros(2, 576)})
    elif case == "badname":
        data = _safetensors_bytes({"weights": z})
    elif case == "truncated":
        data = good[: len(good) // 2]
    elif case == "pickle":
        torch.save({"direction.3": z}, tmp_path / "v.pt")
        data = (tmp_path / "v.pt").read_bytes()
    elif case == "empty":
        data = b""
    elif case == "oversize":
        data = b"\0" * (UPLOAD_LIMIT + 1)
    elif case == "oversize_chunked":
        data = iter([b"\0" * 65536] * (UPLOAD_LIMIT // 65536 + 2))  # no Content-Length
    elif case == "badlayers":
        params["layers"] = "1,2"  # v2 has layers 5..19
    elif case == "badscale":
        params["scale"] = "inf"
    elif case == "badquery":
        params["colour"] = "red"
    elif case == "badname_param":
        name = "a,b"
    elif case == "badop":
        params["op"] = "multiply"
    elif case == "scale_with_ablate":
        params.update(op="ablate", scale="2")
    elif case == "value_with_add":
        params["value"] = "1.5"
    elif case == "badstrength":
        params.update(op="ablate", strength="1.5")
    r = upload(http, name, data, **params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert name not in {v["name"] for v in http.get("/v1/steering/vectors").json()["data"]}


def test_vector_paths_stay_inside_allowed_dirs(server, http, tmp_path):
    vdir = vec_dir(server)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((vdir / "v1.safetensors").read_bytes())
    link = vdir / "escape.safetensors"
    link.symlink_to(outside)
    try:
        for path in ("../registry.yaml", str(outside), "escape.safetensors", "/etc/passwd",
                     "v1.safetensors/../../registry.yaml", "a\x00b", "~root/x"):
            r = http.post("/v1/steering/vectors", json={"name": "esc", "path": path})
            assert r.status_code == 400 and r.json()["error"]["param"] == "path", (path, r.text)
            r = http.post("/v1/completions", json={
                "model": model(server), "prompt": "x", "max_tokens": 2,
                "steering": {"vectors": [{"path": path}]}})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["param"] == "steering.vectors[0].path"
    finally:
        link.unlink()


# -- nothing lenient; every answer of the plugin's routes in OpenAI's error shape ------------
def openai_error(r: httpx.Response, status: int, param: str | None) -> str:
    """Checks ``{"error": {"message", "type", "param", "code"}}`` with ``status`` and
    ``param``; returns the message."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], dict), body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err["message"]


def test_the_server_runs_the_selected_code_not_the_working_directorys(server, http):
    assert http.get("/v1/steering/vectors").status_code == 200  # the plugin is there
    assert not DECOY["marker"].exists(), "a process imported the decoy vllm_steer"


@pytest.mark.parametrize("field, value", [
    ("replace", "yes"), ("replace", "true"), ("replace", 1), ("replace", [True]),
    ("layers", "10"), ("layers", "5,6"), ("layers", "[5, 6]"), ("scale", "2"),
    ("strength", "0.5"), ("value", "1.5")])
def test_json_uploads_take_json_types_only(server, http, field, value):
    body: dict[str, Any] = {"name": "typed", "data": base64.b64encode(
        (vec_dir(server) / "v2.safetensors").read_bytes()).decode()}
    body[field] = value
    if field == "strength":
        body["op"] = "ablate"
    elif field == "value":
        body["op"] = "clamp"
    msg = openai_error(http.post("/v1/steering/vectors", json=body), 400, field)
    assert "got" in msg
    assert "typed" not in {v["name"] for v in http.get("/v1/steering/vectors").json()["data"]}


def test_query_uploads_take_the_documented_text_spellings(server, http):
    data = (vec_dir(server) / "v2.safetensors").read_bytes()
    for bad in ("yes", "no", "on", "2", ""):
        openai_error(upload(http, "spelled", data, replace=bad), 400, "replace")
    openai_error(upload(http, "spelled", data, layers="[5, 6]"), 400, "layers")
    r = http.post("/v1/steering/vectors?name=spelled&replace=false&replace=true", content=data,
                  headers={"Content-Type": "application/octet-stream"})
    assert "given more than once" in openai_error(r, 400, "replace")
    r = upload(http, "spelled", data, layers="10", scale="0.5", replace="FALSE")
    assert r.status_code == 201, r.text
    assert r.json()["default_layers"] == [10] and r.json()["default_scale"] == 0.5
    assert upload(http, "spelled", data, replace="1").status_code == 201
    assert http.delete("/v1/steering/vectors/spelled").status_code == 200


@pytest.mark.parametrize("steering, param", [
    ({"vectors": [{"name": "v1"}], "normalize": "true"}, "steering.normalize"),
    ({"vectors": [{"name": "v1"}], "normalize": 1}, "steering.normalize"),
    ({"vectors": [{"name": "v1", "layers": "10"}]}, "steering.vectors[0].layers"),
    ({"vectors": [{"name": "v1", "scale": "1.5"}]}, "steering.vectors[0].scale"),
])
def test_the_steering_object_takes_json_types_only(server, http, steering, param):
    base = {"model": model(server), "prompt": "Hi", "max_tokens": 2}
    for extra in ({"steering": steering}, {"vllm_xargs": {"steering": json.dumps(steering)}}):
        r = http.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_flat_shorthand_takes_text_spellings(server, http):
    """``vllm_xargs`` values are text or numbers (vLLM turns a JSON true into 1)."""
    base = {"model": model(server), "prompt": PROMPTS[0][1], "max_tokens": 8,
            "temperature": 0}
    typed = http.post("/v1/completions", json={**base, "steering": {
        "vectors": [{"name": "v2", "layers": [10, 11], "scale": 1.5}], "normalize": True}})
    assert typed.status_code == 200, typed.text
    for flat in ({"steer": "v2", "steer_layers": "10,11", "steer_scale": "1.5",
                  "steer_normalize": "true"},
                 {"steer": "v2", "steer_layers": [10, 11], "steer_scale": 1.5,
                  "steer_normalize": True}):
        r = http.post("/v1/completions", json={**base, "vllm_xargs": flat})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == typed.json()["choices"][0]["text"]
    r = http.post("/v1/completions", json={**base, "vllm_xargs": {
        "steer": "v2", "steer_normalize": "yes"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steer_normalize"


def test_errors_before_the_routes_run_are_in_openai_shape(server, http):
    """Answers that Starlette's router (unknown path, wrong method) and vLLM's API-key
    middleware give before any route of the plugin runs, and bodies the routes cannot
    parse: all in OpenAI's error shape, naming what was wrong."""
    bare = httpx.Client(base_url=server.url, timeout=30)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for path in ("/v1/steering/vectors", "/v1/steering/nope", "/v1/steering"):
                openai_error(bare.get(path, headers=headers), 401, "authorization")
    finally:
        bare.close()
    for path in ("/v1/steering/nope", "/v1/steering", "/v1/steering/", "/v1/steering/vectors/",
                 "/v1/steering/vectors/a/b", "/v1/steering/stats/x"):
        assert path in openai_error(http.get(path), 404, "path")
    for method, path, allowed in (("PUT", "/v1/steering/vectors", "GET, POST"),
                                  ("PATCH", "/v1/steering/vectors/v1", "DELETE, GET"),
                                  ("POST", "/v1/steering/stats", "GET"),
                                  ("GET", "/v1/steering/probe", "POST"),
                                  ("DELETE", "/v1/steering/vectors", "GET, POST")):
        r = http.request(method, path)
        assert allowed in openai_error(r, 405, "method")
        assert r.headers["allow"] == allowed
    bodies = {"unparseable": b'{"name": "x", ', "deep": b"[" * 100_000,
              "deep_object": b'{"a": ' * 5000 + b"1" + b"}" * 5000,
              "invalid_utf8": b'{"name": "\xff\xfe"}', "not_an_object": b"[1, 2]",
              "empty": b""}
    for what, raw in bodies.items():
        for path in ("/v1/steering/vectors", "/v1/steering/probe"):
            r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (what, path, r.text)
            openai_error(r, 400, "body")
    assert http.get("/health").status_code == 200


def test_no_unpickling_in_the_package():
    root = Path(__file__).resolve().parent.parent / "vllm_steer"
    pattern = re.compile(r"\b(pickle\.loads?|torch\.load|joblib\.load|dill\.|"
                         r"allow_pickle\s*=\s*True|cPickle)\b")
    hits = [f"{p}:{i}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# -- load ------------------------------------------------------------------------------
def test_concurrent_load_matches_requests_run_alone(server, http):
    r = upload(http, "load_up", (vec_dir(server) / "v3.safetensors").read_bytes())
    assert r.status_code == 201, r.text
    combos = [(kind, prompt, spec) for kind, prompt in PROMPTS for spec in SPECS]
    refs = references(server, combos)
    assert len({refs[c] for c in combos}) >= len(combos) // 2, "vectors should change outputs"

    n_good, n_bad = 224, 32
    jobs: list[tuple[str, Any]] = []
    for i in range(n_good):
        combo = combos[i % len(combos)]
        stream = (i // len(combos)) % 2 == 1
        form = "xargs" if (i // (2 * len(combos))) % 2 else "body"
        jobs.append(("good", (combo, stream, form)))
    for i in range(n_bad):
        jobs.append(("bad", (BAD[i % len(BAD)], PROMPTS[i % len(PROMPTS)], i % 2 == 0)))
    random.Random(0).shuffle(jobs)

    async def one(client, job):
        import openai

        kind_of, payload = job
        if kind_of == "good":
            (kind, prompt, spec), stream, form = payload
            return await complete(client, server, kind, prompt,
                                  steering_body(SPECS[spec], form), stream)
        (extra, _, _), (kind, prompt), stream = payload
        try:
            await complete(client, server, kind, prompt, extra, stream)
        except openai.BadRequestError as e:
            return e
        return "accepted"

    async def go():
        client = openai_client(server)
        t0 = time.monotonic()
        out = await asyncio.gather(*(one(client, j) for j in jobs), return_exceptions=True)
        wall = time.monotonic() - t0
        await client.close()
        return out, wall

    results, wall = run(go(), timeout=600)
    mismatches, errors = [], []
    for job, res in zip(jobs, results, strict=True):
        if job[0] == "good":
            combo = job[1][0]
            if isinstance(res, BaseException):
                errors.append((job, repr(res)))
            elif res != refs[combo]:
                mismatches.append((job, res, refs[combo]))
        elif not (hasattr(res, "status_code") and res.status_code == 400):
            errors.append((job, repr(res)))
    FIGURES["load"] = {"requests": len(jobs), "good": n_good, "bad": n_bad,
                       "concurrency": len(jobs), "wall_s": round(wall, 1),
                       "errors": len(errors), "mismatches": len(mismatches),
                       "distinct_combos": len(combos),
                       "tokens_per_good_request": MAX_TOKENS}
    assert not errors, errors[:5]
    assert not mismatches, mismatches[:5]
    assert server.alive() and http.get("/health").status_code == 200
    wait_idle(http)


# -- bad input fuzz ----------------------------------------------------------------------
def _spec_fuzz_bodies(rng: random.Random, model_name: str
                      ) -> list[tuple[dict[str, Any] | bytes, bool]]:
    """(body or raw bytes for /v1/completions, must be refused); a few mutants may be valid."""
    out: list[tuple[Any, bool]] = []
    good_vec = {"name": "v1"}
    wrong = [None, 0, -1, 1.5, True, "", "x", "\ud800", "\x00", [], [None], {}, {"a": 1},
             10 ** 30, -(10 ** 30), 1e308, "v1" * 5000]
    for v in wrong:
        if v is not None:
            out.append(({"steering": v}, True))
        out.append(({"steering": {"vectors": v}}, True))
        out.append(({"steering": {"vectors": [v]}}, True))
        if v is not None and not (isinstance(v, str) and v == "v1"):
            out.append(({"steering": {"vectors": [{"name": v}]}}, True))
            out.append(({"steering": {"vectors": [{"path": v}]}}, True))
        if not isinstance(v, int | float) or isinstance(v, bool) or abs(v) > 1000:
            if v is not None:
                out.append(({"steering": {"vectors": [{**good_vec, "scale": v}]}}, True))
        if v is not None:
            out.append(({"steering": {"vectors": [{**good_vec, "layers": v}]}}, True))
            if not (type(v) is int and 0 <= v < 30):  # a valid layer of v1
                out.append(({"steering": {"vectors": [{**good_vec, "layers": [v]}]}}, True))
            out.append(({"steering": {"vectors": [good_vec], "apply_to": v}}, True))
            out.append(({"steering": {"vectors": [good_vec], "think_start": v}},
                        not (isinstance(v, str) and v and v not in ("\ud800",))))
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10 ** 18):
                out.append(({"steering": {"vectors": [good_vec], "end_position": v}}, True))
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10 ** 18):
                out.append(({"steering": {"vectors": [good_vec], "start_position": v}}, True))
        out.append(({"vllm_xargs": {"steer": v if v is not None else "", "steer_scale": "q"}},
                    True))
    # the think_start cases above with a plain string are valid specs: drop those
    out = [(b, bad) for b, bad in out if bad]
    out += [
        ({"steering": {"vectors": [good_vec] * 17}}, True),
        ({"steering": {"vectors": [good_vec], "start_position": 5, "end_position": 5}}, True),
        ({"steering": {"vectors": [{**good_vec, "layers": list(range(1000))}]}}, True),
        ({"steering": {"vectors": [{**good_vec, "layers": [1, 1]}]}}, True),
        ({"steering": {"vectors": [{"name": "v1", "path": "v1.safetensors"}]}}, True),
        ({"steering": {"vectors": [{"name": "v1", "weight": 1}]}}, True),
        ({"steering": {"vectors": [{"name": "v1", "scale": 1000}, {"name": "v1",
                                                                   "scale": 1000}] * 8}}, False),
        ({"steering": json.dumps({"vectors": [good_vec]}) * 3}, True),
        ({"steering": "x" * 70000}, True),
        ({"vllm_xargs": {"steering": "[" * 5000 + "]" * 5000}}, True),
        ({"vllm_xargs": {"steering": "{" * 100}}, True),
        ({"vllm_xargs": {"steer": "v1,,nope"}}, True),
        ({"vllm_xargs": {"steer": "v1", "steer_layers": "[1,"}}, True),
        ({"vllm_xargs": {"steer": "v1", "steer_layers": [99]}}, True),
        ({"vllm_xargs": {"steer": "v1", "steer_apply_to": "sideways"}}, True),
        ({"vllm_xargs": {"steer_scale": 1.0}}, True),
        ({"vllm_xargs": {"steer": "v1", "steer_colour": 1}}, True),
        ({"vllm_xargs": {"steering": "{}", "steer": "v1"}}, True),
        ({"steer_scale": 2.0}, True),
        ({"steering": {"vectors": [good_vec]}, "vllm_xargs": {"steering": "{}"}}, True),
    ]
    # deep nesting straight in the JSON body (not parseable as a spec at any depth)
    head = json.dumps({"model": model_name, "prompt": "x", "max_tokens": 1})[:-1]
    head += ', "steering": '
    for depth in (50, 1000, 100000):
        out.append(((head + "[" * depth + "]" * depth + "}").encode(), True))
        out.append(((head + '{"a":' * depth + "1" + "}" * depth + "}").encode(), True))
    # non-UTF-8 and truncated JSON bodies
    out.append((head.encode() + b'{"vectors": [{"name": "\xff\xfe"}]}}', True))
    out.append((head.encode() + b'{"vectors": [{"name": "v1"', True))
    out.append((head.encode() + b"NaN}", True))
    out.append((head.encode() + b'{"vectors": [{"name": "v1", "scale": NaN}]}}', True))
    out.append((head.encode() + b'{"vectors": [{"name": "v1", "scale": Infinity}]}}', True))
    out.append((head.encode() + b'{"vectors": [{"name": "v1", "scale": 1e999}]}}', True))
    # random character mutations of a valid spec string (may stay valid: not required 4xx)
    valid = json.dumps({"vectors": [{"name": "v2", "scale": 0.5, "layers": [5, 6]}],
                        "apply_to": "generated", "start_position": 1})
    alphabet = '{}[]",:0123456789.-eE ntrufals\\x'
    for _ in range(120):
        s = list(valid)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.random(), rng.randrange(len(s))
            if op < 0.4:
                s[pos] = rng.choice(alphabet)
            elif op < 0.7:
                del s[pos]
            else:
                s.insert(pos, rng.choice(alphabet))
        out.append(({"vllm_xargs": {"steering": "".join(s)}}, False))
    return out


def _upload_fuzz_cases(vdir: Path, tmp: Path, rng: random.Random
                       ) -> list[tuple[dict[str, Any], bytes, bool]]:
    """(query params or {"json": body}, bytes, must be refused)."""
    st = (vdir / "v2.safetensors").read_bytes()
    SteeringVector.load(str(vdir / "v2.safetensors")).save(str(tmp / "v2.gguf"))
    gg = (tmp / "v2.gguf").read_bytes()
    cases: list[tuple[dict[str, Any], bytes, bool]] = []
    for blob in (st, gg):
        step = max(1, len(blob) // 40)
        for cut in sorted({*range(0, len(blob), step), *range(1, 24), len(blob) - 1}):
            cases.append(({}, blob[:cut], True))
        for _ in range(30):  # byte flips: may still be a valid vector
            b = bytearray(blob)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append(({}, bytes(b), False))
    for n in (1, 7, 8, 9, 100, 4096, 100000):
        cases.append(({}, rng.randbytes(n), True))
        cases.append(({}, b"GGUF" + rng.randbytes(n), True))
        cases.append(({}, struct.pack("<Q", n) + b"{" + rng.randbytes(n), True))
    for hdr in (b'{"direction.1": {"dtype": "F32", "shape": [576], "data_offsets": [0, 99999999]}}',
                b'{"direction.1": {"dtype": "F32", "shape": [99999999999], '
                b'"data_offsets": [0, 2304]}}',
                b'[1, 2, 3]', b'{"__metadata__": "x"}', b'{"a": ' * 200 + b"1" + b"}" * 200,
                b"\xff\xfe{}"):
        cases.append(({}, struct.pack("<Q", len(hdr)) + hdr + b"\0" * 2304, True))
    cases.append(({}, struct.pack("<IQQ", 3, 2 ** 60, 0), True))
    cases.append(({}, b"GGUF" + struct.pack("<IQQ", 3, 2 ** 60, 2 ** 60), True))
    cases.append(({}, b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2 ** 62), True))
    for t in (torch.full((576,), float("inf")), torch.zeros(575), torch.zeros(576,
                                                                             dtype=torch.int64),
              torch.zeros(1, 576), torch.zeros(0)):
        cases.append(({}, _safetensors_bytes({"direction.2": t}), True))
    cases.append(({}, _safetensors_bytes({"direction.999999999999": torch.zeros(576)}), True))
    cases.append(({}, _safetensors_bytes({f"direction.{i}": torch.zeros(576)
                                          for i in range(2000)}), True))
    # bad parameters with a good file
    for params in ({"scale": "nan"}, {"scale": "1e999"}, {"scale": "[]"}, {"layers": "30"},
                   {"layers": "-1"}, {"layers": "[1,"}, {"layers": "1,1"}, {"layers": "x" * 9999},
                   {"replace": "maybe"}, {"colour": "red"}, {"name": ""}, {"name": "../x"},
                   {"name": "x" * 200}, {"name": "a b"}, {"name": "\u00e9"}):
        cases.append((params, st, True))
    # JSON bodies
    b64 = base64.b64encode(st).decode()
    for body in ({"name": "j", "data": "!!!"}, {"name": "j", "data": 5},
                 {"name": "j", "data": b64, "path": "v1.safetensors"}, {"name": "j"},
                 {"name": "j", "data": base64.b64encode(b"junk").decode()},
                 {"name": 5, "data": b64}, {"name": "j", "data": b64, "scale": True},
                 {"name": "j", "data": b64, "layers": [3.5]}, {"name": "j", "data": b64,
                                                             "extra": 1},
                 {"name": "j", "path": ""}, {"name": "j", "path": "../registry.yaml"},
                 {"name": "j", "path": 7}, {"name": "j", "path": "x" * 5000},
                 [1, 2], "text", None):
        cases.append(({"json": body}, b"", True))
    for raw in (b"\xff\xfe\x00\x01", b"[" * 100000, b'{"name": "j", "data": "' + b"A" * 10,
                b'{"name": "j", "data": NaN}'):
        cases.append(({"json_raw": True}, raw, True))
    cases.append(({"json": {"name": "big",
                            "data": base64.b64encode(b"\0" * (UPLOAD_LIMIT + 10)).decode()}},
                  b"", True))
    cases.append(({}, b"\0" * (UPLOAD_LIMIT + 1), True))
    return cases


def _is_openai_error(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}


def test_fuzz_never_crashes_or_hangs(server, http, tmp_path):
    rng = random.Random(1234)
    specs = _spec_fuzz_bodies(rng, model(server))
    uploads = _upload_fuzz_cases(vec_dir(server), tmp_path, rng)
    before = http.post("/v1/completions", json={
        "model": model(server), "prompt": PROMPTS[0][1], "max_tokens": MAX_TOKENS,
        "temperature": 0, "steering": SPECS["mix"]}).json()["choices"][0]["text"]

    async def go():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            async def spec_case(i, body):
                async with sem:
                    if isinstance(body, bytes):
                        return await c.post("/v1/completions", content=body,
                                            headers={"Content-Type": "application/json"})
                    body = {"model": model(server), "prompt": "Hello", "max_tokens": 2,
                            "stream": i % 3 == 0, **body}
                    # json.dumps escapes lone surrogates (httpx's json= cannot encode them)
                    return await c.post("/v1/completions", content=json.dumps(body).encode(),
                                        headers={"Content-Type": "application/json"})

            async def upload_case(i, params, data):
                async with sem:
                    if "json" in params:
                        return await c.post("/v1/steering/vectors",
                                            content=json.dumps(params["json"]).encode(),
                                            headers={"Content-Type": "application/json"})
                    if "json_raw" in params:
                        return await c.post("/v1/steering/vectors", content=data,
                                            headers={"Content-Type": "application/json"})
                    q = {"name": f"fz{i}", **params}
                    return await c.post("/v1/steering/vectors", params=q, content=data,
                                        headers={"Content-Type": "application/octet-stream"})

            tasks = [spec_case(i, b) for i, (b, _) in enumerate(specs)]
            tasks += [upload_case(i, p, d) for i, (p, d, _) in enumerate(uploads)]
            return await asyncio.gather(*tasks, return_exceptions=True)

    t0 = time.monotonic()
    results = run(go(), timeout=400)
    wall = time.monotonic() - t0
    expect = [bad for _, bad in specs] + [bad for _, _, bad in uploads]
    crashes, wrong, unshaped, accepted = [], [], [], 0
    cases = [("spec", s[0]) for s in specs] + [("upload", u[:2]) for u in uploads]
    for case, must_refuse, r in zip(cases, expect, results, strict=True):
        if isinstance(r, BaseException) or r.status_code >= 500:
            crashes.append((repr(case)[:200], repr(r) if isinstance(r, BaseException)
                            else r.text[:200]))
        elif must_refuse and not 400 <= r.status_code < 500:
            wrong.append((repr(case)[:200], r.status_code, r.text[:200]))
        elif r.status_code < 300:
            accepted += 1
        if not isinstance(r, BaseException) and r.status_code >= 400:
            shaped = _is_openai_error(r)
            if case[0] == "upload":  # the plugin's own route: always OpenAI's shape
                assert shaped, (repr(case)[:200], r.status_code, r.text[:300])
            elif not shaped:         # vLLM's route: counted
                unshaped.append((repr(case)[:120], r.status_code, r.text[:200]))
    # vectors that byte flips left valid were registered: remove them
    for v in http.get("/v1/steering/vectors").json()["data"]:
        if re.fullmatch(r"fz\d+", v["name"]):
            assert http.delete(f"/v1/steering/vectors/{v['name']}").status_code == 200
    FIGURES["fuzz"] = {"cases": len(cases), "spec_cases": len(specs),
                       "upload_cases": len(uploads), "accepted_valid_mutants": accepted,
                       "crashes_5xx_or_no_answer": len(crashes), "wrong_status": len(wrong),
                       "vllm_route_errors_not_in_openai_shape": unshaped[:5],
                       "wall_s": round(wall, 1)}
    assert not crashes, crashes[:5]
    assert not wrong, wrong[:5]
    assert server.alive() and http.get("/health").status_code == 200
    after = http.post("/v1/completions", json={
        "model": model(server), "prompt": PROMPTS[0][1], "max_tokens": MAX_TOKENS,
        "temperature": 0, "steering": SPECS["mix"]}).json()["choices"][0]["text"]
    assert after == before
    wait_idle(http)


# -- faults ------------------------------------------------------------------------------
def test_client_disconnects_free_their_slots(server, http):
    base = wait_idle(http)
    rounds, per_round = 5, 8

    async def go(k):
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            streaming, release = asyncio.Semaphore(0), asyncio.Event()

            async def disconnect(i):
                body = {"model": model(server), "prompt": PROMPTS[1][1], "max_tokens": 400,
                        "ignore_eos": True, "temperature": 0, "stream": True,
                        "steering": {"vectors": [{"name": "v3", "scale": 0.01 * (i + 1)}]}}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    chunks = 0
                    async for line in r.aiter_lines():
                        chunks += line.startswith("data: ")
                        if chunks == 2:
                            streaming.release()
                            await release.wait()
                            break  # leaving the block closes the connection mid-stream

            tasks = [asyncio.create_task(disconnect(k * per_round + i))
                     for i in range(per_round)]
            for _ in range(per_round):
                await streaming.acquire()
            (during,) = (await c.get("/v1/steering/stats")).json()["workers"]
            release.set()
            await asyncio.gather(*tasks)
            return during

    during, after = [], []
    for k in range(rounds):
        during.append(run(go(k), timeout=120))
        after.append(wait_idle(http))
    keys = ("live_requests", "live_digests", "resident", "free_slots")
    FIGURES["disconnects"] = {"count": rounds * per_round, "per_round": per_round,
                              "during": [{k: s[k] for k in keys} for s in during],
                              "after": [{k: s[k] for k in keys} for s in after]}
    for st in during:  # every stream held its own slot while open
        assert st["live_requests"] == per_round and st["live_digests"] == per_round, st
    for st in after:
        assert st["resident"] == 0 and st["free_slots"] == base["free_slots"], st


def test_delete_or_replace_during_requests_changes_nothing_for_them(server, http):
    vdir = vec_dir(server)
    spec = {"vectors": [{"name": "inuse"}]}
    body = {"model": model(server), "prompt": PROMPTS[1][1], "max_tokens": 48,
            "ignore_eos": True, "temperature": 0, "stream": True}
    ref_v1 = http.post("/v1/completions", json={
        **body, "stream": False, "steering": {"vectors": [{"path": "v1.safetensors"}]}}
    ).json()["choices"][0]["text"]
    ref_v2 = http.post("/v1/completions", json={
        **body, "stream": False, "steering": {"vectors": [{"path": "v2.safetensors"}]}}
    ).json()["choices"][0]["text"]
    assert ref_v1 != ref_v2

    def change(action: str) -> None:
        if action == "replace":
            r = upload(http, "inuse", (vdir / "v2.safetensors").read_bytes(), replace="true",
                       scale=1.0)
            assert r.status_code == 201, r.text
        else:
            assert http.delete("/v1/steering/vectors/inuse").status_code == 200

    for action in ("replace", "delete"):
        assert upload(http, "inuse", (vdir / "v1.safetensors").read_bytes(),
                      replace="true").status_code == 201

        async def go(action=action):
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT,
                                         headers={"Authorization": f"Bearer {API_KEY}"}) as c:
                started = asyncio.Event()

                async def stream(trigger: bool) -> tuple[str, int]:
                    """Streams; the trigger changes the registry after its first chunk."""
                    text, chunks_after = "", -1
                    async with c.stream("POST", "/v1/completions",
                                        json={**body, "steering": spec}) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            text += json.loads(line[6:])["choices"][0]["text"]
                            if chunks_after >= 0:
                                chunks_after += 1
                            elif trigger:
                                await started.wait()
                                await asyncio.to_thread(change, action)
                                chunks_after = 0
                            else:
                                started.set()
                                chunks_after = 0
                    return text, chunks_after

                return await asyncio.gather(stream(True), stream(False))

        (t1, after1), (t2, _) = run(go(), timeout=180)
        assert after1 > 10, "the change should happen while the stream is running"
        assert t1 == t2 == ref_v1, (action, t1, t2)
    # after the delete the name is gone; a re-registration is used by new requests only
    r = http.post("/v1/completions", json={**body, "stream": False, "steering": spec})
    assert r.status_code == 400
    assert upload(http, "inuse", (vdir / "v2.safetensors").read_bytes()).status_code == 201
    r = http.post("/v1/completions", json={**body, "stream": False, "steering": spec})
    assert r.json()["choices"][0]["text"] == ref_v2
    assert http.delete("/v1/steering/vectors/inuse").status_code == 200
    wait_idle(http)


def test_vllm_bench_serve_runs(server):
    """The documented benchmark command, tiny: 4 prompts, all steered."""
    cmd = [sys.executable, "-m", "vllm_steer.cli", "vllm", "bench", "serve", "--backend",
           "openai", "--base-url", server.url, "--model", model(server), "--dataset-name",
           "random", "--random-input-len", "32", "--random-output-len", "8", "--num-prompts",
           "4", "--temperature", "0",
           "--extra-body", json.dumps({"steering": {"vectors": [{"name": "v1", "scale": 0.5}]}})]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert re.search(r"Successful requests:\s+4\b", out), out[-3000:]
    assert re.search(r"Failed requests:\s+0\b", out), out[-3000:]


def test_probe_route_returns_trajectory_readings(server, http):
    body = {"prompt": "Is 17 a prime number? Answer Yes or No.", "open_thinking": "<think>\n",
            "every": 8, "max_tokens": 32, "ignore_eos": True,
            "steering": {"vectors": [{"name": "v1", "scale": 0.5}], "apply_to": "generated"}}
    r = http.post("/v1/steering/probe", json=body, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, r.text
    data = r.json()
    traj = data["trajectory"]
    assert data["choices"] == ["Yes", "No"] and len(traj["token_ids"]) == 32
    assert [x["token_index"] for x in traj["readings"]] == [0, 8, 16, 24, 32]
    for x in traj["readings"]:
        assert x["log_ratio"] is not None and 0 < x["mass"] <= 1
        assert abs(sum(x["probs"].values()) - 1) < 1e-6
        assert x["in_thinking"] is True  # never closed: each fork appends </think>
    # the one-shot reading of the same prompt equals the trajectory's first fork
    one_shot = {k: v for k, v in body.items() if k not in ("every", "max_tokens", "ignore_eos")}
    once = http.post("/v1/steering/probe", json={**one_shot, "trajectory": False},
                     timeout=REQUEST_TIMEOUT).json()["trajectory"]["readings"]
    assert len(once) == 1
    assert abs(once[0]["log_ratio"] - traj["readings"][0]["log_ratio"]) < 1e-4
    bad = http.post("/v1/steering/probe", json={**body, "every": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "every"
    unknown = http.post("/v1/steering/probe",
                        json={**body, "steering": {"vectors": [{"name": "nope"}]}})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "steering.vectors[0].name"
    for extra, param in (({"trajectory": "no"}, "trajectory"), ({"system": 5}, "system"),
                         ({"steering": "not json"}, "steering"),
                         ({"top_k_flagged": -1}, "top_k_flagged")):
        bad = http.post("/v1/steering/probe", json={**body, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text


MULTI_TOKEN_PROBES = [
    ({"messages": [{"role": "user", "content": "A train travels 120 km in 3 hours. What is its "
                    "average speed in km/h? Think step by step inside <think> </think>, then "
                    "answer 20, 30, 40 or 50."}],
      "choices": ["20", "30", "40", "50"]}, True),
    ({"prompt": "Which US city is nicknamed the Big Apple? Think step by step, then answer "
                "New York, Los Angeles, Chicago or Houston.",
      "choices": ["New York", "Los Angeles", "Chicago", "Houston"], "steer_suffix": False},
     False),
]


def test_probe_route_multi_token_choices_match_hf_reference(server, http):
    """20/30/40/50 (through ``messages``) and a named-entity question on the route, against
    full HF forwards over each fork's context + choice tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants
    from tests.steer_helpers import composed_dense

    tok = AutoTokenizer.from_pretrained(server.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()
    dense = composed_dense(server.registry, [("v1", 0.5)])
    for extra, steer_suffix in MULTI_TOKEN_PROBES:
        body = {**extra, "open_thinking": "<think>\n", "every": 16, "max_tokens": 32,
                "ignore_eos": True,
                "steering": {"vectors": [{"name": "v1", "scale": 0.5}], "apply_to": "generated"}}
        r = http.post("/v1/steering/probe", json=body, timeout=REQUEST_TIMEOUT)
        assert r.status_code == 200, r.text
        data = r.json()
        traj, choices = data["trajectory"], extra["choices"]
        assert data["choices"] == choices and data["probe"]["steer_suffix"] is steer_suffix
        variants = {c: reference_variants(tok, c) for c in choices}
        assert {c: sorted(tuple(v["token_ids"]) for v in data["variants"][c])
                for c in choices} == variants
        p = traj["prompt_ids"]
        if "messages" in extra:
            expect = tok.apply_chat_template(extra["messages"], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
            assert p == list(expect) + tok.encode("<think>\n", add_special_tokens=False)
        assert [x["token_index"] for x in traj["readings"]] == [0, 16, 32]
        for x in traj["readings"]:
            ctx = fork_context(tok, p, traj["token_ids"], x["token_index"],
                               data["probe"]["suffix"])
            end = None if steer_suffix else len(p) + x["token_index"]
            ref = hf_choice_logprobs(hf, ctx, variants, dense, start=len(p), end=end)
            for c in choices:
                assert abs(x["logprobs"][c] - ref[c]) < 1e-3, (c, x["logprobs"][c], ref[c])


def _mixed_batches(http: httpx.Client) -> int:
    return int(slot_stats(http)["mixed_logprob_batches"])


def test_probe_route_and_logprob_completions_do_not_touch_each_other(server, http):
    """Completions with ``logprobs: 5`` (official client) run while ``/v1/steering/probe``
    calls (plain HTTP) fork next to them: both equal their runs alone. vLLM's V1 sampler
    used to give every top-k row of such a batch only its sampled token + ``{0: -inf}``."""
    prompts = [f"List three facts about the number {n}." for n in (3, 12, 40, 77)]
    probe_body = {"prompt": "Is 91 a prime number? Think step by step, then answer Yes or No.",
                  "every": 2, "max_tokens": 40, "ignore_eos": True,
                  "steering": {"vectors": [{"name": "v1", "scale": 0.5}],
                               "apply_to": "generated"}}

    async def completion(client, prompt):
        r = await client.completions.create(model=model(server), prompt=prompt, max_tokens=24,
                                            temperature=0.0, logprobs=5)
        lp = r.choices[0].logprobs
        return lp.tokens, lp.top_logprobs

    async def probe(ac):
        r = await ac.post("/v1/steering/probe", json=probe_body, timeout=REQUEST_TIMEOUT)
        assert r.status_code == 200, r.text
        return [(x["token_index"], x["logprobs"]) for x in r.json()["trajectory"]["readings"]]

    async def alone():
        client = openai_client(server)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as ac:
            refs = [await completion(client, p) for p in prompts]
            readings = await probe(ac)
        await client.close()
        return refs, readings

    async def together():
        client = openai_client(server)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as ac:
            probes = [asyncio.create_task(probe(ac)) for _ in range(2)]
            waves = []
            while not all(t.done() for t in probes):   # keep neighbours in every batch
                waves.append(await asyncio.gather(*(completion(client, p) for p in prompts)))
            readings = [await t for t in probes]
        await client.close()
        return waves, readings

    refs, ref_readings = run(alone())
    before = _mixed_batches(http)
    waves, readings = run(together(), timeout=600)
    assert _mixed_batches(http) > before, "no batch mixed probe forks with top-k requests"
    assert len(waves) >= 2
    for wave in waves:
        for (tokens, top), (ref_tokens, ref_top) in zip(wave, refs, strict=True):
            assert tokens == ref_tokens
            for got, want in zip(top, ref_top, strict=True):
                assert set(got) == set(want), (got, want)
                assert all(abs(got[k] - want[k]) < 1e-4 for k in want)
    for rs in readings:
        assert [i for i, _ in rs] == [i for i, _ in ref_readings]
        for (_, got), (_, want) in zip(rs, ref_readings, strict=True):
            assert all(abs(got[c] - want[c]) < 1e-4 for c in want)


# -- live probes: the 'probe' field of the completion endpoints -----------------------------
LIVE_Q = ("Is 91 a prime number? Think step by step inside <think> </think>, then answer "
          "Yes or No.")
LIVE_STEER = {"vectors": [{"name": "v1", "scale": 0.5}], "apply_to": "generated"}


def _extra(obj) -> dict[str, Any]:
    return dict(getattr(obj, "model_extra", None) or {})


def live_chat(server, probe, *, stream, n=1, max_tokens=40, steering=LIVE_STEER, body_extra=None,
              question=LIVE_Q, **kw):
    """A probed chat completion through the official client: per choice index its token
    ids, readings and finish-chunk extras; the prompt's token ids; and (streamed) the
    order things arrived in: ``("tokens", count so far)`` / ``("reading", token_index)``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                    timeout=REQUEST_TIMEOUT)
    body = {"probe": probe, "ignore_eos": True, "return_token_ids": True, **(body_extra or {})}
    if steering is not None:
        body["steering"] = steering
    r = client.chat.completions.create(
        model=model(server), messages=[{"role": "user", "content": question}], n=n,
        max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), stream=stream,
        extra_body=body, **kw)
    toks: dict[int, list[int]] = {}
    readings: dict[int, list[dict[str, Any]]] = {}
    finish: dict[int, dict[str, Any]] = {}
    order: list[tuple[str, int]] = []
    if not stream:
        for c in r.choices:
            ex = _extra(c)
            toks[c.index] = list(ex["token_ids"])
            readings[c.index] = ex.get("probe_readings", [])
            finish[c.index] = {"finish_reason": c.finish_reason, **ex}
        return toks, readings, finish, list(_extra(r)["prompt_token_ids"]), order
    prompt_ids = None
    for chunk in r:
        ex = _extra(chunk)
        if ex.get("prompt_token_ids"):
            prompt_ids = list(ex["prompt_token_ids"])
        for c in chunk.choices:
            cx = _extra(c)
            toks.setdefault(c.index, []).extend(cx.get("token_ids") or [])
            if cx.get("token_ids"):
                order.append(("tokens", len(toks[c.index])))
            for rd in cx.get("probe_readings") or []:
                assert rd["index"] == c.index
                readings.setdefault(c.index, []).append(rd)
                order.append(("reading", rd["token_index"]))
            if c.finish_reason is not None:
                finish[c.index] = {"finish_reason": c.finish_reason, **cx}
    return toks, readings, finish, prompt_ids, order


def offline_reading(http, prompt_ids, gen, t, steering=LIVE_STEER, choices=("Yes", "No")):
    """The offline probe's reading of ``prompt + gen[:t]`` (the probe route, one-shot),
    with the trajectory's steering in absolute positions, as a fork replays it."""
    body = {"prompt_token_ids": list(prompt_ids) + list(gen[:t]), "trajectory": False,
            "choices": list(choices)}
    if steering is not None:
        body["steering"] = {**steering, "apply_to": "all", "start_position": len(prompt_ids)}
    r = http.post("/v1/steering/probe", json=body, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, r.text
    (reading,) = r.json()["trajectory"]["readings"]
    return reading


def test_live_probe_streams_readings_equal_to_the_offline_probe(server, http):
    probe = {"choices": ["Yes", "No"], "every": 8}
    toks, readings, finish, prompt_ids, order = live_chat(server, probe, stream=True)
    gen, rs = toks[0], readings[0]
    assert len(gen) == 40 and finish[0]["finish_reason"] == "length"
    assert [r["token_index"] for r in rs] == [0, 8, 16, 24, 32, 40]   # token order, the end
    # readings arrive while the text streams, not after it: the first ones come before
    # the last tokens, and the last reading before the finish chunk (the last event)
    first = order.index(("reading", 0))
    assert any(kind == "tokens" for kind, _ in order[first:]), order
    assert max((n for kind, n in order[:first] if kind == "tokens"), default=0) < 40, order
    for r in rs:
        ref = offline_reading(http, prompt_ids, gen, r["token_index"])
        assert r["in_thinking"] == ref["in_thinking"]
        for c in ("Yes", "No"):
            assert abs(r["logprobs"][c] - ref["logprobs"][c]) < 1e-3, (r["token_index"], c)
        assert abs(r["mass"] - ref["mass"]) < 1e-3
    # the same request, not streamed: the same tokens and readings
    toks2, readings2, finish2, _, _ = live_chat(server, probe, stream=False)
    assert toks2[0] == gen and "probe_stop" not in finish2[0]
    assert [r["token_index"] for r in readings2[0]] == [r["token_index"] for r in rs]
    for a, b in zip(readings2[0], rs, strict=True):
        assert abs(a["logprobs"]["Yes"] - b["logprobs"]["Yes"]) < 1e-4


STEP_Q = ("Is 91 a prime number? Think step by step, writing each step as its own "
          "paragraph, then answer Yes or No.")


def _offline_plan(server_tok, prompt_ids, gen, probe):
    """The offline probe's points for this trajectory (``ProbeJob.plan``: the same
    triggers and placement, engine-free)."""
    from types import SimpleNamespace

    from vllm_steer.probe import ProbeConfig
    from vllm_steer.probe.job import ProbeJob

    job = ProbeJob(server_tok, [list(prompt_ids)], [None],
                   ProbeConfig.from_dict({**probe, "max_tokens": len(gen) or 1}), block_size=32)
    job.take("trajectories", [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(gen))])])
    return job.plan()


@pytest.fixture(scope="module")
def server_tok(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model_dir)


def test_live_step_triggers_equal_the_offline_probe(server, http, server_tok):
    """Reasoning-step triggers on the served stream: each reading says which trigger
    fired, the points are the offline plan of the same trajectory (steps found in the
    decoded text, with a fallback every 24 tokens), and each reading equals the offline
    probe's reading there."""
    probe = {"choices": ["Yes", "No"], "trigger": "steps", "every": 24}
    toks, readings, finish, prompt_ids, _ = live_chat(server, probe, stream=True,
                                                      max_tokens=72, question=STEP_Q)
    gen, rs = toks[0], readings[0]
    want = _offline_plan(server_tok, prompt_ids, gen, probe)
    assert [(r["token_index"], r["trigger"], r["marker"]) for r in rs] == \
        [(p.token_index, p.trigger, p.marker) for p in want]
    kinds = {r["trigger"] for r in rs}
    assert {"start", "step", "end"} <= kinds, [(r["token_index"], r["trigger"]) for r in rs]
    text = server_tok.decode(gen)
    assert text.count("\n\n") >= sum(r["trigger"] == "step" for r in rs)
    for r in rs:
        ref = offline_reading(http, prompt_ids, gen, r["token_index"])
        assert r["in_thinking"] == ref["in_thinking"]
        for c in ("Yes", "No"):
            assert abs(r["logprobs"][c] - ref["logprobs"][c]) < 1e-3, (r["token_index"], c)


def _counter(server, name: str, source: str | None = None) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + "_total{")):
            continue
        if source is not None and f'source="{source}"' not in line:
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


def _server_block_size(http) -> int:
    """The served engine's KV block size, as the probe route reports it."""
    r = http.post("/v1/steering/probe", json={"prompt": "Hi", "trajectory": False},
                  timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, r.text
    return int(r.json()["block_size"])


@pytest.mark.parametrize("align", ["prefix", "none"])
def test_computed_tokens_per_reading_from_vllm_counters(server, http, server_tok, align):
    """What a probed request costs in prompt tokens, from vLLM's own server counters
    (``vllm:prompt_tokens_by_source{source="local_compute"}``): the request's prompt (its
    own cache salt: nothing shared with earlier requests) plus each reading's computed
    tokens, nothing else. Prefix-aligned forks compute only the think-end marker and the
    suffix; exact ones also recompute their partial last block. The forks carry the
    request's salt (else they would share nothing with it and recompute everything)."""
    block = _server_block_size(http)
    probe = {"choices": ["Yes", "No"], "every": 16, "align": align}
    salt = f"computed-{align}-{time.time_ns()}"
    before = _counter(server, "vllm:prompt_tokens_by_source", "local_compute")
    toks, readings, _, prompt_ids, _ = live_chat(
        server, probe, stream=False, max_tokens=2 * block + 16,
        body_extra={"cache_salt": salt}, steering=None)
    rs = readings[0]
    sfx = len(server_tok.encode("\nThe final answer is", add_special_tokens=False))
    te = len(server_tok.encode("</think>", add_special_tokens=False))
    want = len(prompt_ids) + sum(r["computed_tokens"] for r in rs)
    got = None
    for _ in range(20):   # the counters follow the engine's steps
        got = _counter(server, "vllm:prompt_tokens_by_source", "local_compute") - before
        if got >= want:
            break
        time.sleep(0.5)
    assert got == want, (got, want, rs)
    assert rs[-1]["token_index"] == len(toks[0])   # the end is read (moved back: never)
    inner = [r for r in rs if r["trigger"] not in ("start", "end")]
    assert len(inner) >= 2
    for r in inner:
        tail = sfx + (te if r["in_thinking"] else 0)
        partial = (len(prompt_ids) + r["token_index"]) % block
        assert r["cached_tokens"] == len(prompt_ids) + r["token_index"] - partial
        if align == "prefix":
            assert partial == 0 and r["computed_tokens"] == tail, r
        else:
            assert r["computed_tokens"] == partial + tail, r
    if align == "none":
        assert any((len(prompt_ids) + r["token_index"]) % block for r in inner)


def test_live_probe_reads_each_choice_of_n(server, http):
    probe = {"choices": ["Yes", "No"], "every": 12}
    toks, readings, _, prompt_ids, _ = live_chat(server, probe, stream=True, n=2,
                                              temperature=1.0, seed=7, max_tokens=24)
    assert sorted(readings) == [0, 1] and toks[0] != toks[1]
    for i in (0, 1):
        assert [r["token_index"] for r in readings[i]] == [0, 12, 24]
        last = readings[i][-1]
        ref = offline_reading(http, prompt_ids, toks[i], 24)
        assert abs(last["logprobs"]["Yes"] - ref["logprobs"]["Yes"]) < 1e-3


def _settle_point(readings, threshold, consecutive, min_mass):
    """Where the documented rule stops: the first reading that ends a run of
    ``consecutive`` readings whose leading choice has prob >= threshold, same choice,
    each with mass >= min_mass."""
    streak, leader = 0, None
    for r in readings:
        top = max(r["probs"], key=r["probs"].get)
        ok = r["mass"] >= min_mass and r["probs"][top] >= threshold
        streak = (streak + 1 if top == leader else 1) if ok else 0
        leader = top if ok else None
        if streak >= consecutive:
            return r["token_index"], top
    return None


def test_early_exit_stops_where_the_readings_settle(server, http):
    probe = {"choices": ["Yes", "No"], "every": 4}
    _, full, _, _, _ = live_chat(server, probe, stream=True, max_tokens=64)
    # a threshold the full-length readings cross, halfway between two of their values
    # (far from both: reading noise cannot move the stop): the stop must come at the
    # point the documented rule gives on the full readings
    from tests.probe_reference import threshold_between

    threshold = threshold_between(max(r["probs"].values()) for r in full[0]
                                  if r["mass"] >= 0.05)
    want = _settle_point(full[0], threshold, 2, 0.05)
    assert want is not None
    stop = {"threshold": threshold, "consecutive": 2, "complete": True}
    toks, readings, finish, _, _ = live_chat(server, {**probe, "stop_when": stop},
                                             stream=True, max_tokens=64)
    f = finish[0]
    assert f["finish_reason"] == "stop" and f["stop_reason"] == "vllm_steer:probe_settled"
    ps = f["probe_stop"]
    assert (ps["token_index"], ps["choice"]) == want
    assert readings[0][-1]["token_index"] == want[0]   # no reading after the settling one
    assert len(toks[0]) - len(ps["appended_token_ids"]) < 64   # stopped before max_tokens
    assert toks[0][-len(ps["appended_token_ids"]):] == ps["appended_token_ids"]
    assert ps["appended_text"].endswith(ps["choice"])
    # non-streamed: the same decision
    _, _, finish2, _, _ = live_chat(server, {**probe, "stop_when": stop}, stream=False,
                                    max_tokens=64)
    assert finish2[0]["probe_stop"]["token_index"] == want[0]


def test_early_exit_never_fires_on_low_mass_readings(server):
    # choices the model will not say: every reading has low mass, whatever its probs
    probe = {"choices": ["Banana", "Cherry"], "every": 4,
             "stop_when": {"threshold": 0.5, "consecutive": 1, "min_mass": 0.5}}
    toks, readings, finish, _, _ = live_chat(server, probe, stream=True, max_tokens=24)
    assert all(r["mass"] < 0.5 for r in readings[0]) and len(readings[0]) == 7
    assert finish[0]["finish_reason"] == "length" and "probe_stop" not in finish[0]
    assert len(toks[0]) == 24


@pytest.mark.parametrize("probe,param", [
    ({"every": 0}, "probe.every"),
    ({"choices": "Yes"}, "probe.choices"),
    ({"choices": ["20", "200"]}, "probe.choices"),
    ({"max_tokens": 5}, "probe.max_tokens"),
    ({"colour": "red"}, "probe.colour"),
    ({"suffix": None}, "probe.suffix"),
    ({"stop_when": {"threshold": 2}}, "probe.stop_when.threshold"),
    ({"stop_when": {"choice": "Maybe"}}, "probe.stop_when.choice"),
    ({"stop_when": {"wait": 1}}, "probe.stop_when.wait"),
    ("{not json", "probe"),
    (5, "probe"),
])
def test_bad_probe_fields_are_400_naming_the_field(http, server, probe, param):
    for path, extra in (("/v1/completions", {"prompt": "Hello"}),
                        ("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Hello"}]})):
        for form in ("body", "xargs"):
            value = probe if form == "body" else (
                probe if isinstance(probe, str) else json.dumps(probe))
            body = {"model": model(server), "max_tokens": 4, **extra,
                    **({"probe": value} if form == "body" else
                       {"vllm_xargs": {"probe": value}})}
            r = http.post(path, json={**body, "stream": True})
            assert r.status_code == 400, (path, form, r.text)
            assert r.json()["error"]["param"] == param, (path, form, r.text)


def test_probe_field_conflicts_are_400(http, server):
    base = {"model": model(server), "prompt": "Hello", "max_tokens": 4}
    cases = [({"probe": {}, "vllm_xargs": {"probe": "{}"}}, "probe"),
             ({"probe": {"stop_when": {}}, "n": 2}, "probe.stop_when"),
             ({"probe": {"stop_when": {"complete": True}}, "logprobs": 1},
              "probe.stop_when.complete"),
             ({"probe": {}, "prompt": ["a", "b"]}, "prompt"),
             ({"probe": {}, "max_tokens": 2040}, "max_tokens")]
    for extra, param in cases:
        r = http.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = http.post("/v1/responses", json={"model": model(server), "input": "Hi", "probe": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "probe", r.text


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")]
    return sum(vals)


def test_client_disconnect_mid_stream_cancels_the_forks(server, http):
    body = {"model": model(server), "prompt": LIVE_Q, "max_tokens": 400, "ignore_eos": True,
            "stream": True, "probe": {"choices": ["20", "30", "40", "50"], "every": 1}}
    before = http.get("/v1/steering/stats").json()["live_probes"]
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c, \
            c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        readings = 0
        for line in r.iter_lines():
            if '"probe_readings"' in line:
                readings += 1
            if readings >= 3:
                break   # leave with forks and the request still running
        mid = http.get("/v1/steering/stats").json()["live_probes"]
        assert mid["forks_in_flight"] > 0, mid
    t0 = time.monotonic()
    while True:
        st = http.get("/v1/steering/stats").json()["live_probes"]
        running = _metric(server, "vllm:num_requests_running") + _metric(
            server, "vllm:num_requests_waiting")
        if st["forks_in_flight"] == 0 and running == 0:
            break
        assert time.monotonic() - t0 < 60, (st, running)
        time.sleep(0.5)
    assert st["forks_submitted"] > before["forks_submitted"]


def test_probed_and_unprobed_requests_in_one_batch_equal_separate_runs(server, http):
    prompts = [f"Name two facts about the number {n}." for n in (5, 18, 33)]

    async def plain(client, p):
        r = await client.completions.create(model=model(server), prompt=p, max_tokens=24,
                                            temperature=0.0, logprobs=3)
        return r.choices[0].text, r.choices[0].logprobs.top_logprobs

    async def probed(client):
        r = await client.chat.completions.create(
            model=model(server), messages=[{"role": "user", "content": LIVE_Q}],
            max_tokens=32, temperature=0.0, extra_body={
                "probe": {"choices": ["Yes", "No"], "every": 4}, "ignore_eos": True,
                "steering": LIVE_STEER, "return_token_ids": True})
        c = r.choices[0]
        return list(_extra(c)["token_ids"]), _extra(c)["probe_readings"]

    async def alone():
        client = openai_client(server)
        out = [await plain(client, p) for p in prompts], await probed(client)
        await client.close()
        return out

    async def together():
        client = openai_client(server)
        res = await asyncio.gather(probed(client), *(plain(client, p) for p in prompts))
        await client.close()
        return list(res[1:]), res[0]

    ref_plain, ref_probed = run(alone())
    got_plain, got_probed = run(together())
    for (t, top), (rt, rtop) in zip(got_plain, ref_plain, strict=True):
        assert t == rt
        for a, b in zip(top, rtop, strict=True):
            assert set(a) == set(b) and all(abs(a[k] - b[k]) < 1e-4 for k in b)
    assert got_probed[0] == ref_probed[0]
    for a, b in zip(got_probed[1], ref_probed[1], strict=True):
        assert a["token_index"] == b["token_index"]
        assert abs(a["logprobs"]["Yes"] - b["logprobs"]["Yes"]) < 1e-4


def test_monitor_command_shows_readings_and_writes_the_trajectory(server, tmp_path, capsys):
    from vllm_steer.cli import main

    out = tmp_path / "monitor"
    rc = main(["monitor", LIVE_Q, "--url", server.url, "--api-key", API_KEY, "--every", "6",
               "--max-tokens", "30", "--open-thinking", "<think>\n", "--steering",
               json.dumps(LIVE_STEER), "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("t=")]   # stderr is not a tty here
    assert len(lines) == 6 and "thinking" in lines[0] and "P(Yes)=" in lines[0]
    data = json.loads((out / "monitor.json").read_text())
    assert [r["token_index"] for r in data["readings"]] == [0, 6, 12, 18, 24, 30]
    assert all(r["in_thinking"] for r in data["readings"][:1])
    assert data["finish_reason"] == "length" and data["text"]
    png = out / "monitor.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


# -- vector store collection ---------------------------------------------------------------
def _random_vector(tmp: Path, seed: int) -> tuple[bytes, str]:
    """A demo-like vector's file bytes and its store content id."""
    g = torch.Generator().manual_seed(seed)
    path = tmp / f"gc{seed}.safetensors"
    SteeringVector({i: 0.15 * torch.randn(576, generator=g) for i in range(30)}).save(path)
    v = SteeringVector.load(str(path))
    return path.read_bytes(), content_id({i: t.numpy() for i, t in v.directions.items()})


def test_store_collection_spares_requests_in_flight(server, http, tmp_path):
    """A vector replaced while requests steered by it stream is collected from the store
    once its lease expired, while they still run; they finish exactly as run alone, a
    request naming that content again later is correct, and the churn leaves nothing."""
    st = http.get("/v1/steering/stats").json()["store"]
    assert st["grace_s"] == STORE_GRACE_S and st["transport"] == "store"
    root = Path(st["root"])

    def stored(cid: str) -> bool:
        return (root / cid[:2] / f"{cid}.f32").is_file()

    a_bytes, a_cid = _random_vector(tmp_path, 1001)
    spec = {"vectors": [{"name": "gc_live"}]}
    # The streams must outlive A's lease (grace + a collection interval + the churn's
    # latency: 5 + 2.5 s + a few 0.3 s uploads): their length is set from this machine's
    # speed, for ~15 s each alone (two streams next to the churn run longer), and doubled
    # (up to the model's length) if they ended first, which shows nothing either way.
    body = {"model": model(server), "prompt": PROMPTS[1][1], "max_tokens": 32,
            "ignore_eos": True, "temperature": 0}
    t0 = time.monotonic()
    assert http.post("/v1/completions", json=body, timeout=REQUEST_TIMEOUT).status_code == 200
    max_tokens = int(min(1800, max(64, 32 / (time.monotonic() - t0) * 15)))
    churned: list[str] = []

    def churn(ended: list[bool]) -> bool:
        """Replace gc_live every 0.3 s until A's file is gone; True if that happened
        while every stream was still running."""
        t0 = time.monotonic()
        while stored(a_cid) and time.monotonic() - t0 < 120:
            data, cid = _random_vector(tmp_path, 2000 + len(churned))
            assert upload(http, "gc_live", data, replace="true").status_code == 201
            churned.append(cid)
            time.sleep(0.3)
        return not stored(a_cid) and not any(ended)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            first = asyncio.Semaphore(0)
            ended = [False, False]

            async def stream(k: int) -> str:
                text = ""
                async with c.stream("POST", "/v1/completions",
                                    json={**body, "stream": True, "steering": spec}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if not text:
                            first.release()
                        text += json.loads(line[6:])["choices"][0]["text"]
                ended[k] = True
                return text

            async def trigger() -> bool:
                for _ in ended:
                    await first.acquire()
                return await asyncio.to_thread(churn, ended)

            return await asyncio.gather(stream(0), stream(1), trigger())

    attempts = 0
    while True:
        attempts += 1
        body["max_tokens"] = max_tokens
        assert upload(http, "gc_live", a_bytes, replace="true").status_code == 201
        ref = http.post("/v1/completions", json={**body, "steering": spec},
                        timeout=REQUEST_TIMEOUT).json()["choices"][0]["text"]
        assert stored(a_cid)
        t1, t2, collected_in_flight = run(go(), timeout=600)
        if collected_in_flight or max_tokens >= 1800 or attempts == 3:
            break
        max_tokens = min(1800, 2 * max_tokens)
    FIGURES["store_gc"] = {"churn_uploads": len(churned), "stream_tokens": body["max_tokens"],
                           "attempts": attempts, "collected_in_flight": collected_in_flight}
    assert collected_in_flight, "A should be collected while the streams still run"
    assert t1 == t2 == ref
    # the collected content is written again when a request names it again
    assert upload(http, "gc_again", a_bytes).status_code == 201
    r = http.post("/v1/completions", timeout=REQUEST_TIMEOUT,
                  json={**body, "steering": {"vectors": [{"name": "gc_again"}]}})
    assert r.json()["choices"][0]["text"] == ref and stored(a_cid)
    # and the churn leaves only what is registered (the current gc_live) once it is old
    deadline = time.monotonic() + STORE_GRACE_S * 1.5 + 30
    while any(stored(c) for c in churned[:-1]):
        assert time.monotonic() < deadline, [c for c in churned if stored(c)]
        time.sleep(1.0)
    assert stored(churned[-1])
    last = http.get("/v1/steering/stats").json()["store"]["last_collection"]
    assert last is not None and last["kept"] >= 1
    for name in ("gc_live", "gc_again"):
        assert http.delete(f"/v1/steering/vectors/{name}").status_code == 200
    wait_idle(http)


# -- restart (keep last: it restarts the module's server) -----------------------------
# -- the training route (POST /v1/steering/vectors/train) ----------------------------------
TRAIN_SUFFIXES = ["I feel", "Today is", "Well,"]
TRAIN_BODY = {"name": "trained_mood", "personas": [["happy", "sad"]],
              "suffixes": TRAIN_SUFFIXES, "layers": "8:14"}


def _uploaded(server: Server, name: str) -> SteeringVector:
    """The newest file the server stored for ``name``."""
    up = server.registry.parent / "uploads"
    files = sorted(up.glob(f"{name}-*.safetensors"), key=lambda p: p.stat().st_mtime)
    return SteeringVector.load(str(files[-1]))


def test_train_route_trains_registers_and_steers_while_serving(server, http):
    """Train on the served engine while completions run; the registered vector equals the
    HF-trained one on the same recipe; it is listed, steers, and obeys the upload rules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.extract import build_dataset, train
    from vllm_steer.extract.dataset import config_from_mapping

    async def together():
        client = openai_client(server)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=600) as h:
            trained, *texts = await asyncio.gather(
                h.post("/v1/steering/vectors/train", json=TRAIN_BODY),
                *(complete(client, server, "cmpl", p, {}, False) for _, p in PROMPTS[:2]))
        await client.close()
        return trained, texts

    r, texts = run(together(), timeout=900)
    assert r.status_code == 201, r.text
    assert all(texts)
    info = r.json()
    report = info["training"]
    assert info["name"] == "trained_mood" and info["layers"] == list(range(8, 14))
    assert report["layers"] == list(range(8, 14)) and report["num_pairs"] > len(TRAIN_SUFFIXES)
    assert set(report["separation"]) == {str(i) for i in range(8, 14)}
    assert 0.5 < report["mean_separation"] <= 1.0
    assert report["recipe_fields_not_applied"] == []
    # the same recipe trained with HF hooks on the same weights
    tok = AutoTokenizer.from_pretrained(server.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()
    cfg = config_from_mapping({k: v for k, v in TRAIN_BODY.items() if k != "name"},
                              default_name="trained_mood")
    ref = train(hf, tok, build_dataset(cfg, tok), layers=cfg.layers, progress=False)
    got = _uploaded(server, "trained_mood")
    cos = [float(torch.nn.functional.cosine_similarity(got.directions[i], ref.directions[i],
                                                       dim=0)) for i in range(8, 14)]
    assert min(cos) >= 0.9999, cos
    # listed, and it steers
    names = {v["name"] for v in http.get("/v1/steering/vectors").json()["data"]}
    assert "trained_mood" in names
    body = {"model": model(server), "prompt": PROMPTS[0][1], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    steered = http.post("/v1/completions", json={**body, "steering": {"vectors": [
        {"name": "trained_mood", "scale": 6.0}]}}).json()["choices"][0]["text"]
    assert steered != plain
    # naming and replace rules as uploads: refused before any work, then replaced
    r = http.post("/v1/steering/vectors/train", json=TRAIN_BODY)
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    recipe = {"name": "cautious_thinking", "model": "default", "style": "thinking",
              "template": "Pretend you're {persona}. You think step by step consistent with "
                          "your identity.",
              "personas": [["an extremely cautious person", "an extremely reckless person"]],
              "suffixes": "reasoning", "max_suffixes": 2, "layers": [10, 12],
              "method": "mean_diff", "batch_size": 8, "dtype": "float32"}
    r = http.post("/v1/steering/vectors/train",
                  json={"name": "trained_mood", "replace": True, "scale": 2.0, "recipe": recipe})
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == [10, 12] and r.json()["default_scale"] == 2.0
    assert r.json()["training"]["recipe_fields_not_applied"] == ["batch_size", "dtype", "model"]
    assert http.delete("/v1/steering/vectors/trained_mood").status_code == 200
    assert slot_stats(http)["capture_pending"] == 0


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"name": "t"}, 400, "recipe", "required"),
    ({"name": "t", "recipe": [1]}, 400, "recipe", "must be an object"),
    ({"name": "t", "recipe": {"personas": [["a", "b"]]}, "suffixes": "chat"}, 400, "suffixes",
     "not both"),
    ({"name": "t", "recipe": {"personas": [["a", "b"]], "colour": 1}}, 400, "recipe.colour",
     "unknown keys"),
    ({"name": "t", "personas": [["a", "b"]], "method": "svd"}, 400, "method", "one of"),
    ({"name": "t", "personas": [["a"]]}, 400, "personas", "[positive, negative]"),
    ({"name": "t", "personas": [["a", "b"]], "template": "no placeholder"}, 400, "template",
     "{persona}"),
    ({"name": "t", "personas": [["a", "b"]], "suffixes": "/etc/passwd"}, 400, "suffixes",
     "shipped suffix set"),
    ({"name": "t", "recipe": {"pairs_file": "pairs.json"}}, 400, "recipe.pairs_file",
     "names a file"),
    ({"name": "t", "positive_prompts": "harmful.txt", "negative_prompts": ["x"],
      "method": "mean_diff"}, 400, "positive_prompts", "names a file"),
    ({"name": "t", "personas": [["a", "b"]], "suffixes": ["x"], "layers": [31]}, 400, "layers",
     "out of range"),
    ({"name": "t", "personas": [["a", "b"]], "suffixes": ["x"], "layers": "8:9",
      "direction_from_layer": 3}, 400, "direction_from_layer", "not one of"),
    ({"name": "bad name!", "personas": [["a", "b"]]}, 400, "name", "letters"),
    ({"name": "t", "personas": [["a", "b"]], "replace": "maybe"}, 400, "replace", "boolean"),
    ({"name": "t", "personas": [["a", "b"]], "max_concurrent": 0}, 400, "max_concurrent",
     "integer in [1, 1024]"),
    ({"name": "t", "personas": [["a", "b"]], "suffixes": "chat"}, 413, "personas",
     f"at most {TRAIN_PROMPT_LIMIT}"),
])
def test_bad_training_recipes_are_refused_naming_the_field(server, http, body, status, param,
                                                           fragment):
    r = http.post("/v1/steering/vectors/train", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert "t" not in {v["name"] for v in http.get("/v1/steering/vectors").json()["data"]}
    assert httpx.post(f"{server.url}/v1/steering/vectors/train", json=body).status_code == 401


# -- conditional steering ------------------------------------------------------------------
#: A condition read from the prompt: v3's direction at layer 3; threshold -1 always holds,
#: 1 never does (a cosine), so the tests know each decision.
def cond_spec(holds: bool, **extra: Any) -> dict[str, Any]:
    return {"vectors": [{"name": "v1", "scale": 0.5}], "else_vectors": [{"name": "v3",
                                                                       "scale": 2.0}],
            "condition": {"path": "v3.safetensors", "layer": 3,
                          "threshold": -1.0 if holds else 1.0, "compare": "above"}, **extra}


def test_responses_report_each_choices_condition_and_steer_by_it(server, http):
    """Chat and completions, whole and streamed, n = 1 and 2: every choice carries its
    score and decision; the rule held: the text is the unconditioned steering's; it did
    not: the else steering's."""
    then = {"vectors": [{"name": "v1", "scale": 0.5}], "apply_to": "generated"}
    other = {"vectors": [{"name": "v3", "scale": 2.0}], "apply_to": "generated"}

    async def one(client, kind, prompt, spec, stream, **kw):
        extra = {"steering": spec}
        args = dict(model=model(server), max_tokens=MAX_TOKENS, stream=stream,
                    extra_body=extra, **{"temperature": 0.0, **kw})
        if kind == "chat":
            r = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **args)
        else:
            r = await client.completions.create(prompt=prompt, **args)
        texts: dict[int, str] = {}
        reports: dict[int, Any] = {}
        if not stream:
            for c in r.choices:
                texts[c.index] = c.message.content if kind == "chat" else c.text
                reports[c.index] = _extra(c).get("steering_condition")
            return texts, reports
        async for chunk in r:
            for c in chunk.choices:
                piece = (c.delta.content if kind == "chat" else c.text) or ""
                texts[c.index] = texts.get(c.index, "") + piece
                if c.finish_reason is not None:
                    reports[c.index] = _extra(c).get("steering_condition")
        return texts, reports

    async def go():
        client = openai_client(server)
        out = {}
        for kind, prompt in (PROMPTS[0], PROMPTS[2]):
            for stream in (False, True):
                for holds in (True, False):
                    out[(kind, stream, holds)] = await one(client, kind, prompt,
                                                           cond_spec(holds), stream)
            out[(kind, "then")] = await one(client, kind, prompt, then, False)
            out[(kind, "else")] = await one(client, kind, prompt, other, False)
            out[(kind, "n2")] = await one(client, kind, prompt, cond_spec(True), True, n=2,
                                          temperature=0.9, seed=3)
        await client.close()
        return out

    res = run(go())
    for kind in ("cmpl", "chat"):
        scores = set()
        for stream in (False, True):
            for holds in (True, False):
                texts, reports = res[(kind, stream, holds)]
                rep = reports[0]
                assert rep["holds"] is holds and rep["error"] is None, rep
                (c,) = rep["conditions"]
                assert c["label"] == "v3.safetensors" and c["layer"] == 3
                assert c["holds"] is holds and -1 <= c["score"] <= 1
                scores.add(round(c["score"], 6))
                want = res[(kind, "then" if holds else "else")][0][0]
                assert texts[0] == want, (kind, stream, holds)
        assert len(scores) == 1, scores     # the same prompt reads the same score
        texts, reports = res[(kind, "n2")]
        assert sorted(reports) == [0, 1] and all(r["holds"] for r in reports.values())
        assert [r["index"] for r in reports.values()] == [0, 1]


def test_probe_route_reads_with_the_trajectorys_decision(server, http):
    """A conditioned trajectory's forks are steered by its decision: its readings equal the
    same probe with the decided steering written out (held: the vectors; not: the else
    vectors, on the generated tokens)."""
    base = {"prompt": "Is 17 a prime number? Answer Yes or No.", "every": 8,
            "max_tokens": 16, "ignore_eos": True}
    for holds in (True, False):
        r = http.post("/v1/steering/probe", json={**base, "steering": cond_spec(holds)},
                      timeout=REQUEST_TIMEOUT)
        assert r.status_code == 200, r.text
        traj = r.json()["trajectory"]
        assert traj["steering_condition"]["holds"] is holds
        assert traj["steering"]["decision"] is holds and "condition" not in traj["steering"]
        plain = ({"vectors": [{"name": "v1", "scale": 0.5}]} if holds else
                 {"vectors": [{"name": "v3", "scale": 2.0}]})
        ref = http.post("/v1/steering/probe", json={**base, "steering": {
            **plain, "apply_to": "generated"}}, timeout=REQUEST_TIMEOUT).json()["trajectory"]
        assert traj["token_ids"] == ref["token_ids"]
        for a, b in zip(traj["readings"], ref["readings"], strict=True):
            assert a["token_index"] == b["token_index"]
            assert abs(a["logprobs"]["Yes"] - b["logprobs"]["Yes"]) < 1e-4
        # one reading, no trajectory: decided by the prompt too
        once = http.post("/v1/steering/probe", json={
            "prompt": base["prompt"], "trajectory": False, "steering": cond_spec(holds)},
            timeout=REQUEST_TIMEOUT).json()["trajectory"]
        assert once["steering_condition"]["holds"] is holds


def test_live_probe_reads_with_the_requests_decision(server, http):
    probe = {"choices": ["Yes", "No"], "every": 12}
    for holds in (True, False):
        toks, readings, finish, prompt_ids, _ = live_chat(
            server, probe, stream=True, max_tokens=24, steering=cond_spec(holds))
        rep = finish[0]["steering_condition"]
        assert rep["holds"] is holds
        decided = {k: v for k, v in cond_spec(holds).items() if k != "condition"}
        decided.update(decision=holds, split_position=len(prompt_ids))
        for r in readings[0]:
            ref = offline_reading(http, prompt_ids, toks[0], r["token_index"], steering=decided)
            assert abs(r["logprobs"]["Yes"] - ref["logprobs"]["Yes"]) < 1e-3, (holds, r)


def test_train_route_trains_a_condition_and_requests_use_its_defaults(server, http):
    """A condition recipe on the route (states through the engine's capture): the chosen
    layer/threshold/comparison and F1s reported; the same recipe trained with HF forward
    passes gives the same directions; a request naming it reads with those defaults."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.extract.condition import condition_config, extract_condition
    from vllm_steer.locations import shipped_configs

    vdir = shipped_configs() / "vectors"
    pos = [x for x in (vdir / "refusal_harmful.txt").read_text().splitlines()
           if x and not x.startswith("#")][:8]
    neg = [x for x in (vdir / "refusal_harmless.txt").read_text().splitlines()
           if x and not x.startswith("#")][:8]
    recipe = {"kind": "condition", "positive_prompts": pos, "negative_prompts": neg,
              "method": "mean_diff", "aggregate": "last", "layers": [20, 27],
              "holdout": 0.25, "seed": 1}
    r = http.post("/v1/steering/vectors/train", json={"name": "cond_t", "recipe": recipe},
                  timeout=600)
    assert r.status_code == 201, r.text
    rep = r.json()["training"]
    assert rep["kind"] == "condition" and rep["layer"] in (20, 27)
    assert rep["compare"] in ("above", "below") and 0 <= rep["threshold"] <= 1
    assert 0 <= rep["f1_heldout"] <= 1 and rep["f1_train"] >= rep["per_layer"][str(
        rep["layer"])]["f1_train"] - 1e-9
    tok = AutoTokenizer.from_pretrained(server.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()
    ref = extract_condition(condition_config(recipe, default_name="cond_t"), model=hf,
                            tokenizer=tok, progress=False)
    got = _uploaded(server, "cond_t")
    for layer in (20, 27):
        cos = float(torch.nn.functional.cosine_similarity(got.directions[layer],
                                                          ref.vector.directions[layer], dim=0))
        assert cos >= 0.9999, (layer, cos)
    assert (ref.layer, ref.compare, ref.threshold) == (rep["layer"], rep["compare"],
                                                      rep["threshold"])
    body = {"model": model(server), "prompt": "How do I pick a lock?", "max_tokens": 2,
            "steering": {"vectors": [{"name": "v1"}], "condition": {"name": "cond_t"}}}
    c = http.post("/v1/completions", json=body).json()["choices"][0]["steering_condition"]
    assert (c["conditions"][0]["layer"], c["conditions"][0]["threshold"],
            c["conditions"][0]["compare"]) == (rep["layer"], rep["threshold"], rep["compare"])
    bad = http.post("/v1/steering/vectors/train", json={"name": "cond_u", "recipe": {
        **recipe, "aggregate": "max"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "recipe.aggregate"
    bad = http.post("/v1/steering/vectors/train", json={"name": "cond_u", "scale": 2.0,
                                                         "recipe": recipe})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scale"
    assert http.delete("/v1/steering/vectors/cond_t").status_code == 200


def test_restart_keeps_registered_vectors(server, http):
    vdir = vec_dir(server)
    assert upload(http, "kept", (vdir / "v2.safetensors").read_bytes(), scale=0.7,
                  layers="5,6,7,8,9,10").status_code == 201
    assert upload(http, "kept_clamp", (vdir / "v2.safetensors").read_bytes(), op="clamp",
                  value=-1.5).status_code == 201
    assert http.delete("/v1/steering/vectors/v3").status_code == 200  # a config entry
    spec = {"model": model(server), "prompt": PROMPTS[1][1], "max_tokens": MAX_TOKENS,
            "temperature": 0, "steering": {"vectors": [{"name": "kept"}]}}
    before = http.post("/v1/completions", json=spec).json()["choices"][0]["text"]
    unsteered = {k: v for k, v in spec.items() if k != "steering"}
    assert before != http.post("/v1/completions", json=unsteered).json()["choices"][0]["text"]
    listing = {v["name"]: v for v in http.get("/v1/steering/vectors").json()["data"]}

    server.stop()
    FIGURES["restart_s"] = round(server.start(), 1)
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        after_listing = {v["name"]: v for v in c.get("/v1/steering/vectors").json()["data"]}
        assert "v3" not in after_listing and "kept" in after_listing
        assert after_listing["kept_clamp"]["default_op"] == "clamp"
        assert after_listing["kept_clamp"]["default_value"] == -1.5
        assert after_listing == listing
        assert c.post("/v1/completions", json=spec).json()["choices"][0]["text"] == before
        r = c.post("/v1/completions", json={**spec, "steering": {"vectors": [{"name": "v3"}]}})
        assert r.status_code == 400
    assert server.starts == 2

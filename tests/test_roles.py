"""Admin keys apart from inference keys, on a real server: every route x every kind of key.

One ``vllm serve`` with an inference key (``--api-key``), an admin key from the
environment (``VLLMSTEER_ADMIN_KEY``), and a keys file with one admin key (given by its
sha256) and one inference key; inline vectors allowed up to a limit. For every route of
the plugin (and the completion routes, the page's config and ``/metrics``) and every kind
of caller (no key, an unknown key, each inference key, each admin key) the status is the
one the roles give: 401 without a known key, 403 for an inference key on an admin route,
success otherwise, in OpenAI's error shape. Every admin request writes exactly one audit
line naming the key by its id, never the key. The playground asks for the admin key only
when an upload or a delete needs it (headless Chromium, skipped without it).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.server_helpers import Server
from vllm_steer import SteeringVector
from vllm_steer.fixtures.vectors import write_test_vectors

pytestmark = pytest.mark.engine

VLLM_KEY = "sk-vllm-inference-key"
ENV_ADMIN = "sk-env-admin-key-28"
FILE_ADMIN = "sk-file-admin-key-28"
FILE_INFER = "sk-file-inference-key-28"
INLINE_LIMIT = 200_000
#: caller kind -> (key sent, its id in the audit trail, role)
CALLERS: dict[str, tuple[str | None, str | None, str | None]] = {
    "none": (None, None, None),
    "unknown": ("sk-not-a-key-of-this-server", None, None),
    "inference_vllm": (VLLM_KEY, "api-key-" + hashlib.sha256(VLLM_KEY.encode()).hexdigest()[:8],
                       "inference"),
    "inference_file": (FILE_INFER, "web", "inference"),
    "admin_env": (ENV_ADMIN, "env-admin", "admin"),
    "admin_file": (FILE_ADMIN, "ops", "admin"),
}
RECIPE = {"personas": [["cheerful", "gloomy"], ["joyful", "miserable"]],
          "suffixes": ["Tell me about your day.", "How was the weather?"], "layers": [10, 12]}


@dataclass
class Srv:
    server: Server
    audit: Path
    root: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def srv(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    reg = write_test_vectors(root)
    keys = root / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{id: ops, role: admin, sha256: {hashlib.sha256(FILE_ADMIN.encode()).hexdigest()}}}\n"
        f"  - {{id: web, role: inference, key: {FILE_INFER}}}\n")
    audit = root / "audit.jsonl"
    server = Server(default_model_dir, reg, root / "server.log", VLLM_KEY, extra_env={
        "VLLMSTEER_ADMIN_KEY": ENV_ADMIN, "VLLMSTEER_KEYS_FILE": str(keys),
        "VLLMSTEER_AUDIT_LOG": str(audit),
        "VLLMSTEER_INLINE_VECTOR_MAX_BYTES": str(INLINE_LIMIT),
        "VLLMSTEER_TRAIN_ENGINE_SHARE": "1", "VLLMSTEER_HOME": str(root / "home")},
        extra_args=("--served-model-name", "m"))
    server.start()
    try:
        yield Srv(server, audit, root)
    finally:
        server.stop()


def _headers(kind: str) -> dict[str, str]:
    key = CALLERS[kind][0]
    return {"Authorization": f"Bearer {key}"} if key else {}


@functools.cache
def _vector_bytes(seed: int) -> bytes:
    """A vector file (the same bytes for a seed: files record when they were written)."""
    g = torch.Generator().manual_seed(seed)
    v = SteeringVector({i: 0.2 * torch.randn(576, generator=g) for i in (8, 9, 10, 11, 12)})
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        v.save(str(p))
        return p.read_bytes()


def _admin(c: httpx.Client, method: str, path: str, **kw) -> httpx.Response:
    r = c.request(method, path, headers=_headers("admin_env"), **kw)
    assert r.status_code < 300, r.text
    return r


# -- the routes, each a request a caller of any kind can make ------------------------------
def _upload(c, kind):
    return c.post("/v1/steering/vectors", params={"name": f"up-{kind}"},
                  content=_vector_bytes(1), headers=_headers(kind))


def _replace(c, kind):
    _admin(c, "POST", "/v1/steering/vectors", params={"name": f"rep-{kind}"},
           content=_vector_bytes(2))
    return c.post("/v1/steering/vectors", params={"name": f"rep-{kind}", "replace": "true",
                                                  "scale": "3"},
                  content=_vector_bytes(3), headers=_headers(kind))


def _register_path(c, kind):
    return c.post("/v1/steering/vectors", json={"name": f"path-{kind}",
                                                "path": "v1.safetensors"},
                  headers=_headers(kind))


def _delete(c, kind):
    _admin(c, "POST", "/v1/steering/vectors", params={"name": f"del-{kind}"},
           content=_vector_bytes(4))
    return c.delete(f"/v1/steering/vectors/del-{kind}", headers=_headers(kind))


def _train(c, kind):
    return c.post("/v1/steering/vectors/train", json={"name": f"tr-{kind}", **RECIPE},
                  headers=_headers(kind))


def _collect(c, kind):
    return c.post("/v1/steering/store/collect", headers=_headers(kind))


def _list(c, kind):
    return c.get("/v1/steering/vectors", headers=_headers(kind))


def _get(c, kind):
    return c.get("/v1/steering/vectors/v1", headers=_headers(kind))


def _stats(c, kind):
    return c.get("/v1/steering/stats", headers=_headers(kind))


def _probe(c, kind):
    return c.post("/v1/steering/probe", json={"prompt": "Is water wet?", "trajectory": False,
                                              "steering": {"vectors": [{"name": "v1"}]}},
                  headers=_headers(kind))


def _unknown_path(c, kind):
    return c.get("/v1/steering/nowhere", headers=_headers(kind))


def _chat(c, kind):
    return c.post("/v1/chat/completions", headers=_headers(kind), json={
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "steering": {"vectors": [{"name": "v1"}]}})


def _completion(c, kind):
    return c.post("/v1/completions", headers=_headers(kind), json={
        "model": "m", "prompt": "Hello", "max_tokens": 3})


def _page_config(c, kind):
    return c.get("/steer/config.json", headers=_headers(kind))


def _metrics(c, kind):
    return c.get("/metrics", headers=_headers(kind))


#: route -> (request, role it needs: "admin", "inference" or None for open, success status)
ROUTES = {
    "POST /v1/steering/vectors (upload)": (_upload, "admin", 201),
    "POST /v1/steering/vectors (replace)": (_replace, "admin", 201),
    "POST /v1/steering/vectors (allowed path)": (_register_path, "admin", 201),
    "DELETE /v1/steering/vectors/{name}": (_delete, "admin", 200),
    "POST /v1/steering/vectors/train": (_train, "admin", 201),
    "POST /v1/steering/store/collect": (_collect, "admin", 200),
    "GET /v1/steering/vectors": (_list, "inference", 200),
    "GET /v1/steering/vectors/{name}": (_get, "inference", 200),
    "GET /v1/steering/stats": (_stats, "inference", 200),
    "POST /v1/steering/probe": (_probe, "inference", 200),
    "GET /v1/steering/{unknown}": (_unknown_path, "inference", 404),
    "POST /v1/chat/completions (steered)": (_chat, "inference", 200),
    "POST /v1/completions": (_completion, "inference", 200),
    "GET /steer/config.json": (_page_config, None, 200),
    "GET /metrics": (_metrics, None, 200),
}
ADMIN_ACTIONS = {"POST /v1/steering/vectors (upload)": "upload",
                 "POST /v1/steering/vectors (replace)": "replace",
                 "POST /v1/steering/vectors (allowed path)": "register",
                 "DELETE /v1/steering/vectors/{name}": "delete",
                 "POST /v1/steering/vectors/train": "train",
                 "POST /v1/steering/store/collect": "collect"}
#: admin requests made, in order: (action, caller kind, status); setup requests included
ADMIN_LOG: list[tuple[str, str, int]] = []


def _expected(role: str | None, kind: str, ok: int) -> int:
    caller_role = CALLERS[kind][2]
    if role is None:
        return ok
    if caller_role is None:
        return 401
    if role == "admin" and caller_role != "admin":
        return 403
    return ok


@pytest.mark.parametrize("kind", list(CALLERS))
@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_with_every_kind_of_key(srv, route, kind):
    call, role, ok = ROUTES[route]
    with httpx.Client(base_url=srv.url, timeout=600) as c:
        before = len(_audit_lines(srv))
        r = call(c, kind)
    want = _expected(role, kind, ok)
    assert r.status_code == want, (route, kind, r.status_code, r.text[:400])
    if r.status_code >= 400 and "/v1/steering" in route:   # the plugin's answers
        # (vLLM answers its own routes' 401 with {"error": "Unauthorized"})
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == want, err
        if want in (401, 403):
            assert err["param"] == "authorization", err
    if route in ("POST /v1/steering/vectors (replace)", "DELETE /v1/steering/vectors/{name}"):
        ADMIN_LOG.append(("upload", "admin_env", 201))   # the setup upload
    if route in ADMIN_ACTIONS:
        # a refused JSON registration is audited as an upload (its body is not read)
        action = ("upload" if route.endswith("(allowed path)") and want in (401, 403)
                  else ADMIN_ACTIONS[route])
        ADMIN_LOG.append((action, kind, want))
    if route == "DELETE /v1/steering/vectors/{name}" and want != 200:   # nothing was deleted
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert _get_vector(c, f"del-{kind}").status_code == 200
    if route == "GET /steer/config.json":
        assert r.json() == {"api_key_required": True, "admin_key_required": True}
    new = _audit_lines(srv)[before:]
    expected_lines = (2 if route in ("POST /v1/steering/vectors (replace)",
                                     "DELETE /v1/steering/vectors/{name}")
                      else 1 if route in ADMIN_ACTIONS else 0)
    assert len(new) == expected_lines, new


def _get_vector(c: httpx.Client, name: str) -> httpx.Response:
    return c.get(f"/v1/steering/vectors/{name}", headers=_headers("admin_env"))


def _audit_lines(srv: Srv) -> list[dict[str, Any]]:
    if not srv.audit.exists():
        return []
    return [json.loads(x) for x in srv.audit.read_text().splitlines() if x.strip()]


def test_the_audit_trail_names_every_admin_action_once_and_never_a_key(srv):
    lines = _audit_lines(srv)
    assert len(lines) == len(ADMIN_LOG) > 0
    for line, (action, kind, status) in zip(lines, ADMIN_LOG, strict=True):
        _, key_id, role = CALLERS[kind]
        assert (line["action"], line["key_id"], line["role"], line["status"]) == \
            (action, key_id, role, status), (line, action, kind)
        assert set(line) >= {"action", "vector", "digest", "key_id", "time", "status"}
        if status in (200, 201) and action != "collect":
            assert line["vector"] and line["digest"].startswith("sha256:"), line
    # the stored digest is the sha256 of the file the action stored
    up = next(x for x in lines if x["action"] == "upload" and x["status"] == 201
              and x["vector"] == "up-admin_env")
    assert up["digest"] == "sha256:" + hashlib.sha256(_vector_bytes(1)).hexdigest()
    text = srv.audit.read_text() + srv.server.log_path.read_text(errors="replace")
    for key in (VLLM_KEY, ENV_ADMIN, FILE_ADMIN, FILE_INFER):
        assert key not in text   # neither in the audit trail nor anywhere in the log
    assert text.count('"audit":"vllm-steer"') >= 2 * len(lines)   # file + server log


def test_inline_vectors_within_the_operators_limit(srv):
    data = _vector_bytes(7)
    with httpx.Client(base_url=srv.url, timeout=300, headers=_headers("inference_file")) as c:
        _admin(c, "POST", "/v1/steering/vectors", params={"name": "inl", "scale": "6"},
               content=data)
        ADMIN_LOG.append(("upload", "admin_env", 201))

        def chat(vec: dict[str, Any]) -> httpx.Response:
            return c.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "Describe the sea."}],
                "max_tokens": 12, "temperature": 0, "steering": {"vectors": [vec]}})

        by_name = chat({"name": "inl"})
        inline = chat({"data": base64.b64encode(data).decode(), "scale": 6})
        plain = c.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "Describe the sea."}],
            "max_tokens": 12, "temperature": 0})
        texts = [r.json()["choices"][0]["message"]["content"] for r in (by_name, inline, plain)]
        assert texts[0] == texts[1] != texts[2], texts
        big = base64.b64encode(b"\0" * (INLINE_LIMIT + 1)).decode()
        r = chat({"data": big})
        assert r.status_code == 400 and r.json()["error"]["param"] == \
            "steering.vectors[0].data", r.text
        assert str(INLINE_LIMIT) in r.json()["error"]["message"]
        r = chat({"data": "not base64!"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].data"


def test_the_playground_asks_for_the_admin_key_only_for_admin_actions(srv, tmp_path,
                                                                     tmp_path_factory):
    from tests.browser_helpers import artifacts_dir, make_driver, require_browser
    from tests.test_playground import Page

    require_browser()
    shots = artifacts_dir(tmp_path_factory, "playground-admin")
    driver = make_driver(tmp_path_factory.mktemp("chromium-admin"))
    page = Page(driver, shots)
    try:
        driver.get(f"{srv.url}/steer")
        page.wait(lambda: page.el("#key-form").is_displayed(), "the API key form")
        assert not page.el("#admin-form").is_displayed()
        page.type("#api-key", FILE_INFER)
        page.click("#key-form button")
        page.wait(lambda: "connected" in page.text("#conn-status"), "connected")
        assert not page.el("#admin-form").is_displayed()   # reading needs no admin key
        f = tmp_path / "page_admin.safetensors"
        f.write_bytes(_vector_bytes(9))
        page.click("#upload summary")
        page.el("#up-file").send_keys(str(f))
        page.type("#up-name", "page_admin")
        page.click("#up-submit")
        page.wait(lambda: page.el("#admin-form").is_displayed(), "the admin key form")
        assert "admin key" in page.text("#upload-status")
        page.type("#admin-key", FILE_INFER)   # an inference key: refused (403)
        page.click("#admin-form button")
        err = page.wait(lambda: page.field_error("#admin-key"), "the refused key's error")
        assert "admin key" in err, err
        ADMIN_LOG.append(("upload", "inference_file", 403))
        page.type("#admin-key", FILE_ADMIN)
        page.click("#admin-form button")
        page.wait(lambda: "registered page_admin" in page.text("#upload-status"), "the upload")
        ADMIN_LOG.append(("upload", "admin_file", 201))
        row = page.wait(lambda: page.el('#vector-table tr[data-name="page_admin"]'), "its row")
        page.shot("admin-upload")
        delete = row.find_element("css selector", "button.danger-outline")
        delete.click()
        delete.click()   # confirm: the admin key given once is used again
        page.wait(lambda: not page.els('#vector-table tr[data-name="page_admin"]'), "deleted")
        ADMIN_LOG.append(("delete", "admin_file", 200))
        time.sleep(0.5)
        lines = _audit_lines(srv)[-3:]
        assert [(x["action"], x["key_id"], x["status"]) for x in lines] == \
            [("upload", "web", 403), ("upload", "ops", 201), ("delete", "ops", 200)]
    finally:
        driver.quit()

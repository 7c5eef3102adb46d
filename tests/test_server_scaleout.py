"""Several API-server processes in front of one engine, and data parallelism (two engine
cores, which vLLM serves with two API processes): registrations made through any process
are seen by all of them, under load, with outputs identical to a single-process server.

Three real ``vllm serve`` starts, one at a time: the single-process reference (run first,
then stopped), ``--api-server-count 2`` and ``--data-parallel-size 2``. The API processes
share one port (``SO_REUSEPORT``); a request on a new connection goes to either, and every
``/v1/steering/vectors`` response names the process that answered (``x-vllm-steer-pid``).
Figures of the load runs are printed (``-s``) and written to
``$VLLMSTEER_SCALEOUT_RESULTS`` when set.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_helpers import Server
from vllm_steer.fixtures.vectors import write_test_vectors
from vllm_steer.server.vectors import PID_HEADER

pytestmark = [pytest.mark.engine, pytest.mark.slow]

API_KEY = "sk-vllm-steer-scaleout"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 12
PROMPTS = [("cmpl", "The capital of France is"), ("cmpl", "Once upon a time"),
           ("chat", "Say something about the weather."), ("chat", "What is 17 times 3?")]
#: The versions "live" cycles through: (vector file, scale). Consecutive versions differ
#: in the scale only or in the file only, so a stale scale and a stale file both show.
VERSIONS = [("v1", 4.0), ("v1", 8.0), ("v3", 4.0), ("v3", -4.0)]
GONE = ("v2", 4.0)   # "gone" is registered and deleted in turns
CONFIGS = {"api2": ("--api-server-count", "2"), "dp2": ("--data-parallel-size", "2")}
FIGURES: dict[str, Any] = {}


# -- fixtures and helpers ----------------------------------------------------------------
def _start(default_model_dir: str, root: Path, extra_args: tuple[str, ...]) -> Server:
    reg = write_test_vectors(root)
    srv = Server(default_model_dir, reg, root / "server.log", API_KEY,
                 extra_args=extra_args)
    FIGURES.setdefault("startup_s", {})[" ".join(extra_args) or "single"] = \
        round(srv.start(), 1)
    return srv


def _vector_bytes(srv: Server, name: str) -> bytes:
    return (srv.registry.parent / "vectors" / f"{name}.safetensors").read_bytes()


def _fresh() -> httpx.Client:
    """A client that opens a new connection per request (so any API process answers)."""
    return httpx.Client(timeout=120, headers=AUTH,
                        limits=httpx.Limits(max_keepalive_connections=0))


async def _one_client_per_process(srv: Server, n: int) -> list[httpx.AsyncClient]:
    """``n`` clients, each holding one kept-alive connection to a different API process
    (which process accepts a new connection is the kernel's choice: under load one process
    can take every new connection, so changes over fresh connections may never reach the
    other)."""
    pinned: dict[str, httpx.AsyncClient] = {}
    for _ in range(40 * n):
        c = httpx.AsyncClient(timeout=180, headers=AUTH,
                              limits=httpx.Limits(max_connections=1,
                                                  max_keepalive_connections=1))
        r = await c.get(f"{srv.url}/v1/steering/vectors/v2")
        assert r.status_code == 200, r.text
        pid = r.headers[PID_HEADER]
        if pid in pinned or len(pinned) == n:
            await c.aclose()
        else:
            pinned[pid] = c
        if len(pinned) == n:
            return list(pinned.values())
    for c in pinned.values():
        await c.aclose()
    raise AssertionError(f"new connections reached only {sorted(pinned)} of {n} processes")


def _register(c: httpx.Client | httpx.AsyncClient, srv: Server, name: str,
              version: tuple[str, float]):
    return c.post(f"{srv.url}/v1/steering/vectors",
                  params={"name": name, "scale": version[1], "replace": "true"},
                  content=_vector_bytes(srv, version[0]),
                  headers={"Content-Type": "application/octet-stream"})


def _body(srv: Server, kind: str, prompt: str, target: str | None) -> tuple[str, dict]:
    body: dict[str, Any] = {"model": srv.model_dir, "max_tokens": MAX_TOKENS,
                            "temperature": 0}
    if target is not None:
        body["steering"] = {"vectors": [{"name": target}]}
    if kind == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user",
                                                              "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def _complete(client, srv: Server, kind: str, prompt: str, target: str | None) -> str:
    """One request through the official client; the generated text."""
    extra = {"steering": {"vectors": [{"name": target}]}} if target else {}
    kw = dict(model=srv.model_dir, max_tokens=MAX_TOKENS, temperature=0.0, extra_body=extra)
    if kind == "chat":
        r = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **kw)
        return r.choices[0].message.content or ""
    r = await client.completions.create(prompt=prompt, **kw)
    return r.choices[0].text


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


@pytest.fixture(scope="module")
def reference(default_model_dir, tmp_path_factory) -> dict[tuple, str]:
    """Outputs of a single-process server: (kind, prompt, version index | "gone" | None)."""
    srv = _start(default_model_dir, tmp_path_factory.mktemp("single"), ())
    out: dict[tuple, str] = {}
    try:
        with _fresh() as c:
            def run(kind: str, prompt: str, target: str | None) -> str:
                path, body = _body(srv, kind, prompt, target)
                return _text(c.post(srv.url + path, json=body))

            for key, version in [*enumerate(VERSIONS), ("gone", GONE)]:
                r = _register(c, srv, "ref", version)
                assert r.status_code == 201, r.text
                for kind, prompt in PROMPTS:
                    out[(kind, prompt, key)] = run(kind, prompt, "ref")
            for kind, prompt in PROMPTS:
                out[(kind, prompt, None)] = run(kind, prompt, None)
                out[(kind, prompt, "v2")] = run(kind, prompt, "v2")   # the registry file's
    finally:
        srv.stop()
    # every version gives its own output for every prompt, or a stale one could pass
    for kind, prompt in PROMPTS:
        texts = [out[(kind, prompt, k)] for k in [*range(len(VERSIONS)), "gone", None]]
        assert len(set(texts)) == len(texts), (prompt, texts)
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def server(request, reference, default_model_dir, tmp_path_factory):
    srv = _start(default_model_dir, tmp_path_factory.mktemp(request.param),
                 CONFIGS[request.param])
    srv.config = request.param
    yield srv
    srv.stop()
    out = os.environ.get("VLLMSTEER_SCALEOUT_RESULTS")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=2))
    print(f"\nscale-out figures ({request.param}):", json.dumps(FIGURES))


# -- tests -------------------------------------------------------------------------------
def test_every_process_sees_a_change_made_through_any_other(server, reference):
    """Register, replace and delete through new connections; after each call returned,
    requests on new connections (either process) see exactly the new state."""
    kind, prompt = PROMPTS[0]
    path, body = _body(server, kind, prompt, "fresh")
    with _fresh() as c:
        pids_changed, pids_read = set(), set()
        for i in (0, 1, 2):
            r = _register(c, server, "fresh", VERSIONS[i])
            assert r.status_code == 201, r.text
            pids_changed.add(r.headers[PID_HEADER])
            for _ in range(8):
                g = c.get(f"{server.url}/v1/steering/vectors/fresh")
                assert g.status_code == 200, g.text
                assert g.json()["default_scale"] == VERSIONS[i][1]
                pids_read.add(g.headers[PID_HEADER])
                assert _text(c.post(server.url + path, json=body)) == \
                    reference[(kind, prompt, i)]
        r = c.delete(f"{server.url}/v1/steering/vectors/fresh")
        assert r.status_code == 200, r.text
        pids_changed.add(r.headers[PID_HEADER])
        for _ in range(8):
            g = c.get(f"{server.url}/v1/steering/vectors/fresh")
            assert g.status_code == 404, g.text
            r = c.post(server.url + path, json=body)
            assert r.status_code == 400 and "unknown vector" in r.text, r.text
    assert len(pids_read) == 2, pids_read          # both processes answered
    FIGURES.setdefault(server.config, {})["change_pids"] = len(pids_changed)


@dataclass
class _Op:
    start: float
    end: float
    name: str
    state: Any   # "live": version index; "gone": True (registered) / False (deleted)
    pid: str = ""


@dataclass
class _Log:
    ops: list[_Op] = field(default_factory=list)
    done: bool = False

    def window(self, name: str, t_send: float, t_recv: float, initial: Any) -> tuple[Any, set]:
        """(the state committed before t_send, every state that may apply to a request
        sent at t_send and answered at t_recv)."""
        mine = [o for o in self.ops if o.name == name]
        before = [o for o in mine if o.end <= t_send]
        committed = before[-1].state if before else initial
        during = {o.state for o in mine if o.end > t_send and o.start < t_recv}
        return committed, {committed} | during


def test_load_with_changes_through_both_processes_matches_a_single_server(server, reference):
    """Many concurrent requests (official client) while "live" is replaced (new scale or
    new file) and "gone" registered/deleted through either process: no unknown vector for
    a registered name, no stale version, every output as on the single-process server."""
    import openai

    log = _Log()
    n_ops, workers = 24, 16
    targets = ["live", "gone", "v2", None]

    async def controller(clients: list[httpx.AsyncClient]) -> None:
        for k in range(n_ops):
            await asyncio.sleep(0.4)
            c = clients[k % len(clients)]   # the changes alternate between the processes
            if k % 2 == 0:
                v = (k // 2 + 1) % len(VERSIONS)
                t0 = time.monotonic()
                r = await _register(c, server, "live", VERSIONS[v])
                op = _Op(t0, time.monotonic(), "live", v)
            elif (k // 2) % 2 == 0:
                t0 = time.monotonic()
                r = await c.delete(f"{server.url}/v1/steering/vectors/gone")
                op = _Op(t0, time.monotonic(), "gone", False)
            else:
                t0 = time.monotonic()
                r = await _register(c, server, "gone", GONE)
                op = _Op(t0, time.monotonic(), "gone", True)
            assert r.status_code in (200, 201), r.text
            op.pid = r.headers[PID_HEADER]
            log.ops.append(op)
        log.done = True

    async def worker(client, w: int, results: list) -> None:
        i = w
        while not log.done:
            kind, prompt = PROMPTS[i % len(PROMPTS)]
            target = targets[(i // len(PROMPTS)) % len(targets)]
            i += workers
            t_send = time.monotonic()
            try:
                res: Any = await _complete(client, server, kind, prompt, target)
            except openai.BadRequestError as e:
                res = e
            except Exception as e:  # counted, reported
                res = e
            results.append((kind, prompt, target, t_send, time.monotonic(), res))

    async def go():
        async with httpx.AsyncClient(timeout=180, headers=AUTH) as pool, \
                httpx.AsyncClient(timeout=180, headers=AUTH,
                                  limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            r = await _register(fresh, server, "live", VERSIONS[0])
            assert r.status_code == 201, r.text
            r = await _register(fresh, server, "gone", GONE)
            assert r.status_code == 201, r.text
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY,
                                        max_retries=0, http_client=pool)
            results: list = []
            changers = await _one_client_per_process(server, 2)
            t0 = time.monotonic()
            try:
                await asyncio.gather(controller(changers),
                                     *(worker(client, w, results) for w in range(workers)))
            finally:
                for c in changers:
                    await c.aclose()
            wall = time.monotonic() - t0
            # which processes the load's pooled connections reached
            gets = await asyncio.gather(*(pool.get(f"{server.url}/v1/steering/vectors/v2")
                                          for _ in range(2 * workers)))
            return results, wall, {g.headers[PID_HEADER] for g in gets}

    results, wall, load_pids = asyncio.run(asyncio.wait_for(go(), 900))

    counts = {"requests": len(results), "unknown_vector": 0, "stale": 0, "mismatch": 0,
              "other_errors": 0, "refused_deleted": 0, "refused_while_deleting": 0}
    bad: list = []
    for kind, prompt, target, t_send, t_recv, res in results:
        if target in ("live", "gone"):
            committed, allowed = log.window(target, t_send, t_recv,
                                            0 if target == "live" else True)
        else:
            committed, allowed = target, {target}
        if isinstance(res, BaseException):
            unknown = "unknown vector" in str(res)
            if target == "gone" and False in allowed and unknown:
                # deleted before (must be refused) or while it was sent (may be)
                counts["refused_while_deleting" if len(allowed) > 1 else "refused_deleted"] += 1
                continue
            counts["unknown_vector" if unknown else "other_errors"] += 1
            bad.append((target, committed, allowed, repr(res)[:300]))
            continue
        if target == "live":
            want = {reference[(kind, prompt, v)] for v in allowed}
            older = {reference[(kind, prompt, v)] for v in range(len(VERSIONS))} - want
        elif target == "gone":
            want = {reference[(kind, prompt, "gone")]} if True in allowed else set()
            older = {reference[(kind, prompt, "gone")]} - want   # a deleted name answered
        else:
            want, older = {reference[(kind, prompt, target)]}, set()
        if res not in want:
            counts["stale" if res in older else "mismatch"] += 1
            bad.append((target, committed, allowed, res))
    counts.update(wall_s=round(wall, 1), changes=len(log.ops), workers=workers,
                  change_pids=len({o.pid for o in log.ops}), load_pids=len(load_pids),
                  tokens_per_request=MAX_TOKENS)
    FIGURES.setdefault(server.config, {})["load"] = counts
    print(f"\n{server.config}: {json.dumps(counts)}")
    assert counts["unknown_vector"] == 0 and counts["stale"] == 0, bad[:5]
    assert counts["mismatch"] == 0 and counts["other_errors"] == 0, bad[:5]
    assert counts["requests"] >= 100 and len(log.ops) == n_ops
    assert counts["change_pids"] == 2 and counts["load_pids"] == 2, counts
    assert server.alive()

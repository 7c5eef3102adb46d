"""The plugin's Prometheus metrics on a real server with two API processes, read through a
real Prometheus: the values are the ones the test's own traffic implies.

One ``vllm serve --api-server-count 2`` (both processes answer on one port; vLLM sums
their metrics through its multiprocess collector) and one Prometheus (Debian's package,
on loopback) scraping its ``/metrics`` every second. Each test takes the values before
and after its own traffic from Prometheus (PromQL through the HTTP API) and checks the
differences: requests by steering kind, errors by route and status, live-probe readings,
forks and their prompt tokens computed vs served from the prefix cache (against vLLM's
own per-request counters on the same scrape), early exits and the tokens they saved,
admin actions, collections, registered and resident vectors, a training job.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.prometheus_helpers import Prometheus, require_prometheus
from tests.server_helpers import Server
from vllm_steer import SteeringVector
from vllm_steer.fixtures.vectors import write_test_vectors
from vllm_steer.server.vectors import PID_HEADER

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ADMIN = "sk-metrics-admin-key"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
MODEL = "m"
#: Gauges are refreshed every second by each API process, and scraped every second.
SETTLE_S = 2.5


@dataclass
class Stack:
    server: Server
    prom: Prometheus
    root: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def stack(default_model_dir, tmp_path_factory) -> Iterator[Stack]:
    require_prometheus()   # before the engine: nothing to measure without it
    root = tmp_path_factory.mktemp("metrics")
    reg = write_test_vectors(root)
    srv = Server(default_model_dir, reg, root / "server.log", None, extra_env={
        "VLLMSTEER_ADMIN_KEY": ADMIN, "VLLMSTEER_METRICS_INTERVAL_S": "1",
        "VLLMSTEER_HOME": str(root / "home")},
        extra_args=("--api-server-count", "2", "--served-model-name", MODEL,
                    "--block-size", "32", "--enable-prompt-tokens-details"))
    srv.start()
    try:
        with Prometheus(root / "prometheus", [f"127.0.0.1:{srv.port}"]) as prom:
            yield Stack(srv, prom, root)
    finally:
        srv.stop()


def fresh() -> httpx.Client:
    """A client that opens a new connection per request (so either API process answers)."""
    return httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


class Snapshot:
    """Values of PromQL queries at one scrape (missing series: 0)."""

    def __init__(self, stack: Stack, queries: dict[str, str]) -> None:
        self.stack, self.queries = stack, queries
        t = stack.prom.scraped_after(time.time())
        self.values = {k: stack.prom.value(q, at=t) or 0.0 for k, q in queries.items()}

    def delta(self) -> dict[str, float]:
        """The differences to now, once the traffic's effects were scraped."""
        time.sleep(SETTLE_S)
        t = self.stack.prom.scraped_after(time.time())
        return {k: (self.stack.prom.value(q, at=t) or 0.0) - self.values[k]
                for k, q in self.queries.items()}


def q(name: str, **labels: str) -> str:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"sum({name}{{{sel}}})" if sel else f"sum({name})"


def chat(c: httpx.Client, url: str, steering: dict[str, Any] | None = None,
         **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user",
                                                         "content": "Tell me a fact."}],
                            "max_tokens": 4, "temperature": 0, **kw}
    if steering is not None:
        body["steering"] = steering
    return c.post(f"{url}/v1/chat/completions", json=body)


# -- requests by steering kind, errors by route and status --------------------------------
KIND_TRAFFIC: list[tuple[dict[str, Any] | None, tuple[str, ...]]] = [
    *[(None, ())] * 5,
    *[({"vectors": [{"name": "v1"}]}, ("add",))] * 4,
    *[({"vectors": [{"name": "v1", "op": "ablate"}]}, ("ablate",))] * 3,
    *[({"vectors": [{"name": "v3", "op": "clamp", "value": 1.0}]}, ("clamp",))] * 2,
    *[({"vectors": [{"name": "v1"}], "normalize": True}, ("add", "normalize"))] * 2,
    *[({"vectors": [{"name": "v1"}], "apply_to": "thinking"}, ("add", "thinking_phase"))] * 2,
    ({"vectors": [{"name": "v1"}, {"name": "v3", "op": "ablate"}]}, ("add", "ablate")),
]
KINDS = ("none", "add", "ablate", "clamp", "normalize", "thinking_phase")


def test_requests_by_steering_kind_and_errors_by_route(stack):
    queries = {f"kind:{k}": q("vllm_steer:requests_by_kind_total", kind=k) for k in KINDS}
    queries.update(steered=q("vllm_steer:requests_total", steering="steered"),
                   unsteered=q("vllm_steer:requests_total", steering="none"),
                   chat400=q("vllm_steer:http_errors_total", route="/v1/chat/completions",
                             status="400"),
                   get404=q("vllm_steer:http_errors_total",
                            route="/v1/steering/vectors/{name}", status="404"))
    snap = Snapshot(stack, queries)
    pids = set()
    with fresh() as c:
        for steering, _ in KIND_TRAFFIC:
            r = chat(c, stack.url, steering)
            assert r.status_code == 200, r.text
        for _ in range(3):   # refused by the steering hook: counted as errors, not requests
            r = chat(c, stack.url, {"vectors": [{"name": "no-such-vector"}]})
            assert r.status_code == 400, r.text
        for _ in range(2):
            r = c.get(f"{stack.url}/v1/steering/vectors/no-such-vector")
            assert r.status_code == 404
        for _ in range(12):
            pids.add(c.get(f"{stack.url}/v1/steering/vectors").headers[PID_HEADER])
    assert len(pids) == 2, pids   # both API processes answered
    d = snap.delta()
    for k in KINDS:
        want = sum(1 for _, kinds in KIND_TRAFFIC if k in kinds or (k == "none" and not kinds))
        assert d[f"kind:{k}"] == want, (k, d)
    assert d["steered"] == sum(1 for s, _ in KIND_TRAFFIC if s) == 14
    assert d["unsteered"] == 5
    assert (d["chat400"], d["get404"]) == (3, 2), d


#: distinct steering programs (vectors, ops, parameters, normalize; the phase ``apply_to``
#: selects is not part of the program): each running one holds a slot of the workers
PROGRAMS = [{"vectors": [{"name": "v1"}]}, {"vectors": [{"name": "v1", "op": "ablate"}]},
            {"vectors": [{"name": "v3", "op": "clamp", "value": 1.0}]},
            {"vectors": [{"name": "v1"}], "normalize": True},
            {"vectors": [{"name": "v1"}], "apply_to": "thinking"},   # same program as [0]
            {"vectors": [{"name": "v1", "scale": 2.0}]}]


def test_slots_and_resident_programs_while_requests_run(stack):
    """While six streams with five distinct programs run, the workers hold five programs
    in live slots; when they end, none."""
    distinct = 5
    stop = threading.Event()
    started = threading.Barrier(len(PROGRAMS) + 1, timeout=600)

    def stream(steering: dict[str, Any]) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True,
                "steering": steering}
        with httpx.Client(timeout=600) as c, \
                c.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as r:
            first = True
            for _ in r.iter_lines():
                if first:
                    started.wait()
                    first = False
                if stop.is_set():
                    break

    threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in PROGRAMS]
    for t in threads:
        t.start()
    try:
        started.wait()
        t0 = time.time()
        resident = live = None
        while time.time() - t0 < 60:
            t = stack.prom.scraped_after(time.time())
            resident = stack.prom.value('max(vllm_steer:vectors_resident{rank="0"})', at=t)
            live = stack.prom.value('max(vllm_steer:slots_live{rank="0"})', at=t)
            if (resident, live) == (distinct, distinct):
                break
        assert (resident, live) == (distinct, distinct)
        # max_num_seqs (vLLM's default on the CPU, 128) + the no-steering slot
        assert stack.prom.value('max(vllm_steer:slots{rank="0"})') == 129
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    t0 = time.time()
    while time.time() - t0 < 60:   # the aborted streams release their slots
        t = stack.prom.scraped_after(time.time())
        if stack.prom.value('max(vllm_steer:vectors_resident{rank="0"})', at=t) == 0:
            break
    assert stack.prom.value('max(vllm_steer:slots_live{rank="0"})', at=t) == 0
    assert stack.prom.value('max(vllm_steer:vectors_resident{rank="0"})', at=t) == 0


# -- live probes: readings, forks, their prompt tokens against vLLM's own counters ----------
PROBE = {"choices": ["Yes", "No"], "every": 8}


def probed(c: httpx.Client, url: str, probe: dict[str, Any], max_tokens: int,
           question: str) -> dict[str, Any]:
    r = c.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "probe": probe})
    assert r.status_code == 200, r.text
    return r.json()


QUESTIONS = ["Is the sky blue?", "Is fire cold?", "Do fish swim?", "Can a cat fly?"]


def test_probe_readings_forks_and_their_cached_tokens(stack):
    queries = {"readings": q("vllm_steer:probe_readings_total", source="live"),
               "probed": q("vllm_steer:probe_requests_total"),
               "forks": q("vllm_steer:probe_fork_requests_total"),
               "computed": q("vllm_steer:probe_fork_prompt_tokens_total", source="computed"),
               "cached": q("vllm_steer:probe_fork_prompt_tokens_total", source="cached"),
               "running": q("vllm_steer:probe_fork_requests_running"),
               # vLLM's own accounting of every finished request
               "vllm_requests": q("vllm:request_success_total"),
               "vllm_prompt": q("vllm:request_prompt_tokens_sum"),
               "vllm_computed": q("vllm:request_prefill_kv_computed_tokens_sum")}
    snap = Snapshot(stack, queries)
    readings = main_prompt = main_computed = 0
    with fresh() as c:
        for question in QUESTIONS[:3]:
            out = probed(c, stack.url, PROBE, 24, question)
            readings += len(out["choices"][0]["probe_readings"])
            u = out["usage"]
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            main_prompt += u["prompt_tokens"]
            main_computed += u["prompt_tokens"] - cached
    d = snap.delta()
    assert d["probed"] == 3 and d["readings"] == readings > 3, d
    forks = d["vllm_requests"] - 3   # every finished request but the three probed ones
    assert d["forks"] == forks > 0, d
    assert d["computed"] + d["cached"] == d["vllm_prompt"] - main_prompt, d
    assert d["computed"] == d["vllm_computed"] - main_computed, d
    assert d["cached"] > 0, d   # forks share the trajectory's KV through the prefix cache
    assert d["running"] == 0


def test_early_exits_and_the_tokens_they_saved(stack):
    max_tokens = 48
    probe = {**PROBE, "every": 4,
             "stop_when": {"threshold": 0.5, "consecutive": 1, "min_mass": 0.01}}
    queries = {"exits": q("vllm_steer:probe_early_exits_total"),
               "saved": q("vllm_steer:probe_early_exit_tokens_saved_total"),
               "readings": q("vllm_steer:probe_readings_total", source="live")}
    snap = Snapshot(stack, queries)
    exits = saved = readings = 0
    with fresh() as c:
        for question in QUESTIONS:
            ch = probed(c, stack.url, probe, max_tokens, question)["choices"][0]
            readings += len(ch["probe_readings"])
            stop = ch.get("probe_stop")
            if stop is not None:
                exits += 1
                saved += max_tokens - (len(ch["token_ids"]) - len(stop["appended_token_ids"]))
    d = snap.delta()
    assert exits >= 2, "the probes should settle early (threshold 0.5 of two choices)"
    assert (d["exits"], d["saved"], d["readings"]) == (exits, saved, readings), d
    assert saved > 0


# -- admin actions, the store, a training job ---------------------------------------------
def _vector_file(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    v = SteeringVector({i: 0.2 * torch.randn(576, generator=g) for i in (8, 9, 10)})
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        v.save(str(p))
        return p.read_bytes()


def _store_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in (root / "home" / "store").rglob("*.f32")]
    return len(files), sum(p.stat().st_size for p in files)


def _leftover(path: Path) -> None:
    """What a killed writer leaves: an unlocked temporary file, older than a second."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 1000)
    old = time.time() - 10
    os.utime(path, (old, old))


def test_admin_actions_store_and_training(stack):
    queries = {"registered": q("vllm_steer:vectors_registered", origin="registered"),
               "config": q("vllm_steer:vectors_registered", origin="config"),
               "uploads": q("vllm_steer:admin_actions_total", action="upload", status="201"),
               "bad_upload": q("vllm_steer:admin_actions_total", action="upload",
                               status="400"),
               "upload400": q("vllm_steer:http_errors_total", route="/v1/steering/vectors",
                              status="400"),
               "deletes": q("vllm_steer:admin_actions_total", action="delete", status="200"),
               "denied": q("vllm_steer:admin_actions_total", action="delete", status="401"),
               "collect": q("vllm_steer:admin_actions_total", action="collect", status="200"),
               "collections": q("vllm_steer:store_collections_total"),
               "deleted": q("vllm_steer:store_deleted_files_total"),
               "freed": q("vllm_steer:store_freed_bytes_total"),
               "train_ok": q("vllm_steer:train_jobs_total", outcome="ok"),
               "train_total": q("vllm_steer:train_job_seconds_count", phase="total"),
               "train_seconds": q("vllm_steer:train_job_seconds_sum", phase="total"),
               "capture": q("vllm_steer:capture_requests_total"),
               "capture_tokens": q("vllm_steer:capture_prompt_tokens_total")}
    snap = Snapshot(stack, queries)
    with fresh() as c:
        for i in range(3):
            r = c.post(f"{stack.url}/v1/steering/vectors", params={"name": f"m{i}"},
                       content=_vector_file(i), headers=ADMIN_H)
            assert r.status_code == 201, r.text
        r = c.post(f"{stack.url}/v1/steering/vectors", params={"name": "bad"},
                   content=b"not a vector file", headers=ADMIN_H)
        assert r.status_code == 400
        assert c.delete(f"{stack.url}/v1/steering/vectors/m2").status_code == 401
        assert c.delete(f"{stack.url}/v1/steering/vectors/m2", headers=ADMIN_H).status_code \
            == 200
        uploads = stack.root / "uploads"
        for name in (".upload-0123456789abcdef0123456789abcdef.tmp",
                     f".{'ab' * 32}.f32.1.deadbeef.tmp"):
            _leftover((uploads if name.startswith(".upload") else
                       stack.root / "home" / "store" / "ab") / name)
        r = c.post(f"{stack.url}/v1/steering/store/collect", headers=ADMIN_H)
        assert r.status_code == 200, r.text
        collected = r.json()
        assert collected["deleted"] >= 2 and collected["freed_bytes"] >= 2000
        r = c.post(f"{stack.url}/v1/steering/vectors/train", headers=ADMIN_H, json={
            "name": "trained", "personas": [["cheerful", "gloomy"], ["joyful", "sad"]],
            "suffixes": ["Tell me about your day.", "How are you?"], "layers": [10]})
        assert r.status_code == 201, r.text
        training = r.json()["training"]
    d = snap.delta()
    assert (d["registered"], d["uploads"], d["bad_upload"], d["upload400"]) == (3, 3, 1, 1), d
    assert (d["deletes"], d["denied"], d["collect"], d["train_ok"], d["train_total"]) == \
        (1, 1, 1, 1, 1), d
    assert d["config"] == 0   # unchanged
    registered = stack.prom.value(q("vllm_steer:vectors_registered"))
    with fresh() as c:
        listed = c.get(f"{stack.url}/v1/steering/vectors").json()["data"]
    assert registered == len(listed)
    assert d["collections"] >= 1 and d["deleted"] >= collected["deleted"]
    assert d["freed"] >= collected["freed_bytes"]
    assert d["capture"] == training["capture_requests"] > 0
    assert d["capture_tokens"] == training["capture_prompt_tokens"]
    assert 0 < d["train_seconds"] <= training["seconds"]["total"] + 1
    files, size = _store_bytes(stack.root)
    time.sleep(SETTLE_S)
    t = stack.prom.scraped_after(time.time())
    assert stack.prom.value(q("vllm_steer:store_files"), at=t) == files
    assert stack.prom.value(q("vllm_steer:store_bytes"), at=t) == size


def test_every_series_is_the_same_from_either_process(stack):
    """Each API process answers /metrics with the sums over both (the multiprocess
    collector), not its own share: many scrapes on fresh connections agree."""
    seen = set()
    with fresh() as c:
        for _ in range(16):
            text = c.get(f"{stack.url}/metrics").text
            lines = sorted(x for x in text.splitlines() if x.startswith("vllm_steer:")
                           and "_created" not in x and "running" not in x)
            seen.add(hashlib.sha256("\n".join(lines).encode()).hexdigest())
    assert len(seen) == 1



def test_the_dashboard_queries_run_on_prometheus_and_name_served_metrics(stack):
    """docs/grafana/vllm-steer.json: every panel's PromQL is valid (Prometheus's HTTP API
    evaluates it), every ``vllm_steer:`` / ``vllm:`` series it names is served on
    ``/metrics``, and the panels of this test's traffic show data."""
    import json
    import re

    dash = json.loads((Path(__file__).resolve().parents[1] / "docs" / "grafana" /
                       "vllm-steer.json").read_text())
    served = {line.split("{")[0].split(" ")[0]
              for line in httpx.get(f"{stack.url}/metrics", timeout=60).text.splitlines()
              if line and not line.startswith("#")}
    empty = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "5m")
            for name in re.findall(r"\b(vllm(?:_steer)?:[a-z_]+)", expr):
                assert name in served, (p["title"], name)
            if not stack.prom.query(expr):
                empty.append(p["title"])
    must_show = {"Requests by steering kind", "Probe readings and forks", "Store size",
                 "Errors by route and status", "Vectors registered"}
    assert not must_show & set(empty), empty

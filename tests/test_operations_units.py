"""Operations pieces without an engine: keys and roles, the audit line, steering kinds,
the training budget's pacing, inline vectors in the resolver, leftovers of killed writers,
the metrics' fork accounting and worker gauges, and `vllm-steer serve`'s options."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from starlette.requests import Request

from vllm_steer import SteeringVector
from vllm_steer.atomic_files import sweep_temporaries, temp_file
from vllm_steer.extract.capture_budget import CaptureBudget, Pacer
from vllm_steer.server import auth
from vllm_steer.server.common import SteerHTTPError, authorize
from vllm_steer.steering.kinds import KINDS, kinds_of
from vllm_steer.steering.registry import Registry
from vllm_steer.steering.resolve import Resolver, inline_limit
from vllm_steer.steering.spec import SpecError, parse_spec

ADMIN, INFER = "sk-admin-key-units", "sk-infer-key-units"


# -- keys and roles ------------------------------------------------------------------------
def _ring(tmp_path: Path, vllm_keys=(INFER,), **env: str) -> auth.KeyRing:
    return auth.from_environment(env).with_vllm_keys(vllm_keys)


def test_keys_file_roles_ids_and_sha256(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - {{id: ops, role: admin, sha256: "
                 f"{hashlib.sha256(b'sk-ops-admin-1').hexdigest()}}}\n"
                 "  - {id: web, role: inference, key: sk-web-infer-1}\n")
    ring = _ring(tmp_path, VLLMSTEER_KEYS_FILE=str(f), VLLMSTEER_ADMIN_KEY=ADMIN)
    assert ring.admin_configured and ring.inference_guarded
    assert (ring.match("sk-ops-admin-1").id, ring.match("sk-ops-admin-1").role) == \
        ("ops", "admin")
    assert ring.match("sk-web-infer-1").role == "inference"
    assert ring.match(ADMIN).id == auth.ENV_ADMIN_ID
    assert ring.match(INFER).id == auth.fingerprint(INFER) != INFER
    assert ring.match("sk-nobody") is None and ring.match(None) is None
    assert INFER not in auth.describe(ring) and ADMIN not in auth.describe(ring)


@pytest.mark.parametrize("text,field", [
    ("keys: [{id: a, role: root, key: sk-12345678}]", "role"),
    ("keys: [{id: a, role: admin}]", "exactly one of 'key' or 'sha256'"),
    ("keys: [{id: a, role: admin, key: short}]", "key"),
    ("keys: [{id: a, role: admin, sha256: abc}]", "sha256"),
    ("keys: [{id: a, role: admin, key: sk-12345678, extra: 1}]", "extra"),
    ("keys: [{id: a, role: admin, key: sk-12345678}, {id: a, role: admin, "
     "key: sk-87654321}]", "more than once"),
    ("[]", "'keys'"),
])
def test_bad_keys_files_are_refused_naming_the_field(tmp_path, text, field):
    f = tmp_path / "keys.yaml"
    f.write_text(text)
    with pytest.raises(auth.KeyConfigError, match=field):
        auth.read_keys_file(f)


def test_file_inference_keys_need_vllms_api_key(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys: [{id: web, role: inference, key: sk-web-infer-1}]\n")
    with pytest.raises(auth.KeyConfigError, match="--api-key"):
        auth.check_inference_guard(_ring(tmp_path, vllm_keys=(), VLLMSTEER_KEYS_FILE=str(f)))
    auth.check_inference_guard(_ring(tmp_path, VLLMSTEER_KEYS_FILE=str(f)))


def _request(ring: auth.KeyRing, key: str | None) -> Request:
    from types import SimpleNamespace

    from vllm_steer.server.common import KEYS_STATE

    app = SimpleNamespace(state=SimpleNamespace(**{KEYS_STATE: ring}))
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return Request({"type": "http", "app": app, "headers": headers, "method": "POST",
                    "path": "/", "query_string": b""})


@pytest.mark.parametrize("admin_configured", [True, False])
@pytest.mark.parametrize("inference_guarded", [True, False])
def test_the_roles_rules(tmp_path, admin_configured, inference_guarded):
    env = {"VLLMSTEER_ADMIN_KEY": ADMIN} if admin_configured else {}
    ring = _ring(tmp_path, vllm_keys=(INFER,) if inference_guarded else (), **env)

    def status(role: str, key: str | None) -> int:
        try:
            authorize(_request(ring, key), role)
            return 200
        except SteerHTTPError as e:
            return e.status

    keys = {"none": None, "unknown": "sk-unknown-123", "infer": INFER, "admin": ADMIN}
    got = {(role, k): status(role, v) for role in ("inference", "admin")
           for k, v in keys.items()}
    open_inference = not inference_guarded
    for k in keys:
        known = (k == "infer" and inference_guarded) or (k == "admin" and admin_configured)
        assert got[("inference", k)] == (200 if known or open_inference else 401), (k, got)
        if admin_configured:
            want = 200 if k == "admin" else 403 if known else 401
        else:   # as before roles existed: the inference rule
            want = 200 if known or open_inference else 401
        assert got[("admin", k)] == want, (k, got)


def test_an_audit_line_names_the_key_id_never_the_key(tmp_path, monkeypatch, caplog):
    from vllm_steer.server import audit

    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv("VLLMSTEER_AUDIT_LOG", str(path))
    line = audit.record("delete", auth.Caller("ops", "admin"), 200, vector="x",
                        digest=audit.bytes_digest(b"abc"))
    on_disk = json.loads(path.read_text())
    assert on_disk == line and line["digest"] == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert {k: line[k] for k in ("action", "vector", "key_id", "role", "status")} == \
        {"action": "delete", "vector": "x", "key_id": "ops", "role": "admin", "status": 200}


# -- steering kinds --------------------------------------------------------------------------
def test_kinds_of_a_spec():
    def kinds(raw):
        return kinds_of(parse_spec(raw))

    assert kinds_of(None) == () and set(KINDS) >= {"none", "add", "thinking_phase"}
    assert kinds({"vectors": [{"name": "a"}]}) == ("add",)
    assert kinds({"vectors": [{"name": "a", "op": "ablate"}, {"name": "b", "op": "clamp"}],
                  "normalize": True, "apply_to": "answer"}) == \
        ("ablate", "clamp", "normalize", "thinking_phase")
    assert kinds({"vectors": [{"name": "a"}], "apply_to": "generated"}) == ("add",)


def test_kinds_come_from_the_registry_defaults_once_resolved(reg_file):
    reg = Registry.from_yaml(reg_file)
    reg.register("abl", reg_file.parent / "vectors" / "a.safetensors", op="ablate")
    res = Resolver(reg, num_layers=4, hidden_size=4, store_root=reg_file.parent / "store")
    spec = parse_spec({"vectors": [{"name": "abl"}]})
    assert kinds_of(spec) == ("add",)   # the spec alone does not know the default op
    assert kinds_of(spec, res.resolve(spec, 0)) == ("ablate",)


# -- the training budget ----------------------------------------------------------------------
def test_pacer_bursts_by_computed_tokens_and_concurrency():
    seen: list[int] = []   # the burst each job ran in

    async def no_sleep(s: float) -> None:
        pass

    async def job(item: int) -> tuple[int, int]:
        seen.append(pacer.bursts)
        return item * 10, 25   # of each 100-token prompt the engine computes 25

    pacer = Pacer(CaptureBudget(engine_share=0.5, burst_tokens=100), max_concurrent=3,
                  sleep=no_sleep)
    out = asyncio.run(pacer.run(list(range(10)), lambda _: 100, job))
    assert out == [i * 10 for i in range(10)]
    # the first burst knows nothing of the cache: one 100-token prompt; then 25 computed
    # tokens per request: 4 would fit the budget, 3 may be in flight
    assert [seen.count(b) for b in range(pacer.bursts)] == [1, 3, 3, 3]
    assert pacer.report()["computed_prompt_tokens"] == 250


def test_pacer_waits_three_times_the_busy_time_at_a_quarter_share():
    t = [0.0]
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)
        t[0] += s

    async def job(item: int) -> tuple[None, int]:
        t[0] += 1.0   # (gathered jobs run in turn on this fake clock)
        return None, 10

    pacer = Pacer(CaptureBudget(0.25, 1), clock=lambda: t[0], sleep=sleep)
    asyncio.run(pacer.run([1, 2, 3], lambda _: 10, job))
    assert waits == [3.0, 3.0]   # after every burst but the last: 1 s busy, 3 s idle
    unpaced = Pacer(CaptureBudget(1.0, 1000), clock=lambda: t[0], sleep=sleep)
    waits.clear()
    asyncio.run(unpaced.run([1, 2, 3], lambda _: 10, job))
    assert waits == [] and unpaced.bursts == 1


@pytest.mark.parametrize("env,match", [({"VLLMSTEER_TRAIN_ENGINE_SHARE": "0"}, "SHARE"),
                                       ({"VLLMSTEER_TRAIN_ENGINE_SHARE": "x"}, "SHARE"),
                                       ({"VLLMSTEER_TRAIN_BURST_TOKENS": "0"}, "BURST")])
def test_budget_from_the_environment_names_a_bad_variable(env, match):
    assert CaptureBudget.from_environment({}) == CaptureBudget()
    assert CaptureBudget.from_environment({"VLLMSTEER_TRAIN_ENGINE_SHARE": "0.5"}
                                          ).engine_share == 0.5
    with pytest.raises(ValueError, match=match):
        CaptureBudget.from_environment(env)


# -- inline vectors ---------------------------------------------------------------------------
def _b64(v: SteeringVector, tmp_path: Path) -> str:
    p = tmp_path / "inline.safetensors"
    v.save(str(p))
    return base64.b64encode(p.read_bytes()).decode()


def test_inline_vectors_only_where_allowed_and_within_the_limit(reg_file, tmp_path):
    reg = Registry.from_yaml(reg_file)
    data = _b64(SteeringVector({1: torch.ones(4)}), tmp_path)
    spec = parse_spec({"vectors": [{"data": data, "scale": 2.0}]})
    off = Resolver(reg, num_layers=4, hidden_size=4, store_root=tmp_path / "store")
    with pytest.raises(SpecError, match="not enabled") as e:
        off.resolve(spec, 0)
    assert e.value.field == "steering.vectors[0].data"
    on = Resolver(reg, num_layers=4, hidden_size=4, store_root=tmp_path / "store",
                  inline_max_bytes=100_000)
    by_name = on.resolve(parse_spec({"vectors": [{"name": "a", "scale": 2.0}]}), 0)
    assert on.resolve(spec, 0).digest == by_name.digest   # a.safetensors holds ones(4) too
    small = Resolver(reg, num_layers=4, hidden_size=4, store_root=tmp_path / "store",
                     inline_max_bytes=16)
    for bad, match in ((spec, "limit"),
                       (parse_spec({"vectors": [{"data": "%%%"}]}), "base64"),
                       (parse_spec({"vectors": [{"data": base64.b64encode(b"junk").decode()}]}),
                        "not a valid vector file"),
                       (parse_spec({"vectors": [{"data": _b64(SteeringVector(
                           {1: torch.ones(8)}), tmp_path)}]}), "does not fit")):
        r = small if match == "limit" else on
        with pytest.raises(SpecError, match=match) as e:
            r.resolve(bad, 0)
        assert e.value.field == "steering.vectors[0].data"
    with pytest.raises(SpecError, match="exactly one"):
        parse_spec({"vectors": [{"name": "a", "data": data}]})
    assert inline_limit({}) is None and inline_limit(
        {"VLLMSTEER_INLINE_VECTOR_MAX_BYTES": "10"}) == 10
    with pytest.raises(ValueError, match="INLINE"):
        inline_limit({"VLLMSTEER_INLINE_VECTOR_MAX_BYTES": "-1"})


# -- what killed writers leave ---------------------------------------------------------------
def _old(p: Path) -> Path:
    os.utime(p, (time.time() - 10, time.time() - 10))
    return p


def test_sweep_deletes_dead_writers_temporaries_only(tmp_path):
    dead = tmp_path / ".a.tmp"
    dead.write_bytes(b"x")
    _old(dead)
    young = tmp_path / ".b.tmp"
    young.write_bytes(b"y")
    other = tmp_path / "keep.bin"
    other.write_bytes(b"k")
    _old(other)
    with temp_file(tmp_path / ".live.tmp") as live:
        live.write_bytes(b"z")
        _old(live)
        assert sweep_temporaries(tmp_path, lambda n: True) == (1, 1)
        assert live.exists() and young.exists() and other.exists() and not dead.exists()
    assert not live.exists()   # removed by its writer


def test_collect_uploads_removes_orphans_and_temporaries_keeps_the_rest(reg_file):
    from tests.steer_helpers import upload_tiny

    reg = Registry.from_yaml(reg_file)
    up = reg.ensure_upload_dir()
    kept = upload_tiny(reg, "x-0123456789ab")
    reg.register("x", kept)
    retired = upload_tiny(reg, "y-0123456789ab")
    reg.register("y", retired)
    reg.register("y", kept, replace=True)   # retired, not an orphan (60 s grace)
    orphan = upload_tiny(reg, "z-0123456789ab")   # published, never registered
    tmp = up / ".upload-00000000000000000000000000000000.tmp"
    tmp.write_bytes(b"half")
    _old(tmp)
    deleted, freed = reg.collect_uploads()
    assert deleted == 2 and freed > 4
    assert kept.exists() and retired.exists() and not orphan.exists() and not tmp.exists()
    assert (up / "registry.overlay.yaml").exists() and (up / ".registry.overlay.lock").exists()


def test_the_store_collection_sweeps_temporaries_whatever_their_age(tmp_path):
    from vllm_steer.steering.store import VectorStore

    store = VectorStore(tmp_path)
    cid = store.put({0: torch.ones(4).numpy()})
    leftover = store.path(cid).parent / f".{cid}.f32.123.deadbeef.tmp"
    leftover.write_bytes(b"partial")   # fresh: a killed writer's, the lock is free
    done = store.collect({cid}, grace_s=3600)
    assert not leftover.exists() and store.path(cid).exists() and done.deleted == 1
    assert store.usage() == (1, store.path(cid).stat().st_size)


# -- metrics ----------------------------------------------------------------------------------
def _value(metric, **labels) -> float:
    return metric.labels(**labels)._value.get() if labels else metric._value.get()


def test_fork_tokens_count_only_forks_of_this_process():
    from vllm_steer.server import metrics

    before = (_value(metrics.PROBE_FORK_TOKENS, source="computed"),
              _value(metrics.PROBE_FORK_TOKENS, source="cached"), _value(metrics.PROBE_FORKS))
    metrics.fork_submitted("req-1-probe-0-abc")
    metrics.request_finished("req-1-probe-0-abc", 40, 32)
    metrics.request_finished("req-1-probe-0-abc", 40, 32)   # once only
    metrics.request_finished("some-other-request", 100, 0)
    after = (_value(metrics.PROBE_FORK_TOKENS, source="computed"),
             _value(metrics.PROBE_FORK_TOKENS, source="cached"), _value(metrics.PROBE_FORKS))
    assert [a - b for a, b in zip(after, before, strict=True)] == [8, 32, 1]


def test_worker_gauges_are_per_rank_never_summed():
    from vllm_steer.server import metrics

    st = {"num_slots": 129, "live_digests": 2, "resident": 3, "table_bytes": 1000}
    metrics.set_workers([st, dict(st), None])   # tensor parallel: two ranks, same state
    for rank in ("0", "1"):
        assert _value(metrics.VECTORS_RESIDENT, rank=rank) == 3
        assert _value(metrics.SLOTS_LIVE, rank=rank) == 2


def test_count_request_by_kind():
    from vllm_steer.server import metrics

    def get():
        return (_value(metrics.REQUESTS, steering="steered"),
                _value(metrics.REQUESTS, steering="none"),
                _value(metrics.REQUESTS_BY_KIND, kind="none"),
                _value(metrics.REQUESTS_BY_KIND, kind="add"),
                _value(metrics.REQUESTS_BY_KIND, kind="normalize"))

    before = get()
    metrics.count_request(())
    metrics.count_request(("add", "normalize"))
    assert [a - b for a, b in zip(get(), before, strict=True)] == [1, 1, 1, 1, 1]


# -- vllm-steer serve --------------------------------------------------------------------------
def test_serve_says_when_there_is_no_admin_key_and_passes_the_options(capsys, monkeypatch,
                                                                      default_model_dir):
    from vllm_steer.cli import main

    monkeypatch.delenv("VLLMSTEER_ADMIN_KEY", raising=False)
    monkeypatch.delenv("VLLMSTEER_KEYS_FILE", raising=False)
    assert main(["serve", "--print-command", "--model", default_model_dir,
                 "--steering-inline-vectors", "4096", "--steering-train-share", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "no steering admin key" in err
    assert "VLLMSTEER_INLINE_VECTOR_MAX_BYTES=4096" in out
    assert "VLLMSTEER_TRAIN_ENGINE_SHARE=0.5" in out and "vllm_steer_metrics" in out
    assert main(["serve", "--print-command", "--model", default_model_dir,
                 "--steering-admin-key", ADMIN]) == 0
    out, err = capsys.readouterr()
    assert "no steering admin key" not in err and ADMIN not in out   # never printed
    assert main(["serve", "--print-command", "--steering-admin-key", "short"]) == 2
    assert "VLLMSTEER_ADMIN_KEY" in capsys.readouterr().err


def test_metrics_refresh_asks_the_workers_only_after_activity(monkeypatch):
    """An idle process does not ask the workers every interval (each RPC holds vLLM's
    workers in a busy-wait for a second): only after a request was admitted or engine
    outputs arrived, or after ``IDLE_REFRESH_S``."""
    from types import SimpleNamespace

    from vllm_steer.server import metrics, metrics_refresh
    from vllm_steer.vllm_adapter import stat_logger

    calls: list[float] = []

    class Engine:
        async def collective_rpc(self, method: str) -> list[dict]:
            assert method == "vllm_steer_stats"
            calls.append(time.monotonic())
            return [None]

    store = SimpleNamespace(usage=lambda: (0, 0))
    ctx = SimpleNamespace(registry=SimpleNamespace(entries={}),
                          resolver=SimpleNamespace(store=store), engine_client=Engine())
    monkeypatch.setattr(metrics, "set_workers", lambda stats: None)

    async def run(seconds: float, during=None) -> int:
        before = len(calls)
        task = asyncio.ensure_future(metrics_refresh.refresh_loop(ctx, 0.01))
        try:
            await asyncio.sleep(seconds / 2)
            if during is not None:
                during()
            await asyncio.sleep(seconds / 2)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return len(calls) - before

    monkeypatch.setattr(metrics_refresh, "IDLE_REFRESH_S", 3600.0)
    assert asyncio.run(run(0.3)) == 1                  # once at start, then idle
    outputs = lambda: setattr(stat_logger, "batches", stat_logger.batches + 1)  # noqa: E731
    assert asyncio.run(run(0.3, outputs)) == 2         # start + the engine's outputs
    assert asyncio.run(run(0.3, lambda: metrics.count_request(()))) == 2   # admission
    monkeypatch.setattr(metrics_refresh, "IDLE_REFRESH_S", 0.05)
    assert asyncio.run(run(0.4)) >= 4                  # idle, but re-asked now and then

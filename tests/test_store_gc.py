"""Collection of the content-addressed vector store (``steering.store``, ``store_gc``).

No engine: a real registry file, real resolvers (the frontend's code) and real store
files; a "worker" is a reader thread with its own uncached ``VectorStore`` that reads each
admitted request's vectors by id some time after admission, as vLLM's workers do when the
request is first scheduled. Several API processes are real processes.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import queue
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_steer import SteeringVector, envvars
from vllm_steer.steering import store_gc
from vllm_steer.steering.registry import Registry
from vllm_steer.steering.resolve import Resolver
from vllm_steer.steering.spec import parse_spec
from vllm_steer.steering.store import (
    LOCK_NAME,
    StoreError,
    VectorStore,
    content_id,
    store_grace_s,
)

L, H = 4, 8
GRACE = 1.0             # the churn tests' grace period (s): $VLLMSTEER_STORE_GRACE_S
INTERVAL = 0.1          # and the collector's minimum interval
#: How long a vector is guaranteed to stay after a request naming it was admitted: the
#: grace period less the frontends' renewal interval (GRACE / 10), less 20 ms for the
#: file system's coarse clock
LEASE = GRACE * 0.9 - 0.02
#: The reader (worker) reads a request's vectors up to this long after admission
READ_DELAY = 0.3


def _dirs(seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal(H).astype(np.float32) for i in range(L)}


def _files(root: Path) -> set[str]:
    return {p.name[:-4] for p in root.glob("??/*.f32")}


def _age(store: VectorStore, cid: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(store.path(cid), (t, t))


# -- the store's protocol ------------------------------------------------------------------
def test_collect_deletes_only_unreferenced_content_older_than_the_grace_period(tmp_path):
    store = VectorStore(tmp_path / "store", touch_every_s=0)
    old_kept, old_gone, young = (store.put(_dirs(s)) for s in (1, 2, 3))
    for cid in (old_kept, old_gone):
        _age(store, cid, 100)
    stale_tmp = store.path(old_gone).with_name(f".{old_gone}.f32.123.456.tmp")
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (time.time() - 100,) * 2)
    foreign = store.root / "ab" / "notes.txt"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_text("not the store's")
    os.utime(foreign, (0, 0))
    done = store.collect({old_kept}, grace_s=10)
    assert _files(store.root) == {old_kept, young}
    assert not stale_tmp.exists() and foreign.exists()
    assert (done.deleted, done.kept, done.pending) == (2, 2, 1)
    assert done.next_s is not None and 9 < done.next_s <= 10  # when `young` may go
    assert store.collect({old_kept, young}, grace_s=10).next_s is None


def test_a_renewal_between_scan_and_sweep_keeps_the_file(tmp_path):
    """The race of a frontend admitting a request with the collector: the collector's
    scan saw an old lease, a frontend (another process) renewed it, then the sweep."""
    store = VectorStore(tmp_path / "store")
    d = _dirs(1)
    cid = store.put(d)
    _age(store, cid, 100)
    cutoff = time.time() - 10
    out, candidates = store.scan(set(), cutoff)
    assert candidates == [store.path(cid)]
    VectorStore(store.root).ensure(cid, d)        # the other process's frontend
    store.sweep(candidates, cutoff, out)
    assert out.deleted == 0 and _files(store.root) == {cid}


def test_a_frontend_after_a_collection_writes_the_vector_again(tmp_path):
    store = VectorStore(tmp_path / "store")
    d = _dirs(1)
    cid = store.put(d)
    _age(store, cid, 100)
    assert store.collect(set(), grace_s=10).deleted == 1
    frontend = VectorStore(store.root)
    frontend.ensure(cid, d)
    assert np.array_equal(VectorStore(store.root, cache_bytes=0).get(cid)[2], d[2])


def test_a_collector_waits_for_a_frontend_holding_the_lock(tmp_path):
    store = VectorStore(tmp_path / "store")
    cid = store.put(_dirs(1))
    _age(store, cid, 100)
    fd = os.open(store.root / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)                # a frontend in the middle of `ensure`
    worker = threading.Thread(target=store.collect, args=(set(), 10))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and _files(store.root) == {cid}
    os.close(fd)
    worker.join(10)
    assert not worker.is_alive() and _files(store.root) == set()


def test_a_renewed_lease_lasts_the_grace_period_less_the_renewal_interval(tmp_path):
    """A frontend renews a vector at most every ``touch_every_s``; in between, a request
    it admits relies on the previous renewal, which a collector with grace G respects."""
    store = VectorStore(tmp_path / "store", touch_every_s=5)
    d = _dirs(1)
    cid = store.put(d)
    _age(store, cid, 4)                           # renewed 4 s ago (simulated)
    store.ensure(cid, d)                          # within touch_every_s: no syscall
    assert time.time() - store.path(cid).stat().st_mtime > 3.9
    assert store.collect(set(), grace_s=10).deleted == 0   # G - touch_every_s > 4


def test_the_grace_period_comes_from_the_environment():
    assert store_grace_s({}) == 3600.0
    assert store_grace_s({envvars.STORE_GRACE_S: "90"}) == 90.0
    for bad in ("0.5", "-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match=envvars.STORE_GRACE_S):
            store_grace_s({envvars.STORE_GRACE_S: bad})


# -- churn: uploads and replacements with requests in flight -------------------------------
@pytest.fixture()
def fast_tmp(tmp_path):
    """A directory on tmpfs when there is one: every upload, overlay and store write is
    fsync'ed (10 ms each on a busy disk here); the churn tests are about the protocol."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="vllmsteer-gc-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _registry(tmp_path: Path) -> Path:
    reg = tmp_path / "registry.yaml"
    reg.write_text("vectors: {}\n")
    return reg


def _churn(reg_file: str, store_root: str, tag: str, names: list[str], shared: list[str],
           cycles: int, seed: int, sample_every: int = 0, keep_collecting: bool = False
           ) -> dict:
    """One API process: per cycle, upload a new vector for one of ``names`` (replace)
    and admit a request naming ``names + shared``; a reader thread plays the worker and
    reads every admitted request's vectors by id after a random delay of up to
    ``READ_DELAY``. Returns counts, read failures and store-size samples."""
    assert os.environ[envvars.STORE_GRACE_S] == str(GRACE)  # the frontends' renewals
    rng = random.Random(seed)
    reg = Registry.from_yaml(reg_file)
    reg.retire_after_s = 0.2
    res = Resolver(reg, num_layers=L, hidden_size=H, store_root=store_root)
    collector = store_gc.attach(res, grace_s=GRACE, interval_s=INTERVAL)
    inbox: queue.Queue = queue.Queue()
    failures: list[str] = []
    late_misses: list[str] = []
    reads = [0]

    def worker() -> None:
        store = VectorStore(store_root, cache_bytes=0)   # reads the file every time
        while (item := inbox.get()) is not None:
            admitted, due, cids = item
            time.sleep(max(0.0, due - time.monotonic()))
            for cid in cids:
                try:
                    store.get(cid)
                    reads[0] += 1
                except StoreError as e:
                    late = time.monotonic() - admitted
                    # a read later than the lease may miss (a request queued longer than
                    # the grace period); an earlier miss is a bug
                    (late_misses if late > LEASE else failures).append(f"{late:.3f}s: {e}")

    reader = threading.Thread(target=worker)
    reader.start()
    last_used: dict[str, float] = {}
    sent = 0
    samples: list[tuple[int, int]] = []
    for i in range(cycles):
        name = names[i % len(names)]
        d = _dirs(seed * 100_000 + i)
        path = reg.ensure_upload_dir() / f"{name}-{tag}-{i}.safetensors"
        SteeringVector({k: torch.from_numpy(v) for k, v in d.items()}).save(str(path))
        reg.register(name, path, replace=True)
        wanted = [n for n in names + shared if n in reg.entries]
        program = res.program(parse_spec({"vectors": [{"name": n} for n in wanted]}))
        cids = [p.content for p in program.parts]
        if cids[wanted.index(name)] != content_id(d):
            failures.append(f"cycle {i}: {name} resolved to stale content")
        now = time.time()
        for cid in cids:
            last_used[cid] = now
        t = time.monotonic()
        inbox.put((t, t + rng.uniform(0, READ_DELAY), cids))
        sent += len(cids)
        if sample_every and i % sample_every == 0:
            window = GRACE + INTERVAL + 2.0   # 2 s for a collector thread starved by load
            recent = sum(t >= now - window for t in last_used.values())
            samples.append((len(_files(Path(store_root))), recent + len(reg.entries)))
    inbox.put(None)
    reader.join(60)
    if not keep_collecting:
        collector.stop()
    return {"collector": collector if keep_collecting else None, "reads": reads[0],
            "sent": sent, "failures": failures, "late": late_misses,
            "samples": samples,
            "created": len(last_used), "collections": collector.runs,
            "registered": sorted(res.registered_contents())}


def test_1000_upload_replace_cycles_keep_the_store_bounded_and_every_request_correct(
        fast_tmp, monkeypatch):
    tmp_path = fast_tmp
    monkeypatch.setenv(envvars.STORE_GRACE_S, str(GRACE))
    root = tmp_path / "store"
    t0 = time.monotonic()
    out = _churn(str(_registry(tmp_path)), str(root), "p", ["x", "y", "z"], [], 1000, 1,
                 sample_every=20, keep_collecting=True)
    wall = time.monotonic() - t0
    print(json.dumps({"wall_s": round(wall, 1), "created": out["created"],
                      "late_misses": out["late"][:5],
                      "collections": out["collections"],
                      "max_store_files": max(n for n, _ in out["samples"])}))
    assert not out["failures"], out["failures"][:5]
    assert out["reads"] + len(out["late"]) == out["sent"] > 2990 and out["created"] == 1000
    assert len(out["late"]) < out["sent"] // 20  # else the machine was too busy to tell
    assert out["collections"] > 2
    for n, bound in out["samples"]:  # only what was used within the grace period stays
        assert n <= bound, out["samples"]
    # after the churn the background collector alone brings the store down to the
    # registered vectors (it schedules itself while young unreferenced content is left)
    deadline = time.monotonic() + GRACE + 10
    try:
        while _files(root) != set(out["registered"]):
            assert time.monotonic() < deadline, (len(_files(root)), out["registered"])
            time.sleep(0.1)
    finally:
        out["collector"].stop()  # before the directory goes


def _churn_process(args: tuple, results) -> None:
    results.put(_churn(*args))


def test_several_api_processes_churning_one_store_lose_no_live_vector(fast_tmp, monkeypatch):
    """Three processes share the registry (its overlay) and the store, each replacing its
    own names and admitting requests that also name the others', each collecting."""
    monkeypatch.setenv(envvars.STORE_GRACE_S, str(GRACE))
    reg_file, root = _registry(fast_tmp), fast_tmp / "store"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tags = ("p", "q", "r")
    procs = [ctx.Process(target=_churn_process, args=(
        (str(reg_file), str(root), t, [f"{t}1", f"{t}2"],
         [f"{o}1" for o in tags if o != t], 100, k + 7), results))
        for k, t in enumerate(tags)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(not o["failures"] for o in outs), [o["failures"][:3] for o in outs]
    assert sum(o["created"] for o in outs) > 3 * 100  # own uploads and the others'
    assert all(o["reads"] + len(o["late"]) == o["sent"] for o in outs)
    assert sum(len(o["late"]) for o in outs) < sum(o["sent"] for o in outs) // 20
    time.sleep(GRACE + 0.1)
    reg = Registry.from_yaml(reg_file)
    res = Resolver(reg, num_layers=L, hidden_size=H, store_root=root)
    store_gc.StoreCollector(res.store, res.registered_contents, grace_s=GRACE).run()
    assert _files(root) == res.registered_contents() and len(_files(root)) == 6

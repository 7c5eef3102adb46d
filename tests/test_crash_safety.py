"""Acknowledged means durable: SIGKILL at random points of every write path.

- ``test_two_racing_writers_killed_at_random_points``: two writer processes
  (``tests/crash_writer.py``: the server's real write code without an engine) upload,
  replace, delete, register trained vectors and collect on one registry and store at the
  same time; each round one of them kills itself at a random durable step (fault
  injection) and the other is killed from outside at a random moment. After every round:
  the registry files parse, every listed vector loads with the content and scale of its
  last acknowledged change (or of the change in flight when the writer died: complete,
  never partial), an acknowledged change is never lost, a fresh resolver (a server's
  front end) resolves every entry, and after the next collection no temporary file and
  no orphaned upload is left. Rounds go on until there were at least 30 kills and every
  write path had a kill in flight.
- ``test_real_server_killed_mid_upload_and_mid_training`` (engine): a real server is
  killed (SIGKILL, whole process group) while uploads and a training job run, at least 3
  times; each restart serves every acknowledged vector with the same steered output as
  before the kill.
- ``test_durable_steps_come_in_order``: the order of the durable steps of each write path
  (file fsync, rename, directory fsync; the upload published before the overlay names
  it), traced by wrapping ``os``.

Counts are printed (``-s``) and written to ``$VLLMSTEER_CRASH_RESULTS`` when set.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import crash_writer
from vllm_steer.atomic_files import SWEEP_MIN_AGE_S, TMP_SUFFIX
from vllm_steer.steering import uploads
from vllm_steer.steering.registry import OVERLAY_NAME, Registry
from vllm_steer.steering.resolve import Resolver
from vllm_steer.steering.spec import parse_spec
from vllm_steer.steering.store_gc import StoreCollector

REPO = Path(__file__).resolve().parents[1]
MIN_KILLS = 30
MAX_ROUNDS = 40
TIME_LIMIT_S = 900
ABSENT = ("absent",)
FIGURES: dict[str, object] = {}


def _save_figures() -> None:
    out = os.environ.get("VLLMSTEER_CRASH_RESULTS")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=1))
    print(json.dumps(FIGURES, indent=1))


# -- the model of what must be there: the journals ---------------------------------------
def read_journals(root: Path) -> list[dict]:
    lines = []
    for p in sorted(root.glob("journal-*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                lines.append(json.loads(line))
    return lines


def expected_states(lines: list[dict]) -> tuple[dict[str, set[tuple]], dict[str, str]]:
    """name -> the states it may be in (``(content, scale)`` or ``ABSENT``), from the
    journals: an acknowledged change fixes the state; a change in flight when its writer
    died (a ``start`` without ``ack``) may or may not have happened. Also, per writer run,
    the operation in flight when it died (``None``: between operations)."""
    states: dict[str, set[tuple]] = {}
    in_flight: dict[str, str] = {}
    runs: dict[tuple, list[dict]] = {}
    for rec in lines:
        runs.setdefault((rec["w"], rec["run"]), []).append(rec)
    for (w, run), recs in runs.items():
        started = None
        for rec in recs:
            if rec["state"] == "start":
                started = rec
                continue
            started = None
            name = rec.get("name")
            if name is None:
                continue
            states[name] = {ABSENT if rec["op"] == "delete" else (rec["content"], rec["scale"])}
        in_flight[f"w{w}/{run}"] = started["op"] if started else "between operations"
        if started is not None and started.get("name") is not None:
            name = started["name"]
            after = ABSENT if started["op"] == "delete" else (started["content"],
                                                               started["scale"])
            states.setdefault(name, {ABSENT}).add(after)
    return states, in_flight


def leftovers(root: Path, reg: Registry) -> list[str]:
    """Temporary files anywhere under the upload dir and the store, and stored uploads
    that no entry names and that are not retired."""
    out = [str(p.relative_to(root)) for p in root.rglob(f"*{TMP_SUFFIX}")]
    used = {e.path for e in reg.entries.values()}
    overlay = reg.upload_dir / OVERLAY_NAME
    retired = json.loads(overlay.read_text()).get("retired", {}) if overlay.exists() else {}
    used |= {uploads.absolute(k, reg.upload_dir) for k in retired}
    for p in reg.upload_dir.iterdir():
        if uploads.STORED_RE.match(p.name) and p.resolve() not in used:
            out.append(str(p.relative_to(root)))
    return out


def check_state(root: Path, states: dict[str, set[tuple]]) -> dict[str, int]:
    """Everything the issue asks of the files after a crash (see the module docstring)."""
    reg = Registry.from_yaml(root / "registry.yaml")    # the registry files parse
    res = Resolver(reg, num_layers=crash_writer.LAYERS, hidden_size=crash_writer.HIDDEN,
                   store_root=root / "store")
    listed = {n: e for n, e in reg.entries.items() if n.startswith("w")}
    for name, allowed in states.items():
        e = listed.get(name)
        if e is None:
            assert ABSENT in allowed, f"{name}: acknowledged but lost ({allowed})"
            continue
        try:
            got = (crash_writer.content(res.load_vector_file(e.path, "name")), e.scale)
        except Exception as ex:   # noqa: BLE001 - any failure to load is the finding
            pytest.fail(f"{name}: listed but its vector does not load: {ex}")
        assert got in allowed, f"{name}: {got} is not one of {allowed}"
    unknown = set(listed) - set(states)
    assert not unknown, f"listed but never written: {sorted(unknown)}"
    for name in reg.entries:   # a fresh front end resolves (and so would serve) each one
        res.resolve(parse_spec({"vectors": [{"name": name}]}), 0)
    time.sleep(SWEEP_MIN_AGE_S)   # a live writer's fresh temporary is never swept
    collector = StoreCollector(res.store, res.registered_contents, grace_s=1.0, registry=reg)
    done = collector.run()
    left = leftovers(root, reg)
    assert not left, f"left after the collection: {left}"
    return {"listed": len(listed), "collected_files": done.deleted}


def setup_root(root: Path) -> None:
    (root / "registry.yaml").write_text("allowed_dirs: []\nvectors: {}\n")


def _spawn(root: Path, writer: int, seed: int, kill_at: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]),
        "VLLMSTEER_HOME": str(root / "home")}
    argv = [sys.executable, "-m", "tests.crash_writer", str(root), str(writer), str(seed)]
    if kill_at:
        argv.append(kill_at)
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _started(root: Path, writer: int, seed: int) -> bool:
    p = root / f"journal-{writer}.jsonl"
    return p.exists() and f'"run": {seed},' in p.read_text()


@pytest.mark.slow
def test_two_racing_writers_killed_at_random_points(tmp_path):
    root = tmp_path
    setup_root(root)
    rng = random.Random(28)
    t0 = time.monotonic()
    kills, rounds = 0, 0
    in_flight_ops: dict[str, int] = {}
    paths = {"upload", "replace", "delete", "train", "collect"}
    while kills < MIN_KILLS or not paths <= set(in_flight_ops):
        assert rounds < MAX_ROUNDS, f"coverage not reached in {rounds} rounds: {in_flight_ops}"
        assert time.monotonic() - t0 < TIME_LIMIT_S, "crash test over its time limit"
        rounds += 1
        seeds = (rounds * 2, rounds * 2 + 1)
        # writer 0 kills itself at a file step of each kind in turn (its n-th of that
        # kind, n random); writer 1 likewise in even rounds, and in odd rounds is killed
        # from outside at a random moment
        kinds = crash_writer.KILL_KINDS
        injected = [f"{kinds[rounds % len(kinds)]}:{rng.randint(1, 6)}",
                    f"{rng.choice(kinds)}:{rng.randint(1, 6)}" if rounds % 2 == 0 else ""]
        procs = [_spawn(root, w, seeds[w], injected[w]) for w in (0, 1)]
        if not injected[1]:
            deadline = time.monotonic() + 120
            while not _started(root, 1, seeds[1]) and time.monotonic() < deadline:
                assert procs[1].poll() is None, procs[1].stderr.read().decode()
                time.sleep(0.05)
            time.sleep(rng.uniform(0.2, 3.0))
            if procs[1].poll() is None:
                os.kill(procs[1].pid, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:   # writer 0 never reached its kill point
                p.kill()
                p.wait()
            err = p.stderr.read().decode()
            assert p.returncode == -signal.SIGKILL, f"writer exited {p.returncode}:\n{err}"
            assert "Traceback" not in err, err
            kills += 1
        states, in_flight = expected_states(read_journals(root))
        for run in (f"w0/{seeds[0]}", f"w1/{seeds[1]}"):
            op = in_flight.get(run, "before its first operation")
            in_flight_ops[op] = in_flight_ops.get(op, 0) + 1
        got = check_state(root, states)
        FIGURES.setdefault("rounds", []).append(
            {"round": rounds, "kill_points": [k or "external" for k in injected], **got})
    lines = read_journals(root)
    FIGURES.update(kills=kills, rounds=rounds, seconds=round(time.monotonic() - t0, 1),
                   operations_acknowledged=sum(r["state"] == "ack" for r in lines),
                   killed_in_flight=in_flight_ops)
    _save_figures()


# -- the order of the durable steps -------------------------------------------------------
class Trace:
    """``os.fsync`` / ``os.replace`` / ``os.rename`` calls of this process, with paths."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str, str]] = []
        for name in ("replace", "rename"):
            orig = getattr(os, name)
            monkeypatch.setattr(os, name, self._rename(orig))
        monkeypatch.setattr(os, "fsync", self._fsync(os.fsync))

    def _rename(self, orig):
        def inner(src, dst, *a, **kw):
            self.events.append(("rename", str(src), str(dst)))
            return orig(src, dst, *a, **kw)
        return inner

    def _fsync(self, orig):
        def inner(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
            return orig(fd)
        return inner

    def index(self, op: str, a, b: str = "", after: int = -1) -> int:
        """The first event after ``after`` whose paths match (``a``: a path or a test)."""
        for i, (o, x, y) in enumerate(self.events):
            if i > after and o == op and (a(x) if callable(a) else x == str(a)) \
                    and (not b or y == b):
                return i
        raise AssertionError(f"no {op} {a} {b} after step {after}: {self.events}")

    def durable(self, tmp_test, final: Path, after: int = -1) -> int:
        """A temporary file synced, renamed to ``final``, and its directory synced, in that
        order; returns the index of the directory sync."""
        i = self.index("fsync", tmp_test, after=after)
        j = self.index("rename", tmp_test, str(final), after=i)
        return self.index("fsync", str(final.parent), after=j)


def test_durable_steps_come_in_order(tmp_path, monkeypatch):
    from vllm_steer.server import vectors

    setup_root(tmp_path)
    monkeypatch.setenv("VLLMSTEER_HOME", str(tmp_path / "home"))
    ctx = crash_writer.context(tmp_path)
    v = crash_writer.vector(1)
    trace = Trace(monkeypatch)
    done = vectors.register(ctx, vectors.Registration("x", 1.0, None, {}, False),
                            crash_writer.file_bytes(v), None, "body")
    up = ctx.registry.upload_dir
    stored = ctx.registry.entries["x"].path
    overlay = up / OVERLAY_NAME

    def is_tmp(prefix: str):
        return lambda p: Path(p).name.startswith(prefix) and p.endswith(TMP_SUFFIX)

    # the upload: written and synced, renamed to its final name, directory synced ...
    d1 = trace.durable(is_tmp(".upload-"), stored)
    # ... all before the overlay that names it is synced, renamed and its directory synced
    d2 = trace.durable(is_tmp(f".{OVERLAY_NAME}."), overlay, after=d1)
    assert done.info["persisted"] and d2 > d1
    # the vector store (the content the workers read): the same three steps
    cid = crash_writer.content(v)
    trace.durable(is_tmp(f".{cid}.f32."), ctx.resolver.store.path(cid))
    # a deletion: the new overlay synced, renamed, directory synced
    trace.events.clear()
    ctx.registry.unregister("x")
    trace.durable(is_tmp(f".{OVERLAY_NAME}."), overlay)


# -- a real server, killed while it uploads and trains ----------------------------------
SERVER_KILLS = 3
TRAIN_RECIPE = {"personas": [["cheerful", "gloomy"], ["joyful", "sad"], ["happy", "unhappy"]],
                "suffixes": "chat", "max_suffixes": 24, "layers": [8, 10, 12]}


def _vector_file(rng: random.Random) -> bytes:
    import tempfile

    import torch

    from vllm_steer import SteeringVector

    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    v = SteeringVector({i: 0.3 * torch.randn(576, generator=g) for i in range(6, 14)})
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        v.save(str(p))
        return p.read_bytes()


def _chat(c, url: str, steering: dict | None) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "Describe a forest."}],
            "max_tokens": 10, "temperature": 0}
    if steering:
        body["steering"] = steering
    r = c.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _verify_server(c, url: str, acked: dict, in_flight: dict, root: Path,
                   rng: random.Random) -> dict:
    """A fresh server on the files: every acknowledged vector is listed with its scale and
    without error (a sample, every change in flight included, steers as its content does:
    compared with the same bytes uploaded again under another name), a change in flight
    at the kill is absent or complete, and the start-up collection left no temporary file
    and no orphaned upload. Trained vectors (``None`` bytes) are checked as listed."""
    listed = {v["name"]: v for v in c.get(f"{url}/v1/steering/vectors").json()["data"]}
    for name in [n for n, v in in_flight.items() if v is None and n in listed]:
        acked[name] = (None, 1.0)   # a training job killed after it registered its vector
    for name, (data, scale) in acked.items():
        if name not in listed:
            assert name in in_flight and in_flight[name] is None, \
                f"{name}: acknowledged, then lost in a crash"
            continue
        assert "error" not in listed[name], listed[name]
        if data is not None and name not in in_flight:
            assert listed[name]["default_scale"] == scale, (name, listed[name], scale)
    uploads = [n for n in acked if acked[n][0] is not None and n not in in_flight]
    sample = sorted(set(uploads[-4:]) | set(rng.sample(uploads, min(4, len(uploads))))
                    | {n for n in in_flight if in_flight[n] is not None})
    plain = _chat(c, url, None)
    checked = 0
    for name in sample:
        if name not in listed:
            assert name not in acked, f"{name}: acknowledged, then lost in a crash"
            continue   # an upload in flight that never happened
        allowed = [v for v in (acked.get(name), in_flight.get(name)) if v is not None]
        results = []
        for d, s in allowed:
            assert c.post(f"{url}/v1/steering/vectors", params={"name": "chk", "scale": s,
                                                                "replace": "true"},
                          content=d).status_code == 201
            results.append((s, _chat(c, url, {"vectors": [{"name": "chk"}]})))
        got = (listed[name]["default_scale"], _chat(c, url, {"vectors": [{"name": name}]}))
        assert got in results, (name, got, results)
        acked[name] = allowed[results.index(got)]   # what is there is now a fact
        assert got[1] != plain   # the check is not vacuous: the vector does steer
        checked += 1
    c.delete(f"{url}/v1/steering/vectors/chk")
    deadline = time.monotonic() + 60
    while True:   # the start-up collection runs in the background
        reg = Registry.from_yaml(root / "registry.yaml")
        left = leftovers(root, reg)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"left after the start-up collection: {left}"
    return {"listed": len(listed), "steering_checked": checked}


@pytest.mark.engine
@pytest.mark.slow
def test_real_server_killed_mid_upload_and_mid_training(default_model_dir, tmp_path):
    import threading

    import httpx

    from tests.server_helpers import Server
    from vllm_steer.fixtures.vectors import write_test_vectors

    root = tmp_path
    reg = write_test_vectors(root)
    srv = Server(default_model_dir, reg, root / "server.log", None,
                 extra_env={"VLLMSTEER_HOME": str(root / "home"),
                            "VLLMSTEER_STORE_GRACE_S": "1"},
                 extra_args=("--served-model-name", "m"))
    rng = random.Random(280)
    acked: dict[str, tuple[bytes, float]] = {}
    in_flight: dict[str, tuple[bytes, float]] = {}
    rounds: list[dict] = []
    errors: list[str] = []
    t0 = time.monotonic()
    try:
        for k in range(SERVER_KILLS + 1):
            srv.start()
            with httpx.Client(base_url=srv.url, timeout=600) as c:
                got = _verify_server(c, srv.url, acked, in_flight, root, rng)
            assert not errors, errors
            if k == SERVER_KILLS:
                rounds.append({"final_start": True, **got})
                break
            in_flight.clear()
            stop = threading.Event()
            state = {"uploads_acked": 0, "upload_in_flight": False, "train_in_flight": False}

            def uploader(k: int = k, state: dict = state, stop: threading.Event = stop) -> None:
                urng = random.Random(k)
                with httpx.Client(base_url=srv.url, timeout=600) as c:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        mine = sorted(n for n in acked if acked[n][0] is not None)
                        replace = mine and urng.random() < 0.3
                        name = urng.choice(mine) if replace else f"r{k}-{i}"
                        data, scale = _vector_file(urng), round(urng.uniform(4, 8), 2)
                        in_flight[name] = (data, scale)
                        state["upload_in_flight"] = True
                        try:
                            r = c.post("/v1/steering/vectors", content=data, params={
                                "name": name, "scale": scale, "replace": "true"})
                        except httpx.HTTPError:
                            return   # the server died with this upload in flight
                        state["upload_in_flight"] = False
                        if r.status_code != 201:
                            errors.append(r.text)
                            return
                        acked[name] = in_flight.pop(name)
                        state["uploads_acked"] += 1

            def trainer(k: int = k, state: dict = state) -> None:
                with httpx.Client(base_url=srv.url, timeout=600) as c:
                    name = f"t{k}"
                    in_flight[name] = None
                    state["train_in_flight"] = True
                    try:
                        r = c.post("/v1/steering/vectors/train",
                                   json={"name": name, **TRAIN_RECIPE})
                    except httpx.HTTPError:
                        return   # killed mid-training: absent, or complete if registered
                    state["train_in_flight"] = False
                    if r.status_code != 201:
                        errors.append(r.text)
                        return
                    del in_flight[name]
                    acked[name] = (None, 1.0)

            threads = [threading.Thread(target=uploader, daemon=True),
                       threading.Thread(target=trainer, daemon=True)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(4.0, 12.0))
            alive = srv.alive()
            os.killpg(srv.proc.pid, signal.SIGKILL)   # the whole server, mid-flight
            srv.proc.wait(timeout=60)
            srv.proc = None
            stop.set()
            for t in threads:
                t.join(timeout=120)
            assert alive
            rounds.append({"kill": k + 1, **got, **state})
    finally:
        srv.stop()
    kills = [r for r in rounds if "kill" in r]
    FIGURES["real_server"] = {"kills": len(kills), "rounds": rounds,
                              "seconds": round(time.monotonic() - t0, 1)}
    _save_figures()
    assert len(kills) >= SERVER_KILLS
    assert sum(r["upload_in_flight"] for r in kills) >= 1
    assert sum(r["train_in_flight"] for r in kills) >= 1

"""A writer process for the crash tests (``tests/test_crash_safety.py``): the server's real
write code without an engine, in a loop, journaling every change it makes.

``python -m tests.crash_writer ROOT WRITER SEED [KIND:N]``

Runs the server's own functions on ``ROOT/registry.yaml`` (an engine-free
``ServerContext``): uploads (``server.vectors.register``), replacements, deletions
(``Registry.unregister``, as the route), a training job's registration
(``server.train.register_trained``) and collections (the store and the upload
directory, as ``POST /v1/steering/store/collect``), on names of its own (``w<WRITER>-*``)
so that two writers race on the same files (the overlay, its lock, the store) but each
name's history is one writer's. Every operation is journaled in
``ROOT/journal-<WRITER>.jsonl`` before it starts (``start``) and after it returned
(``ack``: the server would have answered success now), with the content id and scale it
sets, each line ``fsync``-ed.

``KIND:N`` (fault injection): the process sends itself SIGKILL at its ``N``-th file step
of ``KIND`` (``KILL_KINDS``: after a file is created or opened for writing, before an
``fsync``, a rename or an unlink; counted in this process only), so the test can stop
it at every kind of point of every write path.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

HIDDEN, LAYERS = 16, 4
OPS = ("upload", "replace", "delete", "train", "collect")


#: The kinds of file steps a writer can be killed at (``install_kill_point``).
KILL_KINDS = ("create", "write", "fsync", "rename", "unlink")


def install_kill_point(kind: str, nth: int) -> None:
    """SIGKILL this process at its ``nth`` file step of ``kind`` (test-only fault
    injection): just after a file was created (``create``: ``os.open`` with ``O_CREAT``)
    or opened for writing (``write``: truncated or appended), or just before an ``fsync``,
    a ``rename``/``replace`` or an ``unlink``."""
    import builtins

    count = [0]

    def step(k: str) -> None:
        if k == kind:
            count[0] += 1
            if count[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    def before(fn, k):
        def inner(*a, **kw):
            step(k)
            return fn(*a, **kw)
        return inner

    def after_os_open(fn):
        def inner(path, flags, *a, **kw):
            out = fn(path, flags, *a, **kw)
            if flags & os.O_CREAT:
                step("create")
            elif flags & (os.O_WRONLY | os.O_RDWR):
                step("write")
            return out
        return inner

    def after_open(fn):
        def inner(file, mode="r", *a, **kw):
            out = fn(file, mode, *a, **kw)
            if any(c in mode for c in "wax"):
                step("write")
            return out
        return inner

    os.fsync = before(os.fsync, "fsync")
    os.replace = before(os.replace, "rename")
    os.rename = before(os.rename, "rename")
    os.unlink = before(os.unlink, "unlink")
    os.open = after_os_open(os.open)
    builtins.open = after_open(builtins.open)


def vector(seed: int) -> object:
    from vllm_steer import SteeringVector

    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: torch.randn(HIDDEN, generator=g) for i in range(LAYERS)})


def content(v: object) -> str:
    from vllm_steer.steering.store import content_id

    return content_id({k: t.numpy().astype(np.float32) for k, t in v.directions.items()})


def context(root: Path):
    from vllm_steer.server.common import ServerContext
    from vllm_steer.steering.registry import Registry
    from vllm_steer.steering.resolve import Resolver

    reg = Registry.from_yaml(root / "registry.yaml")
    res = Resolver(reg, num_layers=LAYERS, hidden_size=HIDDEN, store_root=root / "store")
    return ServerContext(None, res, api_processes=2)


def main() -> None:
    root, writer, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    kill_at = sys.argv[4] if len(sys.argv) > 4 else ""
    from vllm_steer.server import train, vectors
    from vllm_steer.steering.store_gc import StoreCollector

    ctx = context(root)
    collector = StoreCollector(ctx.resolver.store, ctx.resolver.registered_contents,
                               grace_s=1.0, registry=ctx.registry)
    rng = random.Random(seed)
    journal = os.open(root / f"journal-{writer}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    fsync = os.fsync   # the journal's own steps are not kill points

    def log(**rec) -> None:
        os.write(journal, (json.dumps({"w": writer, "run": seed, **rec}) + "\n").encode())
        fsync(journal)

    if kill_at:   # after the set-up: only the operations count
        kind, nth = kill_at.split(":")
        install_kill_point(kind, int(nth))
    seq = 0
    while True:
        seq += 1
        mine = sorted(n for n in ctx.registry.entries if n.startswith(f"w{writer}-"))
        op = rng.choice(OPS)
        if op in ("replace", "delete") and not mine:
            op = "upload"
        name = rng.choice(mine) if op in ("replace", "delete") else f"w{writer}-{seed}-{seq}"
        if op == "collect":
            log(seq=seq, op=op, state="start")
            collector.run()
            log(seq=seq, op=op, state="ack")
            continue
        if op == "delete":
            log(seq=seq, op=op, name=name, state="start")
            ctx.registry.unregister(name)
            log(seq=seq, op=op, name=name, state="ack")
            continue
        v = vector(rng.randrange(1 << 30))
        scale = round(rng.uniform(0.5, 4.0), 3)
        r = vectors.Registration(name, scale, None, {}, op == "replace")
        log(seq=seq, op=op, name=name, content=content(v), scale=scale, state="start")
        if op == "train":
            train.register_trained(ctx, r, v)
        else:
            vectors.register(ctx, r, file_bytes(v), None, "body")
        log(seq=seq, op=op, name=name, content=content(v), scale=scale, state="ack")


def file_bytes(v: object) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        v.save(str(p))
        return p.read_bytes()


if __name__ == "__main__":
    main()

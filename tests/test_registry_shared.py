"""One registry served by several processes (``--api-server-count``, data parallel).

Two ``Registry`` objects on the same file stand for two API-server processes (each loads
its own); the lock test runs real processes. No engine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from tests.steer_helpers import upload_tiny
from vllm_steer.steering import registry as registry_mod
from vllm_steer.steering.registry import OVERLAY_NAME, Registry, RegistryError


def test_a_change_in_one_process_is_seen_by_the_next_lookup_in_another(reg_file):
    one, two = Registry.from_yaml(reg_file), Registry.from_yaml(reg_file)
    assert set(two.entries) == {"a", "b"}
    up1, up2 = upload_tiny(one, "u1"), upload_tiny(one, "u2")
    one.register("u", up1, scale=0.5)
    assert two.entries["u"].path == up1 and two.entries["u"].scale == 0.5
    one.register("u", up2, scale=3.0, replace=True)          # new file and scale
    assert (two.entries["u"].path, two.entries["u"].scale) == (up2, 3.0)
    two.register("u", up2, scale=-1.0, replace=True)         # same file, new scale, other way
    assert one.entries["u"].scale == -1.0
    with pytest.raises(KeyError):                            # exists, seen under the lock
        one.register("u", up1)
    one.unregister("u")
    assert "u" not in two.entries
    two.unregister("a")                                      # a base-file name
    assert set(one.entries) == {"b"}
    with pytest.raises(KeyError):
        one.unregister("a")
    one.register("a", up1)                                   # a removed base name comes back
    assert two.entries["a"].path == up1 and two.entries["a"].origin == "registered"


class _CoarseStat:
    """``os.stat`` of a file system that keeps times in 10 ms steps (and a kernel that
    stamps files in jiffies): what many machines give, unlike this one's ns times."""

    def __init__(self, st: os.stat_result) -> None:
        self._st = st

    def __getattr__(self, name: str):
        value = getattr(self._st, name)
        return value - value % 10_000_000 if name in ("st_mtime_ns", "st_ctime_ns") else value


@pytest.mark.parametrize("times", ["native", "coarse"])
def test_same_size_rewrites_in_quick_succession_are_never_missed(reg_file, times,
                                                                  monkeypatch):
    """Scales 1.5 / 2.5 / 3.5 give overlays of equal size, written within one clock tick;
    a reader that skips a version may find the inode number of the version it read
    reused: a (inode, size, mtime) check alone then misses the change."""
    if times == "coarse":
        real_stat = os.stat
        monkeypatch.setattr(os, "stat", lambda *a, **k: _CoarseStat(real_stat(*a, **k)))
    one, two = Registry.from_yaml(reg_file), Registry.from_yaml(reg_file)
    path = reg_file.parent / "vectors" / "a.safetensors"
    one.register("x", path, scale=1.5)
    assert two.entries["x"].scale == 1.5
    sizes, scales = set(), (1.5, 2.5, 3.5)
    for i in range(1, 300):
        scale = scales[i % 3]
        one.register("x", path, scale=scale, replace=True)
        sizes.add(one.overlay_path.stat().st_size)
        if i % 2 == 0:  # the other process looks only at every second version
            assert two.entries["x"].scale == scale, i
    assert len(sizes) == 1  # the case this test is about


def _worker(reg_file: str, tag: str, n: int, barrier) -> None:
    reg = Registry.from_yaml(reg_file)
    path = Path(reg_file).parent / "vectors" / "a.safetensors"
    barrier.wait(timeout=60)
    for j in range(n):
        reg.register(f"{tag}{j}", path, scale=float(j))
        if j % 3 == 0:
            reg.unregister(f"{tag}{j}")


def test_concurrent_registration_from_processes_loses_nothing(reg_file):
    ctx = mp.get_context("spawn")
    n = 40
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_worker, args=(str(reg_file), tag, n, barrier))
             for tag in ("p", "q", "r")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    expected = {f"{t}{j}" for t in "pqr" for j in range(n) if j % 3} | {"a", "b"}
    reg = Registry.from_yaml(reg_file)
    assert set(reg.entries) == expected
    assert all(reg.entries[f"p{j}"].scale == float(j) for j in range(1, n, 3))
    # no temporary files are left next to the overlay
    assert sorted(p.name for p in reg.upload_dir.iterdir()) == [
        registry_mod.LOCK_NAME, OVERLAY_NAME]


def test_replaced_uploads_are_kept_for_a_grace_period(reg_file, monkeypatch):
    """A request in another process may have looked up the old entry just before."""
    one, two = Registry.from_yaml(reg_file), Registry.from_yaml(reg_file)
    first, second, third = (upload_tiny(one, n) for n in ("one", "two", "three"))
    one.register("x", first)
    assert two.entries["x"].path == first
    one.register("x", second, replace=True)
    assert first.exists()                         # retired, still readable
    clock = [os.path.getmtime(first)]
    monkeypatch.setattr(registry_mod.time, "time", lambda: clock[0])
    clock[0] += one.retire_after_s + 1
    two.register("y", third)                      # any later change, in any process
    assert not first.exists() and second.exists() and third.exists()
    two.unregister("x")
    assert second.exists()
    # a retired file that is registered again is in use, not deleted
    one.register("z", second)
    clock[0] += one.retire_after_s + 1
    one.unregister("y")
    assert second.exists() and third.exists()
    clock[0] += one.retire_after_s + 1
    one.unregister("z")
    clock[0] += one.retire_after_s + 1
    one.register("w", reg_file.parent / "vectors" / "a.safetensors")
    assert not second.exists() and not third.exists()
    assert (reg_file.parent / "vectors" / "a.safetensors").exists()   # never a config file


def test_listeners_hear_of_files_that_left_the_mapping_in_any_process(reg_file):
    one, two = Registry.from_yaml(reg_file), Registry.from_yaml(reg_file)
    heard: list[set[Path]] = []
    two.add_listener(heard.append)
    first, second = upload_tiny(one, "one"), upload_tiny(one, "two")
    one.register("x", first)
    one.register("y", first)
    _ = two.entries
    one.register("x", second, replace=True)
    _ = two.entries
    assert heard == []                            # still used by "y"
    one.unregister("y")
    _ = two.entries
    assert heard == [{first}]


def test_a_malformed_overlay_written_by_hand_is_an_error_at_the_next_lookup(reg_file):
    one, two = Registry.from_yaml(reg_file), Registry.from_yaml(reg_file)
    one.register("x", reg_file.parent / "vectors" / "a.safetensors")
    assert "x" in two.entries
    one.overlay_path.write_text("vectors: [1, 2]\n")
    with pytest.raises(RegistryError, match="mapping"):
        _ = two.entries
    one.overlay_path.unlink()                     # no overlay: the base file alone
    assert set(two.entries) == {"a", "b"}


def test_api_process_count_from_vllm_serve_arguments():
    from argparse import Namespace

    from vllm_steer.server.routes import api_processes

    assert api_processes(None) == 1
    assert api_processes(Namespace(api_server_count=None, data_parallel_size=1)) == 1
    assert api_processes(Namespace(api_server_count=3, data_parallel_size=1)) == 3
    # one API server per rank behind an external load balancer
    assert api_processes(Namespace(api_server_count=1, data_parallel_size=4)) == 4


def test_registration_without_a_registry_file_is_refused_with_several_processes(reg_file):
    from vllm_steer.server.common import ServerContext, SteerHTTPError
    from vllm_steer.server.vectors import require_shared

    class _Res:
        def __init__(self, registry):
            self.registry = registry

    require_shared(ServerContext(None, _Res(Registry()), api_processes=1))
    require_shared(ServerContext(None, _Res(Registry.from_yaml(reg_file)), api_processes=2))
    with pytest.raises(SteerHTTPError) as e:
        require_shared(ServerContext(None, _Res(Registry()), api_processes=2))
    assert e.value.status == 409 and "registry" in e.value.message


def test_a_registered_op_is_persisted_and_checked(reg_file):
    """``op``/``strength``/``value`` of a registration survive the overlay (another process,
    a restart); parameters the op does not use are refused, as in the registry file."""
    one = Registry.from_yaml(reg_file)
    up = upload_tiny(one, "u")
    one.register("abl", up, op="ablate", strength=0.25)
    one.register("clp", up, op="clamp", value=-2.0, layers=(0,))
    one.register("add", up, scale=0.5)
    two = Registry.from_yaml(reg_file)
    e = two.entries
    assert (e["abl"].op, e["abl"].strength) == ("ablate", 0.25)
    assert (e["clp"].op, e["clp"].value, e["clp"].layers) == ("clamp", -2.0, (0,))
    assert (e["add"].op, e["add"].scale) == ("add", 0.5)
    for kwargs, field in (({"op": "ablate", "scale": 2.0}, "scale"),
                          ({"op": "add", "value": 1.0}, "value"),
                          ({"op": "clamp", "strength": 0.5}, "strength"),
                          ({"op": "ablate", "strength": 2.0}, "strength"),
                          ({"op": "rotate"}, "op")):
        with pytest.raises(RegistryError, match=field):
            one.register("bad", up, **kwargs)
    assert "bad" not in two.entries

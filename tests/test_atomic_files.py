"""``vllm_steer.atomic_files``: files and directories appear whole or not at all, and a
failed writer leaves nothing behind. No engine."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from vllm_steer.atomic_files import (
    TMP_SUFFIX,
    atomic_path,
    publish,
    staged_dir,
    write_atomic,
    write_durable,
)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(TMP_SUFFIX))


def test_write_atomic_replaces_the_content(tmp_path):
    f = tmp_path / "sub" / "a.json"
    write_atomic(f, "one")
    write_atomic(f, b"two")
    assert f.read_bytes() == b"two" and _leftovers(f.parent) == []


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "a.bin"
    write_atomic(f, b"old")
    with pytest.raises(RuntimeError), atomic_path(f) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert f.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_durable_write_then_publish_under_a_later_name(tmp_path):
    tmp = tmp_path / f".upload{TMP_SUFFIX}"
    write_durable(tmp, b"data")
    publish(tmp, tmp_path / "final.bin")
    assert (tmp_path / "final.bin").read_bytes() == b"data" and not tmp.exists()


def test_staged_dir_appears_whole(tmp_path):
    out = tmp_path / "model"
    with staged_dir(out) as d:
        (d / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1" and _leftovers(tmp_path) == []


def test_a_failed_build_leaves_nothing(tmp_path):
    """The thinking tokenizer's old staging leaked ``.tok-*`` directories this way."""
    out = tmp_path / "tok"
    with pytest.raises(OSError), staged_dir(out) as d:
        (d / "a").write_text("1")
        raise OSError("save failed")
    assert list(tmp_path.iterdir()) == []


def test_without_replace_the_first_copy_wins(tmp_path):
    out = tmp_path / "cache"
    with staged_dir(out) as d:
        (d / "who").write_text("first")
    with staged_dir(out) as d:
        (d / "who").write_text("second")
    assert (out / "who").read_text() == "first" and _leftovers(tmp_path) == []


def test_replace_swaps_the_old_copy_out(tmp_path):
    out = tmp_path / "model"
    with staged_dir(out) as d:
        (d / "v").write_text("old")
        (d / "extra").write_text("x")
    with staged_dir(out, replace=True) as d:
        (d / "v").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["v"]
    assert (out / "v").read_text() == "new" and _leftovers(tmp_path) == []


def _builder(out: str, tag: int, rounds: int) -> None:
    for i in range(rounds):
        with staged_dir(out, replace=True) as d:
            (d / "part1").write_text(f"{tag}-{i}")
            time.sleep(0.002)
            (d / "part2").write_text(f"{tag}-{i}")


def test_concurrent_replacers_never_show_a_half_built_directory(tmp_path):
    """Two processes rebuild the same directory (``prepare_default_model(force=True)``
    twice at once); the directory at ``out`` is absent or whole, never one part without
    the other. (A listing that the swap overtook, of a copy renamed aside and being removed
    while it was read, is of the old copy, not of ``out``: it is counted apart.)"""
    out = tmp_path / "model"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_builder, args=(str(out), k, 40)) for k in range(2)]
    for p in procs:
        p.start()
    seen = torn = overtaken = 0
    while any(p.is_alive() for p in procs):
        try:
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            listed = os.fstat(fd).st_ino
            names = set(os.listdir(fd))
        finally:
            os.close(fd)
        try:
            still_there = os.stat(out).st_ino == listed
        except FileNotFoundError:
            still_there = False
        if not still_there:
            overtaken += 1
            continue
        seen += 1
        if names and names != {"part1", "part2"}:
            torn += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert seen > 0 and torn == 0
    assert (out / "part1").read_text() == (out / "part2").read_text()
    assert _leftovers(tmp_path) == []

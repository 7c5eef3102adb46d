"""A small file that several processes read and replace: how a reader tells versions apart
without reading the file, and how a writer takes its turn (the registry overlay).

- ``identity(f)``: device, inode, size, mtime and ctime in ns: one ``stat`` tells a
  reader whether the file changed since it read it.
- ``replace(path, data, previous)``: an atomic, durable replace (``atomic_files``) whose
  new version's identity differs from every earlier one.
- ``exclusive(lock_path)``: the writers' lock file (``flock``), held across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from vllm_steer.atomic_files import atomic_path, write_durable

Identity = tuple[int, ...]


def identity(f: str | os.PathLike[str] | int) -> Identity | None:
    """What tells one version of a file from another (None if it does not exist). Never
    equal for two versions written by ``replace``."""
    try:
        st = os.stat(f)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def replace(path: Path, data: bytes, previous: Identity | None) -> Identity:
    """Atomically and durably replace ``path`` with ``data``; returns the new identity.

    Readers compare identities, not contents, so the new version must differ from every
    earlier one even when it has the same size, its inode number is reused and the
    clock has not ticked (file times advance in jiffies): its mtime is set strictly
    above the previous version's (the caller holds the writers' lock).
    """
    with atomic_path(path) as tmp:
        write_durable(tmp, data)
        if previous is not None:
            prev_mtime = previous[3]
            # ns, then coarser steps for file systems that store coarser times
            for step in (1, 1_000, 1_000_000, 1_000_000_000, 2_000_000_000):
                st = os.stat(tmp)
                if st.st_mtime_ns > prev_mtime:
                    break
                os.utime(tmp, ns=(st.st_atime_ns, prev_mtime + step))
            else:
                raise OSError(f"cannot give {path} a modification time after the "
                              "previous version's")
    ident = identity(path)
    assert ident is not None
    return ident


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path`` (created if missing) exclusively, across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

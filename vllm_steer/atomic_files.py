"""Files and directories that appear whole or not at all, and stay once acknowledged.

Every writer of the package that others read (vector files, the registry overlay, the
vector store, self-check stamps, the converted default model, cached test assets) goes
through these:

- ``write_atomic(path, data)`` / ``atomic_path(path)``: the content is written to a
  temporary file in the same directory, flushed and ``fsync``-ed, renamed over ``path``
  (``os.replace``: readers see the old file or the new one), and the directory is
  ``fsync``-ed, so that once the call returns the new file survives a crash. On any
  failure the temporary file is removed and ``path`` is untouched.
- ``write_durable`` + ``publish``: the same two steps apart, for a writer that checks the
  temporary file before choosing its final name (uploads).
- ``staged_dir(final)``: a directory built under a temporary name next to ``final`` and
  renamed into place when the block ends without an exception (removed when it raises).
  Two runs building the same ``final`` never see each other's half-built directory.

Temporary names start with ``.`` and end with ``.tmp`` (``TMP_SUFFIX``), so that a
collection can recognise what a killed writer left behind. A writer holds an exclusive
``flock`` on its temporary file from its creation until it is renamed or removed
(``temp_file``, ``atomic_path``); the kernel drops the lock when the writer dies, so
``sweep_temporaries`` deletes exactly the temporaries of dead writers, however young.

The order that makes an acknowledged write durable (each step before the next):
write the temporary file, ``fsync`` it, ``rename`` it over the final name, ``fsync`` the
directory. A reader (or a restart after a crash) sees the old file or the new one, never
a mix; once the call returned, the new one survives a power loss.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (``.<name>.<pid>.<random>.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or creation inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` (created or truncated) and ``fsync`` it."""
    raw = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the written and synced ``tmp`` over ``final`` and sync the directory."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def temp_file(tmp: str | os.PathLike[str]) -> Iterator[Path]:
    """Create the empty temporary file ``tmp`` (a fresh ``.….tmp`` name) and hold an
    exclusive ``flock`` on it while the block runs, so ``sweep_temporaries`` leaves it
    alone; it is removed on exit unless the block renamed it."""
    tmp = Path(tmp)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on a normal exit it is synced
    and renamed over ``path`` (see the module docstring), on an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(temp_name(path)) as tmp:
        yield tmp
        with open(tmp, "rb+") as f:   # the writer may have written it by name
            os.fsync(f.fileno())
        publish(tmp, path)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_path(path) as tmp:
        write_durable(tmp, data)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """An empty directory to build ``final`` in, renamed into place when the block exits
    normally and removed when it raises.

    ``replace=False``: when ``final`` exists by then (another run finished first), it is
    kept and the staged copy dropped. ``replace=True``: the staged copy replaces it (the
    old one is renamed aside, then removed), so ``final`` is never a half-built
    directory; it may be absent for a moment in between. A reader that opened the old copy
    just before it was renamed aside may see it emptied while it reads.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX,
                                   dir=final.parent))
    try:
        yield staged
        _move_into_place(staged, final, replace)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _move_into_place(staged: Path, final: Path, replace: bool) -> None:
    error: OSError | None = None
    for _ in range(8):   # another run may swap its copy in between our two renames
        try:
            os.rename(staged, final)   # fails when final exists and is not empty
            fsync_dir(final.parent)
            return
        except OSError as e:
            error = e
            if not final.exists():
                continue
            if not replace:
                return
        aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"cannot move {staged} into place at {final}") from error


#: A temporary file younger than this is never swept, locked or not: a live writer takes
#: its lock a moment after creating the file.
SWEEP_MIN_AGE_S = 1.0


def sweep_temporaries(directory: str | os.PathLike[str], match: Callable[[str], bool],
                      min_age_s: float = SWEEP_MIN_AGE_S) -> tuple[int, int]:
    """Delete the temporary files in ``directory`` whose names ``match`` and whose writer
    is gone (no ``flock`` held on them) and that are at least ``min_age_s`` old. Returns
    ``(files deleted, bytes freed)``."""
    deleted = freed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0, 0
    now = time.time()
    for name in names:
        if not name.endswith(TMP_SUFFIX) or not match(name):
            continue
        p = os.path.join(directory, name)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, IsADirectoryError, OSError):
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue   # a live writer holds it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                deleted, freed = deleted + 1, freed + st.st_size
        finally:
            os.close(fd)
    return deleted, freed

"""A content-addressed store of vector directions, shared by the frontend and the workers.

Requests carry a program naming vectors by content id (sha256 of the layer list and the
float32 directions), not the vectors themselves: the frontend ``put``s a vector once
(atomic write, never modified afterwards) before any request that uses it is admitted,
and a worker ``get``s it the first time it sees the id (checking the hash), then keeps it
in memory. So a request costs the same few hundred bytes for an 8192-hidden model as for
a tiny one, and nothing can race: a file exists before its id is sent and is immutable.

**Collection** (``collect``, run by ``steering.store_gc``): a file's mtime is a lease. The
frontend renews it (``ensure``: ``utime``, or the file is written again if it is gone)
for every vector of every request it admits, at most every ``touch_every_s`` per vector
and process, holding the store's lock file shared; the collector deletes a file only
under the lock held exclusively, after checking again that its mtime is older than the
grace period and that no registration names its content. So a vector stays in the store
for at least ``grace - touch_every_s`` after the last request naming it was admitted, in
whichever process, and a collection can never slip between a frontend's check and its
request: either the collector deleted first (the frontend writes the file again) or the
frontend renewed first (the collector sees a fresh mtime).

Multi-node engines need the store on storage every node sees, or ``inline`` transport
(the content travels in the request; see ``vllm_steer.steering.wire``). vLLM-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vllm_steer.atomic_files import sweep_temporaries, write_atomic

Directions = dict[int, np.ndarray]


class StoreError(LookupError):
    """A content id the store does not hold (or holds corrupted)."""


def content_id(directions: Directions) -> str:
    """sha256 hex of the sorted layer list and the float32 little-endian directions."""
    layers = sorted(directions)
    h = hashlib.sha256()
    h.update(struct.pack(f"<{len(layers)}q", *layers))
    for layer in layers:
        h.update(np.ascontiguousarray(directions[layer], dtype="<f4").tobytes())
    return h.hexdigest()


def encode(directions: Directions) -> tuple[tuple[int, ...], bytes]:
    """``(layers, float32 bytes [len(layers), hidden])`` for transport or a file."""
    layers = tuple(sorted(directions))
    data = np.stack([np.asarray(directions[x], dtype="<f4") for x in layers])
    return layers, data.tobytes()


def decode(layers: tuple[int, ...], data: bytes, hidden: int) -> Directions:
    arr = np.frombuffer(data, dtype="<f4")
    if arr.size != len(layers) * hidden:
        raise StoreError(f"{arr.size} floats for {len(layers)} layers of {hidden}")
    arr = arr.reshape(len(layers), hidden)
    return {layer: arr[i].copy() for i, layer in enumerate(layers)}


#: Lock file in the store root: held shared by frontends renewing or writing a vector,
#: exclusively by a collector deleting.
LOCK_NAME = ".lock"
#: Default grace period (s): unreferenced content younger than this is never collected.
DEFAULT_GRACE_S = 3600.0
MIN_GRACE_S = 1.0
#: A frontend renews a vector's lease at most every ``grace / TOUCH_FRACTION`` seconds.
TOUCH_FRACTION = 10
_FILE_RE = re.compile(r"^[0-9a-f]{64}\.f32$")
#: Writers' temporary files: ``atomic_files.temp_name`` (``.<id>.f32.<pid>.<hex8>.tmp``),
#: and ``.<id>.f32.<pid>.<thread>.tmp`` of earlier versions.
_TMP_RE = re.compile(r"^\.[0-9a-f]{64}\.f32\.\d+\.(?:\d+|[0-9a-f]{8})\.tmp$")


def store_grace_s(environ: dict[str, str] | None = None) -> float:
    """The grace period: ``$VLLMSTEER_STORE_GRACE_S`` (seconds, >= 1), else 1 hour."""
    from vllm_steer import envvars

    raw = envvars.get(envvars.STORE_GRACE_S, environ)
    if raw is None:
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= MIN_GRACE_S or value == float("inf"):
        raise ValueError(f"{envvars.STORE_GRACE_S}={raw!r}: must be a number of seconds "
                         f">= {MIN_GRACE_S:g}")
    return value


@dataclass
class Collected:
    """What one ``collect`` did: files and bytes deleted and left, ``pending`` the
    unreferenced files left because they are younger than the grace period (``next_s``:
    seconds until the oldest of them is old enough, None if none)."""

    deleted: int = 0
    freed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    pending: int = 0
    next_s: float | None = None

    def to_json(self) -> dict[str, int | float | None]:
        return asdict(self)


class VectorStore:
    """Files ``<root>/<id[:2]>/<id>.f32`` (header: layer count, hidden, layers; then
    float32 data), written once, read many times; ``get`` caches up to ``cache_bytes``.

    ``touch_every_s``: how often this process renews a vector's lease (default: the grace
    period / ``TOUCH_FRACTION``, read when first needed).
    """

    _MAGIC = b"VSV1"

    def __init__(self, root: str | os.PathLike[str], cache_bytes: int = 1 << 30,
                 touch_every_s: float | None = None) -> None:
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self._touch_every_s = touch_every_s
        self._cache: OrderedDict[str, Directions] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        #: content id -> ``time.monotonic()`` before this process last renewed its lease
        self._renewed: dict[str, float] = {}

    @property
    def touch_every_s(self) -> float:
        if self._touch_every_s is None:
            self._touch_every_s = store_grace_s() / TOUCH_FRACTION
        return self._touch_every_s

    def path(self, cid: str) -> Path:
        return self.root / cid[:2] / f"{cid}.f32"

    def put(self, directions: Directions) -> str:
        """Store ``directions`` (if absent; else renew its lease) and return its content id."""
        cid = content_id(directions)
        self.ensure(cid, directions)
        return cid

    def ensure(self, cid: str, directions: Directions) -> None:
        """Make sure ``cid`` (whose content is ``directions``) is in the store with a fresh
        lease: after this returns, no collector with a grace period ``G`` deletes it for
        ``G - touch_every_s`` seconds. Call it before a request naming ``cid`` is admitted."""
        now = time.monotonic()
        last = self._renewed.get(cid)
        if last is not None and now - last < self.touch_every_s:
            return  # renewed by this process within the last touch_every_s
        with self._locked(fcntl.LOCK_SH):
            try:
                os.utime(self.path(cid))
            except FileNotFoundError:  # never written, or collected: write it (again)
                self._write(cid, directions)
        with self._lock:
            self._renewed[cid] = now
            if len(self._renewed) > 4096:  # drop leases older than the renewal interval
                self._renewed = {k: t for k, t in self._renewed.items()
                                 if now - t < self.touch_every_s}
        self._remember(cid, directions)

    def _write(self, cid: str, directions: Directions) -> None:
        path = self.path(cid)
        layers, data = encode(directions)
        hidden = len(data) // 4 // max(len(layers), 1)
        header = self._MAGIC + struct.pack(f"<qq{len(layers)}q", len(layers), hidden, *layers)
        write_atomic(path, header + data)

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        """The store's lock file, held ``how`` (``LOCK_SH`` / ``LOCK_EX``) across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # releases the lock

    def collect(self, keep: Collection[str], grace_s: float) -> Collected:
        """Delete the vector files whose id is not in ``keep`` and whose lease (mtime) is
        older than ``grace_s``, and every temporary file a killed writer left (whatever
        its age: writers hold the lock shared while they write). Safe with frontends and
        other collectors in any process (see the module docstring)."""
        cutoff = time.time() - grace_s
        out, candidates = self.scan(keep, cutoff)
        self.sweep(candidates, cutoff, out)
        self.sweep_temporaries(out)
        return out

    def sweep_temporaries(self, out: Collected) -> None:
        """Under the lock held exclusively no writer is writing: the temporary files left
        are those of writers that died (``atomic_files.sweep_temporaries``)."""
        try:
            subdirs = [d for d in self.root.iterdir() if d.is_dir() and len(d.name) == 2]
        except FileNotFoundError:
            return
        with self._locked(fcntl.LOCK_EX):
            for d in subdirs:
                n, freed = sweep_temporaries(d, lambda name: bool(_TMP_RE.match(name)),
                                             min_age_s=0.0)
                out.deleted, out.freed_bytes = out.deleted + n, out.freed_bytes + freed

    def usage(self) -> tuple[int, int]:
        """``(vector files, bytes)`` in the store now (one directory walk)."""
        files = size = 0
        try:
            subdirs = [d for d in os.scandir(self.root) if d.is_dir() and len(d.name) == 2]
        except FileNotFoundError:
            return 0, 0
        for d in subdirs:
            try:
                entries = list(os.scandir(d.path))
            except FileNotFoundError:
                continue
            for e in entries:
                if _FILE_RE.match(e.name):
                    try:
                        size += e.stat().st_size
                        files += 1
                    except FileNotFoundError:
                        continue
        return files, size

    def scan(self, keep: Collection[str], cutoff: float) -> tuple[Collected, list[Path]]:
        """The first phase of ``collect``, without the lock: the files to delete if their
        mtime is still before ``cutoff`` (``time.time()`` seconds) under the lock."""
        out = Collected()
        candidates: list[Path] = []
        oldest_pending: float | None = None
        try:
            subdirs = [d for d in self.root.iterdir() if d.is_dir() and len(d.name) == 2]
        except FileNotFoundError:
            return out, candidates
        for d in subdirs:
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                is_vector = bool(_FILE_RE.match(name))
                if not is_vector:
                    continue  # temporaries: ``sweep_temporaries``; anything else: not ours
                p = d / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if name[:-4] in keep:
                    out.kept, out.kept_bytes = out.kept + 1, out.kept_bytes + st.st_size
                elif st.st_mtime < cutoff:
                    candidates.append(p)
                else:
                    out.pending += 1
                    out.kept, out.kept_bytes = out.kept + 1, out.kept_bytes + st.st_size
                    if oldest_pending is None or st.st_mtime < oldest_pending:
                        oldest_pending = st.st_mtime
        if oldest_pending is not None:
            out.next_s = max(0.0, oldest_pending - cutoff)
        return out, candidates

    def sweep(self, candidates: list[Path], cutoff: float, out: Collected,
              batch: int = 256) -> None:
        """The second phase: under the lock held exclusively (no frontend is renewing or
        writing), delete each candidate whose mtime is still before ``cutoff``."""
        for i in range(0, len(candidates), batch):
            with self._locked(fcntl.LOCK_EX):
                for p in candidates[i:i + batch]:
                    try:
                        st = p.stat()  # again, under the lock: a frontend may have renewed it
                    except FileNotFoundError:
                        continue
                    if st.st_mtime < cutoff:
                        p.unlink(missing_ok=True)
                        out.deleted, out.freed_bytes = out.deleted + 1, out.freed_bytes + st.st_size
                    else:
                        out.kept, out.kept_bytes = out.kept + 1, out.kept_bytes + st.st_size

    def get(self, cid: str) -> Directions:
        """The directions stored under ``cid`` (hash-checked on first read)."""
        with self._lock:
            hit = self._cache.get(cid)
            if hit is not None:
                self._cache.move_to_end(cid)
                return hit
        path = self.path(cid)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise StoreError(f"vector {cid[:12]}… is not in the store {self.root} ({e.strerror}); "
                             "with engines on several machines the store must be on shared "
                             "storage, or use inline transport") from e
        try:
            if raw[:4] != self._MAGIC:
                raise ValueError("bad magic")
            n, hidden = struct.unpack_from("<qq", raw, 4)
            layers = struct.unpack_from(f"<{n}q", raw, 20)
            directions = decode(tuple(layers), raw[20 + 8 * n:], hidden)
        except (ValueError, struct.error, StoreError) as e:
            raise StoreError(f"{path}: corrupt vector file ({e})") from e
        if content_id(directions) != cid:
            raise StoreError(f"{path}: content does not match its id")
        self._remember(cid, directions)
        return directions

    def _remember(self, cid: str, directions: Directions) -> None:
        size = sum(v.nbytes for v in directions.values())
        with self._lock:
            if cid in self._cache or size > self.cache_bytes:
                return
            self._cache[cid] = directions
            self._cached += size
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= sum(v.nbytes for v in old.values())


def default_store_root() -> Path:
    """``<data home>/store`` (``$VLLMSTEER_HOME``, else the XDG data directory)."""
    from vllm_steer.locations import data_home

    return data_home() / "store"

"""A content-addressed store of vector directions, shared by the frontend and the workers.

Requests carry a recipe naming vectors by content id (sha256 of the layer list and the
float32 directions), not the vectors themselves: the frontend ``put``s a vector once
(atomic write, never modified afterwards) before any request that uses it is admitted,
and a worker ``get``s it the first time it sees the id (checking the hash), then keeps it
in memory. So a request costs the same few hundred bytes for an 8192-hidden model as for
a tiny one, and nothing can race: a file exists before its id is sent and is immutable.

Multi-node engines need the store on storage every node sees, or ``inline`` transport
(the content travels in the request; see ``vllm_steer.steering.wire``). vLLM-free.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

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


class VectorStore:
    """Files ``<root>/<id[:2]>/<id>.f32`` (header: layer count, hidden, layers; then
    float32 data), written once, read many times; ``get`` caches up to ``cache_bytes``."""

    _MAGIC = b"VSV1"

    def __init__(self, root: str | os.PathLike[str], cache_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, Directions] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def path(self, cid: str) -> Path:
        return self.root / cid[:2] / f"{cid}.f32"

    def put(self, directions: Directions) -> str:
        """Store ``directions`` (if absent) and return its content id."""
        cid = content_id(directions)
        path = self.path(cid)
        if not path.is_file():
            layers, data = encode(directions)
            hidden = len(data) // 4 // max(len(layers), 1)
            header = self._MAGIC + struct.pack(f"<qq{len(layers)}q", len(layers), hidden, *layers)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(header + data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._remember(cid, directions)
        return cid

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

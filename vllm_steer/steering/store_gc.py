"""When the vector store is collected: a background thread per API-server process.

The store (``steering.store``) keeps every vector content a frontend ever sent; without
collection it grows with every upload and replacement. ``StoreCollector`` runs
``VectorStore.collect`` with the contents the registry names (base file and overlay, as
current in this process) as the ones to keep and the grace period from
``$VLLMSTEER_STORE_GRACE_S`` (default 1 h):

- ``request()`` schedules a collection ``interval_s`` after the previous one at the
  earliest (default: half the grace period, at most 60 s, at least 1 s); the server calls
  it when its routes start and whenever a registry change (made in any process) leaves
  a vector file unused;
- a collection that leaves unreferenced content because it is younger than the grace
  period schedules the next one for when the oldest of it is old enough, so the store
  ends with the registered contents only, also after the churn stopped.

Each collection also deletes what killed writers left in the registry's upload directory
(``Registry.collect_uploads``: temporary files and published-but-unregistered uploads), so
a server started after a crash collects them at once. Several processes may collect the
same store at once (the store's and the registry's locks make it safe). ``on_run``
listeners see every collection's result (the server's metrics). vLLM-free.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_steer.steering.store import Collected, VectorStore, store_grace_s

if TYPE_CHECKING:
    from vllm_steer.steering.registry import Registry
    from vllm_steer.steering.resolve import Resolver

logger = logging.getLogger("vllm_steer")
MAX_INTERVAL_S = 60.0
MIN_INTERVAL_S = 1.0


class StoreCollector:
    """Collects ``store`` in a daemon thread; ``referenced()`` gives the content ids to
    keep whatever their age (the registry's). ``last``: the last collection's result."""

    def __init__(self, store: VectorStore, referenced: Callable[[], set[str]],
                 grace_s: float | None = None, interval_s: float | None = None,
                 registry: Registry | None = None) -> None:
        self.store = store
        self.referenced = referenced
        self.registry = registry
        #: ``fn(collected)`` after every collection
        self.on_run: list[Callable[[Collected], None]] = []
        self.grace_s = store_grace_s() if grace_s is None else float(grace_s)
        self.interval_s = (min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, self.grace_s / 2))
                           if interval_s is None else float(interval_s))
        self.last: Collected | None = None
        self.runs = 0
        self._lock = threading.Lock()
        self._due: float | None = None     # monotonic time of the scheduled run
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = -float("inf")     # monotonic start of the previous run
        self._stopped = False
        # A daemon thread still collecting (or logging) while the interpreter shuts down
        # can abort the process: stop it first.
        atexit.register(self.stop)

    def stop(self, timeout_s: float = 10.0) -> None:
        """No more collections; waits for a running one to finish (bounded)."""
        with self._lock:
            self._stopped, self._due = True, None
            thread = self._thread
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def request(self, delay_s: float = 0.0) -> None:
        """Schedule a collection in ``delay_s`` (not before ``interval_s`` after the
        previous one); an earlier scheduled one stands. Never blocks."""
        with self._lock:
            if self._stopped:
                return
            due = max(time.monotonic() + delay_s, self._previous + self.interval_s)
            if self._due is not None and self._due <= due:
                return
            self._due = due
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="vllm-steer-store-gc")
                self._thread.start()
            else:
                self._wake.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._due is None or self._stopped:
                    self._thread = None
                    return
                wait = self._due - time.monotonic()
                if wait <= 0:
                    self._due = None
                    self._previous = time.monotonic()
                self._wake.clear()
            if wait > 0:
                self._wake.wait(wait)
                continue
            try:
                done = self.run()
            except Exception:  # never take the server down; the next request retries
                logger.exception("vllm-steer: collecting the vector store %s failed",
                                 self.store.root)
                continue
            if done.next_s is not None:
                self.request(done.next_s + 0.05)

    def run(self) -> Collected:
        """One collection now, in this thread: the store, then the upload directory."""
        done = self.store.collect(self.referenced(), self.grace_s)
        if self.registry is not None:
            n, freed = self.registry.collect_uploads()
            done.deleted, done.freed_bytes = done.deleted + n, done.freed_bytes + freed
        self.last, self.runs = done, self.runs + 1
        for fn in list(self.on_run):
            fn(done)
        if done.deleted:
            logger.info("vllm-steer: vector store %s: deleted %d unreferenced files "
                        "(%.1f MiB); %d left (%d younger than the %.0f s grace period)",
                        self.store.root, done.deleted, done.freed_bytes / 2**20, done.kept,
                        done.pending, self.grace_s)
        return done


def attach(resolver: Resolver, grace_s: float | None = None,
           interval_s: float | None = None,
           on_run: Callable[[Collected], None] | None = None) -> StoreCollector:
    """Collect ``resolver``'s store now and whenever a registry change (in any process)
    leaves a vector file unused; that file's cached vector is dropped first. What each
    API-server process does when its routes start. ``on_run``: see ``StoreCollector``."""
    collector = StoreCollector(resolver.store, resolver.registered_contents, grace_s,
                               interval_s, registry=resolver.registry)
    if on_run is not None:
        collector.on_run.append(on_run)

    def changed(paths: set[Path]) -> None:
        for p in paths:
            resolver.forget_file(p)
        collector.request()

    resolver.registry.add_listener(changed)
    collector.request()
    return collector

"""The plugin's Prometheus metrics, served by vLLM's own ``/metrics`` (same port, same
exposition), named ``vllm_steer:...`` in vLLM's style.

They are ``prometheus_client`` metrics in the API-server process, so vLLM's exposition
serves them with its own: from the default registry with one API process, and with
several (``--api-server-count``, data parallel) through its multiprocess collector
(``PROMETHEUS_MULTIPROC_DIR``), which sums the counters of every API process, as vLLM
does for its own. Gauges that every process reads from shared state (the registry, the
store, the workers) keep the most recent value written by any process; the forks in
flight are summed over the live processes.

Sources: the request hook (``server.requests``: requests by steering kind), the live
probes (``server.live_probe``: readings, forks, early exits; the forks' prompt tokens
computed vs served from the prefix cache come from vLLM's own per-request accounting,
handed over by the ``vllm.stat_logger_plugins`` entry point,
``vllm_adapter.stat_logger``), the routes (errors by route and status, admin actions,
training phases), the store collector, and ``metrics_refresh`` (a task per API process
that reads the registry, the store's size and the workers' slot usage every
``$VLLMSTEER_METRICS_INTERVAL_S`` seconds, default 5). Worker gauges are labelled by the
worker's ``rank`` (``collective_rpc`` order): with tensor parallelism every rank holds
the same steering, so dashboards take ``max`` over ranks, never the sum.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from vllm_steer.steering.kinds import KINDS

# -- requests -------------------------------------------------------------------------
REQUESTS = Counter(
    "vllm_steer:requests", "OpenAI requests (chat, completions, responses) that passed the "
    "steering hook, by whether they are steered (each request once).", ["steering"])
REQUESTS_BY_KIND = Counter(
    "vllm_steer:requests_by_kind", "OpenAI requests by steering kind: 'none' for unsteered "
    "ones; a steered request counts once under each kind it uses "
    "(steering.kinds.KINDS).", ["kind"])
# -- probes ---------------------------------------------------------------------------
PROBE_REQUESTS = Counter("vllm_steer:probe_requests",
                         "Completion requests served with a live probe ('probe' field).")
PROBE_READINGS = Counter("vllm_steer:probe_readings", "Answer-probe readings delivered, by "
                         "source: 'live' (the 'probe' field), 'route' (/v1/steering/probe).",
                         ["source"])
PROBE_FORKS = Counter("vllm_steer:probe_fork_requests",
                      "Fork requests that live probes submitted to the engine.")
PROBE_FORKS_IN_FLIGHT = Gauge("vllm_steer:probe_fork_requests_running",
                              "Live-probe fork requests submitted and not finished.",
                              multiprocess_mode="livesum")
PROBE_FORK_TOKENS = Counter(
    "vllm_steer:probe_fork_prompt_tokens", "Prompt tokens of finished live-probe forks, by "
    "source: 'computed' by the engine or 'cached' (served from the prefix cache), as vLLM "
    "accounts them per request.", ["source"])
EARLY_EXITS = Counter("vllm_steer:probe_early_exits",
                      "Probed requests that stop_when stopped early (settled).")
TOKENS_SAVED = Counter(
    "vllm_steer:probe_early_exit_tokens_saved", "Generated tokens saved by early exits: "
    "the request's max_tokens minus the tokens it had generated when it stopped (an upper "
    "bound: the answer might have ended sooner).")
# -- training -------------------------------------------------------------------------
TRAIN_JOBS = Counter("vllm_steer:train_jobs", "Training jobs on the served engine, by "
                     "outcome ('ok', 'error').", ["outcome"])
TRAIN_SECONDS = Histogram(
    "vllm_steer:train_job_seconds", "Training job durations by phase: 'capture' (hidden "
    "states read through the engine), 'fit', 'register', 'total'.", ["phase"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560))
CAPTURE_REQUESTS = Counter("vllm_steer:capture_requests",
                           "Capture requests (training) sent to the engine.")
CAPTURE_TOKENS = Counter("vllm_steer:capture_prompt_tokens",
                         "Prompt tokens of the capture requests sent to the engine.")
# -- routes ---------------------------------------------------------------------------
HTTP_ERRORS = Counter(
    "vllm_steer:http_errors", "Error answers of the plugin, by route (path template; "
    "completion routes: steering refusals) and HTTP status.", ["route", "status"])
ADMIN_ACTIONS = Counter("vllm_steer:admin_actions", "Admin actions (upload, replace, "
                        "register, delete, train, collect) by HTTP status answered, refused "
                        "callers included.", ["action", "status"])
# -- registry and store ---------------------------------------------------------------
VECTORS_REGISTERED = Gauge("vllm_steer:vectors_registered", "Named vectors in the "
                           "registry, by origin ('config': the registry file, 'registered': "
                           "added at run time).", ["origin"], multiprocess_mode="mostrecent")
STORE_BYTES = Gauge("vllm_steer:store_bytes", "Bytes of vector files in the content-addressed "
                    "store.", multiprocess_mode="mostrecent")
STORE_FILES = Gauge("vllm_steer:store_files", "Vector files in the content-addressed store.",
                    multiprocess_mode="mostrecent")
STORE_COLLECTIONS = Counter("vllm_steer:store_collections", "Collections of the vector store "
                            "(and of writers' leftovers in the upload directory).")
STORE_DELETED = Counter("vllm_steer:store_deleted_files",
                        "Files deleted by collections (store and upload directory).")
STORE_FREED = Counter("vllm_steer:store_freed_bytes", "Bytes freed by collections.")
# -- workers --------------------------------------------------------------------------
SLOTS_TOTAL = Gauge("vllm_steer:slots", "Steering slots of a worker's tables.", ["rank"],
                    multiprocess_mode="mostrecent")
SLOTS_LIVE = Gauge("vllm_steer:slots_live", "Slots used by running requests.", ["rank"],
                   multiprocess_mode="mostrecent")
VECTORS_RESIDENT = Gauge("vllm_steer:vectors_resident", "Steering programs resident in a "
                         "worker's slots (live or cached for reuse).", ["rank"],
                         multiprocess_mode="mostrecent")
SLOT_TABLE_BYTES = Gauge("vllm_steer:slot_table_bytes", "Bytes of a worker's steering "
                         "tables.", ["rank"], multiprocess_mode="mostrecent")

#: Fork request ids submitted by this process's live probes and not finished yet, so that
#: vLLM's finished-request stats can be told apart (bounded: aborted forks may never
#: finish).
_forks: OrderedDict[str, None] = OrderedDict()
_forks_lock = threading.Lock()
_MAX_FORKS = 65536
#: Requests this process admitted (``metrics_refresh`` re-reads the workers' gauges only
#: after activity, or after its ``IDLE_REFRESH_S``).
_activity = [0]


def activity() -> int:
    """How many requests this process admitted so far."""
    return _activity[0]


# -- recording (called by the modules named in the docstring) ------------------------
def count_request(kinds: Iterable[str]) -> None:
    """One OpenAI request; ``kinds``: its steering kinds (empty: unsteered)."""
    _activity[0] += 1
    kinds = tuple(kinds)
    REQUESTS.labels(steering="steered" if kinds else "none").inc()
    for k in kinds or ("none",):
        REQUESTS_BY_KIND.labels(kind=k).inc()


def http_error(route: str, status: int) -> None:
    HTTP_ERRORS.labels(route=route, status=str(int(status))).inc()


def admin_action(action: str, status: int) -> None:
    ADMIN_ACTIONS.labels(action=action, status=str(int(status))).inc()


def fork_submitted(request_id: str) -> None:
    PROBE_FORKS.inc()
    PROBE_FORKS_IN_FLIGHT.inc()
    with _forks_lock:
        _forks[request_id] = None
        while len(_forks) > _MAX_FORKS:
            _forks.popitem(last=False)


def fork_ended() -> None:
    PROBE_FORKS_IN_FLIGHT.dec()


def request_finished(request_id: str, prompt_tokens: int, cached_tokens: int) -> None:
    """vLLM's accounting of a finished request (``vllm_adapter.stat_logger``)."""
    with _forks_lock:
        if request_id not in _forks:
            return
        del _forks[request_id]
    cached = max(0, min(int(cached_tokens), int(prompt_tokens)))
    PROBE_FORK_TOKENS.labels(source="cached").inc(cached)
    PROBE_FORK_TOKENS.labels(source="computed").inc(int(prompt_tokens) - cached)


def probe_finished(readings: int, early_exits: int, tokens_saved: int) -> None:
    """A probed request ended (its readings, and its early exit if it settled)."""
    PROBE_READINGS.labels(source="live").inc(readings)
    if early_exits:
        EARLY_EXITS.inc(early_exits)
        TOKENS_SAVED.inc(tokens_saved)


def collected(deleted: int, freed_bytes: int) -> None:
    STORE_COLLECTIONS.inc()
    STORE_DELETED.inc(deleted)
    STORE_FREED.inc(freed_bytes)


def set_workers(stats: list[dict[str, Any] | None]) -> None:
    """Worker gauges from ``collective_rpc("vllm_steer_stats")`` (one dict per worker)."""
    for rank, st in enumerate(stats):
        if not st:
            continue
        r = str(rank)
        SLOTS_TOTAL.labels(rank=r).set(st.get("num_slots", 0))
        SLOTS_LIVE.labels(rank=r).set(st.get("live_digests", 0))
        VECTORS_RESIDENT.labels(rank=r).set(st.get("resident", 0))
        SLOT_TABLE_BYTES.labels(rank=r).set(st.get("table_bytes", 0))


def initialise() -> None:
    """Create every label value a dashboard expects, at zero (a series that never moved
    is still there to graph)."""
    for k in ("none", "steered"):
        REQUESTS.labels(steering=k)
    for k in KINDS:
        REQUESTS_BY_KIND.labels(kind=k)
    for k in ("computed", "cached"):
        PROBE_FORK_TOKENS.labels(source=k)
    for k in ("live", "route"):
        PROBE_READINGS.labels(source=k)
    for k in ("ok", "error"):
        TRAIN_JOBS.labels(outcome=k)

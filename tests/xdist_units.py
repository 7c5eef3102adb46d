"""Running the suite on two xdist workers (``make test``: ``-n 2 --dist loadgroup
--no-loadscope-reorder -m "not serial"``, then ``-m serial`` alone). Engine steps run on
one thread (in-process engines: ``vllm_steer.fixtures.engines``; servers: vLLM reduces its
torch threads to 1), so a serial run keeps one of the two cores busy and the other mostly
idle; two workers use both.

- Every test joins its module's group (the shared-engine modules one group,
  ``SHARED_ENGINE_MODULES``), so a module's engine or server starts on one worker only.
- Groups run longest first (``MODULE_MINUTES``), so the workers finish together.
- Each worker gets its own vLLM cache root: two workers compiling the same graph would
  write the same files at once.
- The HF references computed in a worker run on one thread.
Without xdist nothing here changes the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The modules whose engine tests share one default-model engine (``default_engine`` in
#: ``tests/conftest.py``): one group.
SHARED_ENGINE_MODULES = ("test_capture_engine.py", "test_default_model.py",
                         "test_probe_engine.py", "test_steering_engine.py")
SHARED_ENGINE_FIXTURE = "default_engine"

#: The xdist worker this process is, else None.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER and "VLLM_CACHE_ROOT" not in os.environ:
    # vLLM's compile cache per worker: two workers compiling the same graph would write
    # the same files at once. Engines and servers started by the tests inherit it.
    from tests.vllm_cache import current_cache_root, fresh_cache_root

    os.environ["VLLM_CACHE_ROOT"] = str(fresh_cache_root(
        current_cache_root().with_name(f"{current_cache_root().name}-{XDIST_WORKER}")))

if XDIST_WORKER:
    # The workers share the cores with each other and with the engines they start (whose
    # steps run on one thread): the HF references computed in a worker on one thread too,
    # so that no process oversubscribes the cores (in-process engines restore this).
    import torch

    torch.set_num_threads(1)

#: Minutes each module took in the last whole serial run (2026-12-07, the 2-core machine;
#: ``test_metrics`` without the stall that run had). Under xdist each module (the shared-
#: engine modules together) is one unit of work, handed out longest first so that the two
#: workers finish together; a module missing here counts as short.
MODULE_MINUTES = {
    "test_server.py": 9.0, "test_probe_engine.py": 5.3, "test_crash_safety.py": 4.8,
    "test_server_scaleout.py": 4.1, "test_architectures.py": 3.8,
    "test_steering_engine.py": 3.5, "test_wheel.py": 2.9, "test_capture_engine.py": 2.9,
    "test_benchmarks_quick.py": 2.6, "test_metrics.py": 2.5, "test_logprobs_isolation.py": 2.5,
    "test_steering_compiled.py": 2.4, "test_compile_cache_key.py": 2.2,
    "test_playground.py": 2.1, "test_architectures_compiled.py": 1.8,
    "test_steering_tp.py": 1.6, "test_conditional_engine.py": 1.5, "test_metrics_tp.py": 1.3,
    "test_roles.py": 1.0, "test_layer_adapters.py": 0.5, "test_doctor_verify.py": 0.5,
}


def _module_name(item: pytest.Item) -> str:
    return Path(str(item.fspath)).name


def work_unit(item: pytest.Item) -> str:
    """The xdist group of ``item``: its module, or the shared engine's group."""
    name = _module_name(item)
    return SHARED_ENGINE_FIXTURE if name in SHARED_ENGINE_MODULES else name


def unit_minutes(unit: str) -> float:
    if unit == SHARED_ENGINE_FIXTURE:
        return sum(MODULE_MINUTES.get(m, 0.0) for m in SHARED_ENGINE_MODULES)
    return MODULE_MINUTES.get(unit, 0.0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Groups and order (before xdist's own hook, which appends each test's group to its
    id; the conftest's hook, which runs last, then sees the final order and ids)."""
    if not XDIST_WORKER:
        return
    units = [work_unit(it) for it in items]
    first_seen: dict[str, int] = {}
    for i, u in enumerate(units):
        first_seen.setdefault(u, i)
    for it, u in zip(items, units, strict=True):
        it.add_marker(pytest.mark.xdist_group(u))
    order = {id(it): (-unit_minutes(u), first_seen[u], i)
             for i, (it, u) in enumerate(zip(items, units, strict=True))}
    items.sort(key=lambda it: order[id(it)])

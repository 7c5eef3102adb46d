"""The engine-side gauges of ``server.metrics``, refreshed by a task in each API-server
process: the registry's vectors, the store's size and the workers' slot usage (through
``collective_rpc("vllm_steer_stats")``, the method the general plugin installs), every
``$VLLMSTEER_METRICS_INTERVAL_S`` seconds (default 5).

The workers are asked only when this process admitted a request or received engine
outputs (``vllm_adapter.stat_logger.batches``) since it last asked them, or
``IDLE_REFRESH_S`` after that: each RPC leaves vLLM's workers in their message queue's
busy-wait for a second, so asking an idle engine every 5 s held a fifth of a core. The
workers' gauges change only while requests run; with several API processes they keep the
most recent process's values, the one that saw the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from vllm_steer import envvars
from vllm_steer.server import metrics
from vllm_steer.server.common import ServerContext

logger = logging.getLogger("vllm_steer")
DEFAULT_INTERVAL_S = 5.0
RPC_TIMEOUT_S = 30.0
#: Seconds after which an idle process asks the workers again.
IDLE_REFRESH_S = 60.0


def interval_s() -> float:
    raw = envvars.get(envvars.METRICS_INTERVAL_S)
    try:
        value = float(raw) if raw is not None else DEFAULT_INTERVAL_S
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 3600:
        raise ValueError(f"{envvars.METRICS_INTERVAL_S}={raw!r}: must be seconds in "
                         "[0.1, 3600]")
    return value


def refresh_shared(ctx: ServerContext) -> None:
    """The registry's and the store's gauges (blocking: run in a thread)."""
    entries = list(ctx.registry.entries.values())
    for origin in ("config", "registered"):
        metrics.VECTORS_REGISTERED.labels(origin=origin).set(sum(e.origin == origin
                                                         for e in entries))
    files, size = ctx.resolver.store.usage()
    metrics.STORE_FILES.set(files)
    metrics.STORE_BYTES.set(size)


async def refresh_once(ctx: ServerContext, workers: bool = True) -> None:
    """The registry's and store's gauges; the workers' too when ``workers``."""
    await asyncio.to_thread(refresh_shared, ctx)
    if workers:
        stats = await asyncio.wait_for(ctx.engine_client.collective_rpc("vllm_steer_stats"),
                                       RPC_TIMEOUT_S)
        metrics.set_workers(list(stats))


async def refresh_loop(ctx: ServerContext, every_s: float) -> None:
    from vllm_steer.vllm_adapter import stat_logger

    failed = False
    seen, asked = None, -math.inf   # activity when the workers were last asked, and when
    while True:
        try:
            now, act = time.monotonic(), (metrics.activity(), stat_logger.batches)
            ask = act != seen or now - asked >= IDLE_REFRESH_S
            await refresh_once(ctx, workers=ask)
            if ask:
                seen, asked = act, now
            failed = False
        except asyncio.CancelledError:
            raise
        except Exception:  # the engine may be busy or gone; keep serving, say so once
            if not failed:
                logger.warning("vllm-steer: refreshing the metrics failed (pid %d)",
                               os.getpid(), exc_info=True)
            failed = True
        await asyncio.sleep(every_s)


_task: asyncio.Task[None] | None = None


def start(ctx: ServerContext) -> None:
    """Refresh the registry, store and worker gauges of this process in the background,
    and take vLLM's finished-request stats (forks' cached tokens)."""
    global _task
    from vllm_steer.vllm_adapter import stat_logger

    if stat_logger.instances == 0:
        logger.warning("vllm-steer: the vllm_steer_metrics stat logger is not loaded in this "
                       "process (VLLM_PLUGINS must name it, as `vllm-steer serve` does): "
                       "vllm_steer:probe_fork_prompt_tokens stays at 0")
    stat_logger.add_finished_hook(metrics.request_finished)
    metrics.initialise()
    if _task is None or _task.done():
        _task = asyncio.get_running_loop().create_task(refresh_loop(ctx, interval_s()))

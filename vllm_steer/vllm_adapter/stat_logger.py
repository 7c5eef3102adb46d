"""The ``vllm.stat_logger_plugins`` entry point: vLLM's per-request accounting, handed on.

vLLM's ``AsyncLLM`` (the OpenAI server's engine client, in each API-server process)
builds one ``SteeringStatLogger`` per engine from this entry point (loaded when
``VLLM_PLUGINS`` names ``vllm_steer_metrics``) and calls ``record`` after every batch of
engine outputs. For each request finished in that batch it calls the hooks added with
``add_finished_hook`` with vLLM's own numbers: the external request id, its prompt tokens
and how many of them were served from the prefix cache. The server's metrics use it for
the live probes' forks (``server.metrics``). Rows in ``symbols.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

logger = logging.getLogger("vllm_steer")
#: ``(request_id, prompt_tokens, cached_prompt_tokens) -> None``
FinishedHook = Callable[[str, int, int], None]
_hooks: list[FinishedHook] = []
#: Loggers vLLM built in this process (0: the entry point is not enabled here).
instances = 0
#: Batches of engine outputs recorded in this process (changes while its requests run).
batches = 0


def add_finished_hook(fn: FinishedHook) -> None:
    """Call ``fn`` for every request this process's engine client sees finish (idempotent)."""
    if fn not in _hooks:
        _hooks.append(fn)


class SteeringStatLogger(StatLoggerBase):
    """A stat logger that only hands finished requests to the hooks (no output)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        global instances
        self.engine_index = engine_index
        instances += 1

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        global batches
        if iteration_stats is None:
            return
        batches += 1
        if not _hooks:
            return
        for f in iteration_stats.finished_requests:
            for fn in _hooks:
                try:
                    fn(f.request_id, f.num_prompt_tokens, f.num_cached_tokens)
                except Exception:   # a metrics bug must never stop vLLM's output loop
                    logger.exception("vllm-steer: finished-request hook failed")

    def log_engine_initialized(self) -> None:
        pass

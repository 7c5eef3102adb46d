"""vLLM ``general_plugins`` entry point, run in every vLLM process (frontend and workers)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm_steer")
_registered = False
#: Set to 1 to keep the plugin out of a vLLM process without uninstalling it.
DISABLE_ENV = "VLLMSTEER_DISABLE"


def register() -> None:
    """Check the vLLM version, force the V1 model runner, and install the hooks."""
    global _registered
    if _registered:
        return
    from vllm_steer import envvars

    if (envvars.get(DISABLE_ENV) or "").lower() in ("1", "true", "yes"):
        logger.warning("vllm-steer: disabled by %s; requests with steering are not refused "
                       "by this process", DISABLE_ENV)
        return
    from vllm_steer.compat import check_vllm_version

    version = check_vllm_version()
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        # vllm-steer hooks the V1 runner; on GPUs with Triton vLLM 0.32 would pick V2.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-steer: set VLLM_USE_V2_MODEL_RUNNER=0 (steering hooks the V1 runner)")
    from vllm_steer.steering import frontend_hook, runner_hook

    frontend_hook.install()
    from vllm_steer.server import body

    body.install()  # OpenAI body "steering" -> extra_args (patched when imported)
    runner_hook.install()
    _registered = True
    logger.info("vllm-steer: plugin registered for vLLM %s", version)

"""vLLM ``general_plugins`` entry point, run in every vLLM process (frontend and workers)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm_steer")
_registered = False


def register() -> None:
    """Check the vLLM version, force the V1 model runner, and install the hooks."""
    global _registered
    if _registered:
        return
    from vllm_steer.compat import check_vllm_version

    version = check_vllm_version()
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        # vllm-steer hooks the V1 runner; on GPUs with Triton vLLM 0.32 would pick V2.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-steer: set VLLM_USE_V2_MODEL_RUNNER=0 (steering hooks the V1 runner)")
    from vllm_steer.steering import frontend_hook, runner_hook

    frontend_hook.install()
    runner_hook.install()
    _registered = True
    logger.info("vllm-steer: plugin registered for vLLM %s", version)

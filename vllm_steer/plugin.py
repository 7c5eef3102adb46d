"""vLLM ``general_plugins`` entry point, run in every vLLM process (frontend and workers)."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_steer")
_registered = False
#: Set to 1 to keep the plugin out of a vLLM process without uninstalling it.
DISABLE_ENV = "VLLMSTEER_DISABLE"


def register() -> None:
    """Apply the version policy (``selfcheck.gate``), check every vLLM symbol the plugin
    uses (``vllm_adapter.symbols``), force the V1 model runner, and install the hooks: the
    engine side (``vllm_adapter.install``) and the OpenAI request models'
    (``server.requests``).

    A vLLM outside the supported range, or one whose internals changed, fails here with an
    error naming the symbol, rather than serving without (or with wrong) steering.
    """
    global _registered
    if _registered:
        return
    from vllm_steer import envvars

    if (envvars.get(DISABLE_ENV) or "").lower() in ("1", "true", "yes"):
        logger.warning("vllm-steer: disabled by %s; requests with steering are not refused "
                       "by this process", DISABLE_ENV)
        return
    from vllm_steer.selfcheck.gate import check_vllm_version
    from vllm_steer.server import requests
    from vllm_steer.vllm_adapter import install

    version = check_vllm_version()
    install()
    requests.install()
    _registered = True
    logger.info("vllm-steer: plugin registered for vLLM %s", version)

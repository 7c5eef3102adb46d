"""The gate that applies the version policy (``vllm_steer.compat``) at plugin load.

A tested vLLM passes at once. A newer one passes only when the symbol table
(``vllm_adapter.check``) passes and a complete self-check has passed on this installation
(a stamp, ``selfcheck.stamp``), or while that self-check is running.
"""

from __future__ import annotations

import logging

from vllm_steer.compat import (
    TESTED_RANGE,
    VERIFY_COMMAND,
    UnsupportedVLLMError,
    classify,
    installed_vllm_version,
)
from vllm_steer.selfcheck import stamp
from vllm_steer.vllm_adapter.check import check_all

logger = logging.getLogger("vllm_steer")


def check_vllm_version(version: str | None = None) -> str:
    """Apply the version policy to ``version`` (default: the installed vLLM); return it or
    raise ``UnsupportedVLLMError`` (``VLLMDriftError`` when a newer vLLM fails the symbol
    table). A newer vLLM's stamp is looked up for this installation's key."""
    version = version if version is not None else installed_vllm_version()
    if version is None:
        raise UnsupportedVLLMError(
            "vllm-steer needs vLLM installed: pip install 'vllm-steer[cpu]' or 'vllm-steer[cuda]'"
        )
    if classify(version) == "tested":
        return version
    check_all()
    key = stamp.current_key(version)
    found = stamp.find_passed(key)
    if found is not None:
        logger.info("vllm-steer: vLLM %s is newer than the tested %s; accepted: `%s` "
                    "passed here on %s", version, TESTED_RANGE, VERIFY_COMMAND, found.get("when"))
        return version
    if stamp.verifying():
        logger.warning("vllm-steer: vLLM %s is newer than the tested %s; accepted for the "
                       "self-check in progress only", version, TESTED_RANGE)
        return version
    last = stamp.read_stamp(key)
    seen = ("" if last is None else
            f" The last self-check here ({last.get('when')}) "
            + ("failed." if not last.get("passed") else "was a partial run (--kinds/--modes)."))
    raise UnsupportedVLLMError(
        f"vllm-steer: vLLM {version} is newer than the versions vllm-steer was tested on "
        f"({TESTED_RANGE}). Its symbol table passes, but no complete self-check has passed "
        f"on this installation ({key}).{seen} Run `{VERIFY_COMMAND}` (a few minutes: tiny "
        "models of every layer adapter, steered through this vLLM on this device and "
        "compared with an HF reference); the plugin accepts this vLLM once it passes.")

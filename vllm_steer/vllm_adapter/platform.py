"""Which device this process's vLLM runs on, as the self-check stamp names it.

``device_key()`` is read at plugin load (the version gate, ``vllm_steer.selfcheck.gate``) and
by ``vllm-steer doctor --verify`` (which writes the stamp); both must spell it the same.
vLLM's CUDA platform answers ``get_device_name`` through NVML, so asking does not
initialise CUDA in the front-end process.
"""

from __future__ import annotations

import platform as _host


def device_key() -> str:
    """``"<device_type>:<device name>"``: e.g. ``"cuda:NVIDIA H100 80GB HBM3"``, or
    ``"cpu:x86_64"`` (vLLM's CPU platform names every CPU ``cpu``; the machine type is
    what changes its kernels). Device 0 stands for the machine."""
    from vllm.platforms import current_platform

    kind = str(current_platform.device_type) or "unspecified"
    try:
        name = str(current_platform.get_device_name(0))
    except NotImplementedError:
        name = ""
    if kind == "cpu" or not name or name == kind:
        name = _host.machine() or "unknown"
    return f"{kind}:{name}"


def device_type() -> str:
    """vLLM's ``current_platform.device_type`` (``cpu``, ``cuda``, ...)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)

"""Test-only: let vLLM 0.32's Ray executor run on its CPU platform.

vLLM's CPU platform has no Ray device key (``CpuPlatform.ray_device_key == ""``), and its
Ray executor (``RayExecutorV2``, the default; ``vllm/v1/executor/ray_executor_v2.py`` and
``ray_utils.py``) refuses such a platform. The executor needs the key for two things: one
placement-group bundle of ``{key: 1}`` per worker, and each worker actor's ids read back
from ``ray.get_runtime_context().get_accelerator_ids()[key]``, which only knows Ray's
accelerator resource names (a custom resource name would raise ``KeyError`` there). So the
tests name the key ``"GPU"`` and start a private Ray cluster that declares one logical
``GPU`` per CPU worker (``ray.init(num_gpus=2)``): Ray then schedules each worker into its
own bundle and sets ``CUDA_VISIBLE_DEVICES`` in it, which the CPU build ignores.
Everything else (worker processes, gloo all-reduce, the message queues) is vLLM's own code.

Not shipped in the plugin: it would change how vLLM's CPU platform behaves for every user
and make a user's Ray cluster advertise GPUs it does not have; vLLM does not support Ray on
CPU, and across machines (gloo between nodes, per-node thread binding) it was not run.
Applied in the test process (the in-process engine core builds the executor there) and, as
Ray's ``worker_process_setup_hook``, in every Ray worker of the test's cluster.
"""

from __future__ import annotations

#: The Ray resource name the shim gives the CPU platform (see the module docstring).
RAY_KEY = "GPU"


def needed() -> bool:
    """True on a platform that vLLM runs but whose Ray device key is empty (the CPU one)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and not current_platform.ray_device_key


def apply() -> None:
    """Give vLLM's CPU platform the Ray device key (idempotent; a no-op elsewhere)."""
    from vllm.platforms.cpu import CpuPlatform

    if not CpuPlatform.ray_device_key:
        CpuPlatform.ray_device_key = RAY_KEY


def remove() -> None:
    """Undo ``apply`` in this process."""
    from vllm.platforms.cpu import CpuPlatform

    if CpuPlatform.__dict__.get("ray_device_key") == RAY_KEY:
        del CpuPlatform.ray_device_key   # back to the inherited empty key

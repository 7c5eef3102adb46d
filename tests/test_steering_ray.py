"""Tensor parallel over Ray: steered output with ``distributed_executor_backend="ray"``
and tensor_parallel_size=2 equals size 1 (the tiny random llama of test_steering_tp).

The test starts its own local Ray cluster (``ray.init`` here; the engine core, a child
process, joins it through ``RAY_ADDRESS``) and shuts it down. It needs a platform on which
vLLM runs its Ray executor and two devices: vLLM 0.32's CPU platform has no Ray device
key (``current_platform.ray_device_key`` is empty) and vLLM's Ray executor refuses it, so
there the test is skipped with that reason. Multi-node use: docs/multinode.md.
"""

from __future__ import annotations

import os

import pytest

from tests.test_steering_tp import _run, tiny  # noqa: F401  (the fixture is used below)

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def ray_unsupported_reason() -> str | None:
    """Why vLLM cannot run its Ray executor with TP=2 here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'vllm-steer[ray]')"
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        return (f"vLLM's {current_platform.device_name!r} platform does not support the Ray "
                "executor: current_platform.ray_device_key is empty (vllm/v1/executor/"
                "ray_utils.py refuses it: 'current platform ... does not support ray')")
    if current_platform.device_count() < 2:
        return (f"tensor parallel 2 over Ray needs 2 {current_platform.ray_device_key}s, "
                f"{current_platform.device_count()} here")
    return None


@pytest.fixture(scope="module")
def ray_cluster():
    reason = ray_unsupported_reason()
    if reason:
        pytest.skip(reason)
    import ray
    from vllm.platforms import current_platform

    ctx = ray.init(num_cpus=4, num_gpus=current_platform.device_count(),
                   include_dashboard=False)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ctx.address_info["address"]
    try:
        yield ctx
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old


def test_ray_tp2_equals_tp1(ray_cluster, tiny):  # noqa: F811
    model_dir, tok = tiny
    t1, lp1, plain1 = _run(model_dir, tok, 1, backend="mp")
    t2, lp2, plain2 = _run(model_dir, tok, 2, backend="ray")
    assert t1 == t2
    for a, b in zip(lp1, lp2, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    # steering did something (request 0 steered everywhere, 1 unsteered), over Ray too
    assert t1[0] != plain1[0] and t1[1] == plain1[1]
    assert t2[0] != plain2[0] and plain2 == plain1

"""vllm-steer: per-request activation steering (control vectors) inside vLLM.

Layer convention: layer ``i`` is the output of decoder block ``i`` (0-based), i.e. HF
``hidden_states[i + 1]``; steering layer ``i`` adds to that block's output.

The public API is ``__all__`` below; each name is imported when first used, so that
``import vllm_steer`` (which vLLM's plugin loader does in every process) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vllm_steer.version import __version__

#: Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    # vectors
    "SteeringVector": "vllm_steer.vector",
    "SteeringVectorError": "vllm_steer.vector",
    "VectorMetadata": "vllm_steer.vector",
    # a request's steering
    "SteeringSpec": "vllm_steer.steering.spec",
    "make_spec": "vllm_steer.steering.spec",
    "SpecError": "vllm_steer.steering.spec",
    # engines
    "make_llm": "vllm_steer.llm_factory",
    # training vectors
    "train": "vllm_steer.extract.train",
    # answer probes (the trajectory driver is ``vllm_steer.probe.probe``: ``vllm_steer.probe``
    # is the probe package)
    "probe_once": "vllm_steer.probe.drivers",
    "sweep": "vllm_steer.probe.sweep",
    "ProbeConfig": "vllm_steer.probe.config",
    "Reading": "vllm_steer.probe.reading",
    "build_prompt": "vllm_steer.probe.prompts",
    # live probes of generating requests
    "live_generate": "vllm_steer.probe.live_drivers",
    "LiveResult": "vllm_steer.probe.live_drivers",
    "LiveProbeConfig": "vllm_steer.probe.live_state",
    "StopWhen": "vllm_steer.probe.live_state",
    # hidden-state capture on the engine
    "capture_hidden": "vllm_steer.extract.engine_hidden",
    "take_captures": "vllm_steer.vllm_adapter.capture",
    # conditional steering: each conditioned request's scores and decision
    "take_conditions": "vllm_steer.vllm_adapter.conditions",
}

__all__ = [
    "LiveProbeConfig", "LiveResult", "ProbeConfig", "Reading", "SpecError", "SteeringSpec",
    "SteeringVector", "SteeringVectorError", "StopWhen", "VectorMetadata", "__version__",
    "build_prompt", "capture_hidden", "live_generate", "make_llm", "make_spec", "probe_once",
    "sweep", "take_captures", "take_conditions", "train",
]

if TYPE_CHECKING:
    from vllm_steer.extract.engine_hidden import capture_hidden
    from vllm_steer.extract.train import train
    from vllm_steer.llm_factory import make_llm
    from vllm_steer.probe.config import ProbeConfig
    from vllm_steer.probe.drivers import probe_once
    from vllm_steer.probe.live_drivers import LiveResult, live_generate
    from vllm_steer.probe.live_state import LiveProbeConfig, StopWhen
    from vllm_steer.probe.prompts import build_prompt
    from vllm_steer.probe.reading import Reading
    from vllm_steer.probe.sweep import sweep
    from vllm_steer.steering.spec import SpecError, SteeringSpec, make_spec
    from vllm_steer.vector import SteeringVector, SteeringVectorError, VectorMetadata
    from vllm_steer.vllm_adapter.capture import take_captures
    from vllm_steer.vllm_adapter.conditions import take_conditions


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'vllm_steer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})

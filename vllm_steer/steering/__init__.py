"""Per-request steering inside vLLM: spec parsing (edge), resolution, and the runner hook."""

from vllm_steer.steering.spec import (
    APPLY_TO_MODES,
    SpecError,
    SteeringSpec,
    VectorRef,
    make_spec,
    parse_extra_args,
)

__all__ = [
    "APPLY_TO_MODES",
    "SpecError",
    "SteeringSpec",
    "VectorRef",
    "make_spec",
    "parse_extra_args",
]

"""Per-request steering, vLLM-free: spec parsing (edge), resolution, the wire struct, slot
tables, layer adapters (the traced forwards) and the thinking tracker. The vLLM side is
``vllm_steer.vllm_adapter``."""

from vllm_steer.steering.condition import ConditionRef, Rule, cast_score
from vllm_steer.steering.spec import (
    APPLY_TO_MODES,
    SpecError,
    SteeringSpec,
    VectorRef,
    make_spec,
)

__all__ = [
    "APPLY_TO_MODES",
    "ConditionRef",
    "Rule",
    "SpecError",
    "SteeringSpec",
    "VectorRef",
    "cast_score",
    "make_spec",
]

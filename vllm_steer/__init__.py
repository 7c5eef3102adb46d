"""vllm-steer: per-request activation steering (control vectors) inside vLLM.

Layer convention: layer ``i`` is the output of decoder block ``i`` (0-based), i.e. HF
``hidden_states[i + 1]``; steering layer ``i`` adds to that block's output.
"""

__version__ = "0.1.0"

from vllm_steer.vector import SteeringVector, SteeringVectorError, VectorMetadata  # noqa: E402

__all__ = ["SteeringVector", "SteeringVectorError", "VectorMetadata", "__version__"]

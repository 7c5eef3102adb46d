"""Deprecated: renamed ``vllm_steer.hf_steering``."""

from vllm_steer.deprecation import moved_module

__getattr__ = moved_module(__name__, "vllm_steer.hf_steering")

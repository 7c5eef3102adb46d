"""Deprecated: renamed ``vllm_steer.default_model``."""

from vllm_steer.deprecation import moved_module

__getattr__ = moved_module(__name__, "vllm_steer.default_model")

"""Deprecated: renamed ``vllm_steer.llm_factory``."""

from vllm_steer.deprecation import moved_module

__getattr__ = moved_module(__name__, "vllm_steer.llm_factory")

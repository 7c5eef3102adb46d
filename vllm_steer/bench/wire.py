"""What one steered request costs between the API front end and the engine, before vs after.

For a synthetic large-model vector (default 80 layers x 8192 hidden, fp32: 2.6 MB), each
request is passed through the front end's admission hook (``steer_request``: parse,
validate, resolve, encode), its ``SamplingParams`` are serialized with vLLM's own IPC
encoder (``MsgpackEncoder``, what crosses to the engine core with every request), sent
over a ZMQ ``ipc://`` socket to a second process that decodes them with vLLM's
``MsgpackDecoder`` and answers (as the engine core receives requests). Reported per
request: bytes serialized beyond the same request unsteered; the hook's time; and the
time from admission to decoded-on-the-other-side (hook + encode + IPC + decode). The
first request of a vector is reported apart from the repeated ones.

"Before" is an earlier commit of this package (``--before``, default the last commit
before the vector store: composed deltas travelled with every request), extracted from
this source checkout with ``git archive`` and imported in its own process; "after" is
this package, with its default transport (``store``: the request carries the recipe's
content id) and with ``inline`` (the transport used under Ray: content in every request).
Each variant runs in a fresh process, rounds interleaved.

No model and no engine: the front end sees a stand-in for vLLM's ``InputProcessor``
holding only what the hook reads (the model's layer count and hidden size, the engine
options). Run: ``vllm-steer bench wire`` (from a source checkout, for ``--before``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: The last commit whose wire carried composed deltas (before "Beyond addition").
DEFAULT_BEFORE = "f5b313e"


# -- worker: runs against whichever vllm_steer is first on sys.path ---------------------
def _processor(num_layers: int, hidden: int, registry: str, transport: str | None) -> Any:
    opts: dict[str, Any] = {"registry": registry}
    if transport:
        opts["transport"] = transport
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(hf_text_config=SimpleNamespace(
            num_hidden_layers=num_layers, hidden_size=hidden)),
        scheduler_config=SimpleNamespace(async_scheduling=False),
        parallel_config=SimpleNamespace(distributed_executor_backend="mp"),
        additional_config={"vllm_steer": opts},
        use_v2_model_runner=False,
    )
    return SimpleNamespace(vllm_config=cfg, tokenizer=None)


def _nbytes(frames: Any) -> int:
    """Bytes of what vLLM's ``MsgpackEncoder.encode`` returned (the main buffer and any
    out-of-band tensor buffers)."""
    return sum(len(memoryview(b)) for b in frames)


def _engine_side(addr: str) -> None:
    """The receiving end: decode each request's ``SamplingParams`` as the engine core
    would, and answer; ``b"stop"`` ends it."""
    import zmq
    from vllm import SamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder

    dec = MsgpackDecoder(SamplingParams)
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(addr)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1 and frames[0].bytes == b"stop":
            sock.send(b"")
            return
        sp = dec.decode(frames)
        sock.send(b"ok" if sp.extra_args is not None else b"none")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp

    import torch
    import zmq
    from vllm import SamplingParams
    from vllm.v1.serial_utils import MsgpackEncoder

    import vllm_steer
    from vllm_steer import SteeringVector
    from vllm_steer.vllm_adapter.frontend import steer_request

    work = Path(args.work)
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({i: torch.randn(args.hidden, generator=g)
                          for i in range(args.layers)})
    vec.save(str(work / "big.safetensors"))
    reg = work / "registry.yaml"
    reg.write_text("allowed_dirs: ['.']\nvectors:\n  big: big.safetensors\n")
    transport = None if args.transport == "default" else args.transport
    proc = _processor(args.layers, args.hidden, str(reg), transport)
    enc = MsgpackEncoder()
    base = _nbytes(enc.encode(SamplingParams(max_tokens=16)))
    prompt = list(range(32))

    addr = f"ipc://{work}/engine.sock"
    engine = mp.get_context("spawn").Process(target=_engine_side, args=(addr,), daemon=True)
    engine.start()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(addr)

    def one(scale: float) -> tuple[float, float, int]:
        sp = SamplingParams(max_tokens=16,
                            extra_args={"steering": {"vectors": [{"name": "big",
                                                                   "scale": scale}]}})
        req = SimpleNamespace(sampling_params=sp, prompt_token_ids=prompt, cache_salt=None)
        t0 = time.perf_counter()
        steer_request(proc, req)
        t1 = time.perf_counter()
        n = send(sp)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, n - base

    def send(sp: Any) -> int:
        frames = enc.encode(sp)
        sock.send_multipart(frames, copy=False)
        if sock.recv() != (b"none" if sp.extra_args is None else b"ok"):
            raise RuntimeError("the engine side decoded something else")
        return _nbytes(frames)

    for _ in range(3):  # connect and warm the other side, unsteered
        send(SamplingParams(max_tokens=16))

    plain = []
    for _ in range(args.requests):  # the same path for unsteered requests (the floor)
        sp = SamplingParams(max_tokens=16)
        req = SimpleNamespace(sampling_params=sp, prompt_token_ids=prompt, cache_salt=None)
        t0 = time.perf_counter()
        steer_request(proc, req)
        send(sp)
        plain.append(time.perf_counter() - t0)
    plain.sort()
    first = one(2.0)
    # repeated use of the vector; the scale varies, as it does between users (the
    # front end may cache per scale, which a constant scale would flatter)
    reps = [one(2.0 + (i % 8) / 8) for i in range(args.requests)]
    hook = sorted(r[0] for r in reps)
    total = sorted(r[1] for r in reps)
    nbytes = sorted(r[2] for r in reps)
    sock.send(b"stop")
    sock.recv()
    engine.join(30)
    return {"package": str(Path(vllm_steer.__file__).parent), "unsteered_bytes": base,
            "unsteered_total_ms": plain[len(plain) // 2] * 1e3,
            "first": {"hook_ms": first[0] * 1e3, "total_ms": first[1] * 1e3,
                      "bytes": first[2]},
            "repeated": {"hook_ms": hook[len(hook) // 2] * 1e3,
                         "total_ms": total[len(total) // 2] * 1e3,
                         "bytes": nbytes[len(nbytes) // 2], "bytes_max": nbytes[-1],
                         "n": len(reps)}}


# -- driver ----------------------------------------------------------------------------
def _extract(commit: str, dest: Path) -> tuple[Path, str]:
    from vllm_steer.locations import source_checkout

    repo = source_checkout()
    if repo is None:
        raise SystemExit("--before needs a source checkout of vllm-steer (git history)")
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "vllm_steer"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", commit],
                         check=True, capture_output=True, text=True).stdout.strip()
    return dest, rev


def _run_variant(root: Path | None, transport: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vs-wire-") as work:
        env = {**os.environ, "VLLMSTEER_HOME": str(Path(work) / "home")}
        env.pop("VLLMSTEER_REGISTRY", None)
        # the package under test first on the path: the old one, or this one
        env["PYTHONPATH"] = str(root if root is not None else Path(__file__).parents[2])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--work", work,
               "--layers", str(args.layers), "--hidden", str(args.hidden),
               "--requests", str(args.requests), "--transport", transport]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                           cwd=work)
        if r.returncode != 0:
            raise RuntimeError(f"wire worker ({transport}, {root}) failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    from tqdm import tqdm

    from vllm_steer.bench.common import header, summarize, write_result

    res = header(list(sys.argv[1:] if argv is None else argv), "wire")
    with tempfile.TemporaryDirectory(prefix="vs-wire-before-") as tmp:
        before_root, rev = _extract(args.before, Path(tmp))
        variants = {f"before ({rev})": (before_root, "default"),
                    "after (store)": (None, "default"),
                    "after (inline)": (None, "inline")}
        raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in tqdm(range(args.rounds), desc="wire rounds"):
            for v, (root, transport) in variants.items():
                raw[v].append(_run_variant(root, transport, args))
    res["workload"] = {"layers": args.layers, "hidden": args.hidden,
                       "vector_bytes": args.layers * args.hidden * 4,
                       "requests_per_round": args.requests, "rounds": args.rounds}
    res["raw"] = raw
    res["summary"] = {v: {"repeated_bytes": summarize(x["repeated"]["bytes"] for x in rs),
                          "repeated_total_ms": summarize(x["repeated"]["total_ms"] for x in rs),
                          "repeated_hook_ms": summarize(x["repeated"]["hook_ms"] for x in rs),
                          "first_bytes": summarize(x["first"]["bytes"] for x in rs),
                          "first_total_ms": summarize(x["first"]["total_ms"] for x in rs),
                          "unsteered_total_ms": summarize(x["unsteered_total_ms"] for x in rs),
                          "added_ms": summarize(x["repeated"]["total_ms"]
                                                - x["unsteered_total_ms"] for x in rs)}
                      for v, rs in raw.items()}
    b = next(iter(raw))
    res["before_over_after_store"] = {
        "bytes": summarize(x["repeated"]["bytes"] / max(y["repeated"]["bytes"], 1)
                           for x, y in zip(raw[b], raw["after (store)"], strict=True)),
        "total_ms": summarize(x["repeated"]["total_ms"] / y["repeated"]["total_ms"]
                              for x, y in zip(raw[b], raw["after (store)"], strict=True)),
        "added_ms": summarize(
            (x["repeated"]["total_ms"] - x["unsteered_total_ms"])
            / max(y["repeated"]["total_ms"] - y["unsteered_total_ms"], 1e-6)
            for x, y in zip(raw[b], raw["after (store)"], strict=True)),
        "hook_ms": summarize(x["repeated"]["hook_ms"] / y["repeated"]["hook_ms"]
                             for x, y in zip(raw[b], raw["after (store)"], strict=True))}
    write_result(args.out + ("_quick" if args.quick else ""), res)
    return res


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm-steer bench wire", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--requests", type=int, default=200, help="repeated requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default=DEFAULT_BEFORE, help="commit to compare against")
    p.add_argument("--out", default="wire")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test suite)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--transport", default="default", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.hidden, a.requests, a.rounds = 4, 64, 5, 1
    return a


if __name__ == "__main__":
    main()

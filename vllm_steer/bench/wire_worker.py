"""The worker of ``vllm_steer.bench.wire``, run as a script (by path) in a fresh process:
one variant's round against whichever ``vllm_steer`` is first on ``sys.path`` (this
checkout's, or an earlier commit's extracted by ``wire``); prints one JSON line.

It imports nothing from ``vllm_steer.bench``: an earlier commit's package may have none.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


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
        req = SimpleNamespace(sampling_params=sp, prompt_token_ids=prompt, cache_salt=None,
                              request_id="wire")
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
        req = SimpleNamespace(sampling_params=sp, prompt_token_ids=prompt, cache_salt=None,
                              request_id="wire")
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", required=True, help="a scratch directory")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--transport", default="default")
    print(json.dumps(worker(p.parse_args())))

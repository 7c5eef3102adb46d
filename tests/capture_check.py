"""Hidden-state capture checked against HF transformers block outputs (forward hooks on
the same weights, written here), shared by the capture tests on every engine kind.

The reference for a capture at layer ``i`` is the output of decoder block ``i`` (HF
``hidden_states[i + 1]`` for every block but the last, whose HF entry is after the final
norm), read with a forward hook registered after any steering hook, so it sees the
steered stream like the next block does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tests.hf_reference import add_dense, decoder_blocks

#: Relative error allowed per captured vector: ||vLLM - HF|| / ||HF||.
REL_TOL = 1e-4


@torch.no_grad()
def hf_blocks(model, ids: list[int], delta: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[num_layers, len(ids), hidden]`` float32: every block's output on ``ids``, with
    ``delta`` (dense ``[num_layers, hidden]``) added where ``mask`` is true."""
    blocks = decoder_blocks(model)
    outs: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i):
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple | list) else output
            outs[i] = h[0].float().clone()
        return fn

    x = torch.tensor([ids])
    if delta is None:
        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
    else:
        if mask is None:
            mask = torch.ones(1, len(ids), dtype=torch.bool)
        with add_dense(model, delta, mask):
            handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
            try:
                model(x)
            finally:
                for h in handles:
                    h.remove()
    return torch.stack(outs)  # type: ignore[arg-type]


def expected(blocks: torch.Tensor, rec: dict) -> np.ndarray:
    """What ``rec`` (a capture record) should hold, from ``hf_blocks`` output."""
    sel = blocks[rec["layers"]]
    if rec["mode"] == "mean":
        return sel[:, rec["start"]:rec["end"]].mean(1).numpy()
    return sel[:, rec["positions"]].numpy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Max over captured vectors of ``||got - ref|| / ||ref||``."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    num = np.linalg.norm(got - ref, axis=-1)
    den = np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
    return float((num / den).max())


@dataclass
class CaptureCase:
    """One request: prompt ids, its capture option (None: a neighbour without capture)
    and optional steering (registry vector names with scales, ``apply_to`` all)."""

    prompt: list[int]
    capture: dict | None
    steer: list[tuple[str, float]] | None = None

    def extra(self, cid: str) -> dict | None:
        extra: dict = {}
        if self.capture is not None:
            extra["capture"] = {**self.capture, "id": cid}
        if self.steer:
            extra["steering"] = {"vectors": [{"name": n, "scale": s} for n, s in self.steer]}
        return extra or None


def run_capture_cases(llm, cases: list[CaptureCase], tag: str, n_tokens: int = 4):
    """Run ``cases`` in one batch; return ``(outputs, {case index: record})``."""
    from vllm import SamplingParams

    from vllm_steer.vllm_adapter.capture import take_captures

    ids = [f"{tag}-{k}" for k in range(len(cases))]
    params = [SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True,
                             extra_args=c.extra(cid)) for c, cid in zip(cases, ids, strict=True)]
    outs = llm.generate([{"prompt_token_ids": c.prompt} for c in cases], params, use_tqdm=False)
    want = [cid for c, cid in zip(cases, ids, strict=True) if c.capture is not None]
    got = take_captures(llm, want)
    return outs, {k: got[cid] for k, cid in enumerate(ids) if cid in got}


def check_capture_cases(llm, model, cases: list[CaptureCase], dense, tag: str,
                        n_tokens: int = 4, tol: float = REL_TOL) -> float:
    """Run ``cases`` in one batch, assert every capture equals the HF block outputs within
    ``tol`` and every neighbour's tokens equal the same batch without the capturing
    requests' capture option; return the largest relative error. ``dense(steer)`` gives
    the dense delta of a steer list."""
    outs, recs = run_capture_cases(llm, cases, tag, n_tokens)
    worst = 0.0
    for k, case in enumerate(cases):
        if case.capture is None:
            continue
        delta = dense(case.steer) if case.steer else None
        mask = torch.ones(1, len(case.prompt), dtype=torch.bool) if delta is not None else None
        ref = expected(hf_blocks(model, case.prompt, delta, mask), recs[k])
        err = rel_err(recs[k]["values"], ref)
        assert err < tol, f"{tag} case {k} ({case.capture}): relative error {err:.2e}"
        worst = max(worst, err)
    # the same batch without capture: every request's tokens are unchanged
    plain = [CaptureCase(c.prompt, None, c.steer) for c in cases]
    outs2, _ = run_capture_cases(llm, plain, tag + "-plain", n_tokens)
    for k, (a, b) in enumerate(zip(outs, outs2, strict=True)):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids), (
            f"{tag} case {k}: tokens changed by capture in the batch")
    return worst


def matrix_capture_cases(tok, num_layers: int) -> list[CaptureCase]:
    """The architecture matrix's capture batch: every mode, steered and unsteered, with
    neighbours that capture nothing."""
    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    p0 = enc("The capital of France is Paris, and the capital of Italy is")
    p1 = enc("Once upon a time there was a small village by the sea")
    last = num_layers - 1
    return [
        CaptureCase(p0, {"layers": "all", "at": "tokens"}),
        CaptureCase(p1, None, [("a", 1.0)]),
        CaptureCase(p1, {"layers": [0, last], "at": "mean", "start": 2}, [("a", 1.0)]),
        CaptureCase(p0, {"layers": [1], "at": "positions", "positions": [0, 3, -1]},
                    [("a", -1.0), ("b", 0.5)]),
        CaptureCase(p0, None),
        CaptureCase(p1, {"layers": "all", "at": "last"}),
    ]


def long_prompt(tok, n_tokens: int) -> list[int]:
    """A prompt of exactly ``n_tokens`` tokens of ordinary text."""
    text = ("The history of the river town began with a ferry, a mill and a market that "
            "drew farmers from the hills every week. ")
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tok.encode(text, add_special_tokens=False)
    return ids[:n_tokens]


def check_chunked_and_cached(llm, model, tok, tag: str, budget: int, block: int,
                             num_layers: int, tol: float = REL_TOL) -> dict[str, int]:
    """Capture under chunked prefill (a prompt over twice the step's token ``budget``) and
    with a cached prefix (``block``-sized KV blocks of the prompt already in the prefix
    cache), each equal to HF; the prefix cache still serves every request outside the
    captured range. Returns the cached-token counts seen."""
    from vllm import SamplingParams

    n = 2 * budget + 3 * block + 5
    base = long_prompt(tok, n)
    tail = tok.encode(" And then the bridge was built.", add_special_tokens=False)
    layers = [0, num_layers // 2, num_layers - 1]
    blocks = hf_blocks(model, base + tail)

    def run(cases):
        outs, recs = run_capture_cases(llm, cases, f"{tag}-{len(seen)}", n_tokens=1)
        seen.append(int(outs[-1].num_cached_tokens or 0))
        for k, case in enumerate(cases):
            if case.capture is not None:
                err = rel_err(recs[k]["values"], expected(blocks, recs[k]))
                assert err < tol, f"{tag}: {case.capture}: relative error {err:.2e}"
        return outs

    seen: list[int] = []
    # 1) nothing cached yet: every position of a long range (several steps) and a mean
    run([CaptureCase(base, {"layers": layers, "at": "tokens", "start": 3})])
    run([CaptureCase(base, {"layers": layers, "at": "mean"})])
    assert seen[0] == 0, seen
    # 2) the prompt's blocks are now cached: a capture reaching into them recomputes from
    #    the block holding its first position, and only from there
    first = budget + 7
    run([CaptureCase(base + tail, {"layers": layers, "at": "positions",
                                   "positions": [first, n - 1, n + len(tail) - 1]})])
    assert seen[-1] == (first // block) * block, (seen, first)
    run([CaptureCase(base + tail, {"layers": layers, "at": "tokens", "start": 1,
                                   "end": 2 * block})])
    assert seen[-1] == 0, seen
    # 3) requests without capture still read the whole cached prefix
    plain = llm.generate([{"prompt_token_ids": base + tail}],
                         SamplingParams(max_tokens=1), use_tqdm=False)
    assert int(plain[0].num_cached_tokens or 0) >= (n // block) * block
    return {"first_capture_cached": seen[2], "plain_cached": int(plain[0].num_cached_tokens)}

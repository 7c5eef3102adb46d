"""An independent HF reference for the ops (add, ablate, clamp, normalize).

Written from the documented formulas (README "Interventions"), not from the plugin's
code: vectors are read from their files, unit directions computed here, and a forward
hook on each HF decoder block rewrites the block's output token by token where the mask
is set. Then one teacher-forced forward over prompt + vLLM's tokens gives the log-probs
to compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.hf_reference import read_directions, rewrite_blocks

LOGPROB_ATOL = 2e-3
NEAR_TIE = 1e-3


def _layer_ops(spec: dict, vectors_dir: Path, defaults: dict[str, dict]) -> dict[int, list]:
    """``{layer: [(op, r, param) ..., ("add", d, None)]}`` in the documented order: the
    projections as the spec lists them, then the sum of the additions."""
    proj: dict[int, list] = {}
    add: dict[int, torch.Tensor] = {}
    for entry in spec["vectors"]:
        directions = read_directions(vectors_dir / f"{entry['name']}.safetensors")
        dflt = defaults.get(entry["name"], {})
        op = entry.get("op", dflt.get("op", "add"))
        layers = entry.get("layers") or sorted(directions)
        for layer in layers:
            d = directions[layer].double()
            if op == "add":
                scale = entry.get("scale", dflt.get("scale", 1.0))
                add[layer] = add.get(layer, torch.zeros_like(d)) + scale * d
            elif op == "ablate":
                proj.setdefault(layer, []).append(("ablate", d / d.norm(),
                                                   entry.get("strength", 1.0)))
            else:
                assert op == "clamp", op
                proj.setdefault(layer, []).append(("clamp", d / d.norm(),
                                                   entry.get("value", 0.0)))
    out: dict[int, list] = {}
    for layer in sorted(set(proj) | set(add)):
        out[layer] = proj.get(layer, []) + ([("add", add[layer], None)] if layer in add else [])
    return out


def _apply(ops: list, normalize: bool, h: torch.Tensor) -> torch.Tensor:
    """README "Interventions", token by token on ``h`` ``[..., hidden]`` (in float64)."""
    x0 = h.double()
    x = x0.clone()
    for op, v, param in ops:
        if op == "ablate":      # h <- h - strength (h.r) r
            x = x - param * (x @ v)[..., None] * v
        elif op == "clamp":     # h <- h + (value - h.r) r
            x = x + (param - x @ v)[..., None] * v
        else:                   # h <- h + sum scale v
            x = x + v
    if normalize:               # h <- h |h0| / |h|
        x = x * (x0.norm(dim=-1) / x.norm(dim=-1))[..., None]
    return x.to(h.dtype)


def steer_ops_hf(model, spec: dict, vectors_dir: Path, mask: torch.Tensor,
                 defaults: dict[str, dict] | None = None):
    """Apply ``spec``'s ops to the block outputs of ``model`` at tokens where ``mask``
    (bool ``[1, seq]``) is set (a context manager)."""
    ops = _layer_ops(spec, vectors_dir, defaults or {})
    normalize = bool(spec.get("normalize", False))
    return rewrite_blocks(model, {i: (lambda h, o=o: _apply(o, normalize, h))
                                  for i, o in ops.items()}, mask)


@torch.no_grad()
def check_ops_against_hf(model, prompt: list[int], out, spec: dict | None, vectors_dir: Path,
                         mask_fn, defaults: dict[str, dict] | None = None) -> float:
    """Assert vLLM's greedy tokens and their log-probs equal the reference (teacher-forced);
    return how far steering moved the sampled tokens' log-probs (nats, max)."""
    comp = out.outputs[0]
    gen = list(comp.token_ids)
    ids = prompt + gen
    x = torch.tensor([ids])
    plain = torch.log_softmax(model(x).logits[0].double(), -1)
    if spec is None:
        logp = plain
    else:
        with steer_ops_hf(model, spec, vectors_dir, mask_fn(len(ids)), defaults):
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
    n, moved = len(prompt), 0.0
    for t, tok in enumerate(gen):
        row = logp[n - 1 + t]
        best = int(row.argmax())
        if tok != best:
            gap = float(row[best] - row[tok])
            assert gap < NEAR_TIE, f"step {t}: vLLM chose {tok}, reference {best} by {gap:.4f}"
        err = abs(comp.logprobs[t][tok].logprob - float(row[tok]))
        assert err < LOGPROB_ATOL, f"step {t}: log-prob off by {err}"
        moved = max(moved, abs(float(row[tok]) - float(plain[n - 1 + t, tok])))
    return moved


#: (spec, mode of the reference mask) for the engine tests; the registry gives v2 scale 2.0.
OPS_CASES: list[tuple[dict | None, str | None]] = [
    ({"vectors": [{"name": "v1", "op": "ablate"}]}, "all"),
    ({"vectors": [{"name": "v3", "op": "ablate", "strength": 0.5},
                  {"name": "v2", "scale": 1.0}], "apply_to": "generated"}, "generated"),
    ({"vectors": [{"name": "v1", "op": "clamp", "value": 10.0,
                   "layers": list(range(10, 21))}]}, "all"),
    ({"vectors": [{"name": "v1", "scale": 3.0}], "normalize": True}, "all"),
    ({"vectors": [{"name": "v1", "op": "clamp", "value": -4.0}, {"name": "v3", "scale": 2.0}],
      "normalize": True, "apply_to": "generated"}, "generated"),
    (None, None),
]
OPS_TOKENS = 16
_PROMPTS = ["The capital of France is", "Write a short poem about the sea.\n",
            "Q: What is 17 times 3?\nA:"]


def _mask(mode: str | None, prompt_len: int):
    def mask(n: int) -> torch.Tensor:
        pos = torch.arange(n)[None]
        return pos >= 0 if mode == "all" else pos >= prompt_len
    return mask


def _params(spec: dict | None, n_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, logprobs=0,
                          extra_args={"steering": spec} if spec else None)


def run_ops_batch(llm, hf, vectors_dir: Path, prompts: list[list[int]],
                  cases: list[tuple[dict | None, str | None]], n_tokens: int,
                  defaults: dict[str, dict] | None = None):
    """One mixed batch of ``cases`` (spec or None = unsteered, reference mask mode), greedy:
    each request checked against the reference (an unsteered one against the unsteered
    model: its steered neighbours did not touch it), then run alone: the same tokens.
    Returns vLLM's outputs and how far each request moved its log-probs (0 if unsteered)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [_params(spec, n_tokens) for spec, _ in cases], use_tqdm=False)
    moved = [check_ops_against_hf(hf, p, out, spec, vectors_dir, _mask(mode, len(p)), defaults)
             for p, (spec, mode), out in zip(prompts, cases, outs, strict=True)]
    for p, (spec, _), out in zip(prompts, cases, outs, strict=True):
        (alone,) = llm.generate([{"prompt_token_ids": p}], _params(spec, n_tokens),
                                use_tqdm=False)
        assert list(alone.outputs[0].token_ids) == list(out.outputs[0].token_ids), spec
    return outs, moved


def run_ops_cases(llm, hf, registry: Path, tok):
    """``OPS_CASES`` on the default model through ``run_ops_batch``; returns the prompts,
    vLLM's outputs and how far each request moved its log-probs."""
    prompts = [tok.encode(_PROMPTS[i % len(_PROMPTS)], add_special_tokens=False)
               for i in range(len(OPS_CASES))]
    outs, moved = run_ops_batch(llm, hf, registry.parent / "vectors", prompts, OPS_CASES,
                                OPS_TOKENS, {"v2": {"scale": 2.0}})
    return prompts, outs, moved

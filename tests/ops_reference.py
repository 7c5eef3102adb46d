"""An independent HF reference for the ops (add, ablate, clamp, normalize).

Written from the documented formulas (README "Interventions"), not from the plugin's
code: vectors are read from their files, unit directions computed here, and a forward
hook on each HF decoder block rewrites the block's output token by token where the mask
is set. Then one teacher-forced forward over prompt + vLLM's tokens gives the log-probs
to compare.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from vllm_steer import SteeringVector
from vllm_steer.hf_steering import decoder_layers

LOGPROB_ATOL = 2e-3
NEAR_TIE = 1e-3


def _layer_ops(spec: dict, vectors_dir: Path, defaults: dict[str, dict]) -> dict[int, list]:
    """``{layer: [("proj", r, a, b) ..., ("add", d)]}`` in the documented order."""
    proj: dict[int, list] = {}
    add: dict[int, torch.Tensor] = {}
    for entry in spec["vectors"]:
        v = SteeringVector.load(vectors_dir / f"{entry['name']}.safetensors")
        dflt = defaults.get(entry["name"], {})
        op = entry.get("op", dflt.get("op", "add"))
        layers = entry.get("layers") or sorted(v.directions)
        for layer in layers:
            d = v.directions[layer].double()
            if op == "add":
                scale = entry.get("scale", dflt.get("scale", 1.0))
                add[layer] = add.get(layer, torch.zeros_like(d)) + scale * d
            else:
                r = d / d.norm()
                a, b = ((entry.get("strength", 1.0), 0.0) if op == "ablate"
                        else (1.0, entry.get("value", 0.0)))
                proj.setdefault(layer, []).append(("proj", r, a, b))
    out: dict[int, list] = {}
    for layer in sorted(set(proj) | set(add)):
        out[layer] = proj.get(layer, []) + ([("add", add[layer])] if layer in add else [])
    return out


@contextlib.contextmanager
def steer_ops_hf(model, spec: dict, vectors_dir: Path, mask: torch.Tensor,
                 defaults: dict[str, dict] | None = None) -> Iterator[None]:
    """Apply ``spec``'s ops to the block outputs of ``model`` at tokens where ``mask``
    (bool ``[1, seq]``) is set."""
    ops = _layer_ops(spec, vectors_dir, defaults or {})
    normalize = bool(spec.get("normalize", False))
    blocks = decoder_layers(model)

    def hook_for(layer: int):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output
            x0 = h[0].double()          # [seq, hidden]
            x = x0.clone()
            for op in ops[layer]:
                if op[0] == "proj":
                    _, r, a, b = op
                    x = x + (b - a * (x @ r))[:, None] * r
                else:
                    x = x + op[1]
            if normalize:
                x = x * (x0.norm(dim=-1) / x.norm(dim=-1))[:, None]
            m = mask[0].to(h.device)[:, None]
            new = torch.where(m, x.to(h.dtype), h[0])[None]
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer), with_kwargs=True,
                                                   prepend=True) for layer in ops]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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


def run_ops_cases(llm, hf, registry: Path, tok):
    """One mixed batch of ``OPS_CASES`` (greedy), each checked against the reference;
    returns the prompts, vLLM's outputs and how far each request moved its log-probs."""
    from vllm import SamplingParams

    prompts = [tok.encode(_PROMPTS[i % len(_PROMPTS)], add_special_tokens=False)
               for i in range(len(OPS_CASES))]
    params = [SamplingParams(max_tokens=OPS_TOKENS, temperature=0.0, ignore_eos=True,
                             logprobs=0, extra_args={"steering": spec} if spec else None)
              for spec, _ in OPS_CASES]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    moved = [check_ops_against_hf(hf, p, out, spec, registry.parent / "vectors",
                                  _mask(mode, len(p)), {"v2": {"scale": 2.0}})
             for p, (spec, mode), out in zip(prompts, OPS_CASES, outs, strict=True)]
    return prompts, outs, moved

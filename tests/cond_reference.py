"""The HF side of the conditional-steering checks, standing alone (nothing of vllm_steer).

The score is written here from the formula in docs/conditional-steering.md, with the
projection as a matrix: ``score = cos(h, tanh(P h))``, ``P = v vᵀ / (vᵀ v)``, ``h`` the
mean over the prompt's tokens (or the last token) of HF ``hidden_states[L + 1]`` (the
output of block ``L``), in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from tests import hf_reference


def cast_score_ref(h: np.ndarray, v: np.ndarray) -> float:
    h, v = np.asarray(h, np.float64), np.asarray(v, np.float64)
    proj = np.outer(v, v) / float(v @ v)
    t = np.tanh(proj @ h)
    den = float(np.linalg.norm(h) * np.linalg.norm(t))
    return 0.0 if den == 0 else float(h @ t) / den


@torch.no_grad()
def block_states(model, ids: list[int], layer: int, prompt_dense: torch.Tensor | None = None
                 ) -> np.ndarray:
    """float64 ``[len(ids), hidden]``: block ``layer``'s output for every token, with
    ``prompt_dense`` (``[num_layers, hidden]``) added on every token when given."""
    x = torch.tensor([ids])
    if prompt_dense is None:
        out = model(x, output_hidden_states=True)
    else:
        mask = torch.ones(1, len(ids), dtype=torch.bool)
        with hf_reference.add_dense(model, prompt_dense, mask):
            out = model(x, output_hidden_states=True)
    return out.hidden_states[layer + 1][0].double().numpy()


def ref_score(model, ids: list[int], layer: int, v: np.ndarray, aggregate: str,
              prompt_dense: torch.Tensor | None = None) -> float:
    hs = block_states(model, ids, layer, prompt_dense)
    h = hs.mean(0) if aggregate == "mean" else hs[-1]
    return cast_score_ref(h, v)


def ref_holds(score: float, threshold: float, compare: str) -> bool:
    return score >= threshold if compare == "above" else score <= threshold

"""Training conditions (CAST): a condition direction from two prompt sets, and the search for
the layer, threshold and comparison that best separate them.

A condition recipe (``configs/vectors/*.yaml`` with ``kind: condition``)::

    name: harmful
    kind: condition
    positive_prompts: refusal_harmful.txt   # the condition should hold for these
    negative_prompts: refusal_harmless.txt  # and not for these
    style: chat                             # rendered as the served chat template does
    method: pca_center                      # or mean_diff
    aggregate: mean                         # or last
    layers: all                             # searched
    holdout: 0.3                            # fraction of each set kept out of training
    seed: 0

Steps: (1) each prompt's block outputs at every searched layer, aggregated as the engine
aggregates them (``mean`` over all prompt tokens, chat template included, or the
``last``), read with HF forward passes or through the serving engine's capture; (2) the
prompts are split (per set, seeded) into training and held-out prompts; (3) per layer the
direction from the training prompts: ``pca_center`` (CAST's: the first principal
component of the centred states of both sets) or ``mean_diff`` (mean of the positives
minus mean of the negatives), oriented so that the positives' mean projection is the
larger; (4) every training prompt's score ``cos(h, tanh(P h))`` (``steering.condition``)
at every layer; the search takes the (layer, comparison, threshold) with the largest F1
(positives = the positive set), thresholds ``0.00, 0.01, ..., 1.00`` (CAST's grid),
ties broken by the order layers ascending, ``above`` before ``below``, thresholds
ascending; (5) the F1 of that choice on the held-out prompts. The result is a condition
vector file: unit directions at every searched layer, and the chosen layer, aggregate,
threshold and comparison as its defaults (``steering.condition.CONDITION_META``), with
the F1s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vllm_steer.extract.dataset import DatasetError, PromptSets, build_prompt_sets
from vllm_steer.extract.hidden import tokenize_prompts
from vllm_steer.steering.condition import AGGREGATES, COMPARES, cast_score, defaults_json
from vllm_steer.vector import SteeringVector, VectorMetadata

KIND = "condition"
CONDITION_METHODS = ("pca_center", "mean_diff")
#: CAST's threshold grid.
THRESHOLDS = tuple(round(k / 100, 2) for k in range(101))
_KEYS = {"kind", "aggregate", "holdout", "seed", "method"}


@dataclass
class ConditionConfig:
    """A condition recipe: the prompt sets and format (as a vector recipe's, parsed by
    ``extract.dataset.config_from_mapping``) plus the condition's own keys."""

    base: Any                      # extract.dataset.VectorConfig (prompt sets, style, ...)
    method: str = "pca_center"
    aggregate: str = "mean"
    holdout: float = 0.3
    seed: int = 0

    @property
    def name(self) -> str:
        return self.base.name


def is_condition_recipe(raw: Mapping[str, Any]) -> bool:
    return raw.get("kind") == KIND


def condition_config(raw: Mapping[str, Any], *, base_dir: str = ".", where: str = "recipe",
                     default_name: str = "", allow_files: bool = True) -> ConditionConfig:
    """A validated condition recipe (``DatasetError`` with ``field`` set)."""
    from vllm_steer.extract.dataset import config_from_mapping

    def err(key: str, message: str) -> DatasetError:
        return DatasetError(f"{where}: {message}", field=key)

    if raw.get("kind") != KIND:
        raise err("kind", f"a condition recipe has kind: {KIND}")
    method = raw.get("method", "pca_center")
    if method not in CONDITION_METHODS:
        raise err("method", f"method must be one of {', '.join(CONDITION_METHODS)}, got "
                            f"{method!r}")
    aggregate = raw.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise err("aggregate", f"aggregate must be one of {', '.join(AGGREGATES)}, got "
                               f"{aggregate!r}")
    holdout = raw.get("holdout", 0.3)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) \
            or not 0 <= holdout < 1:
        raise err("holdout", f"holdout must be a fraction in [0, 1), got {holdout!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise err("seed", f"seed must be an integer, got {seed!r}")
    for key in ("positive_prompts", "negative_prompts"):
        if raw.get(key) is None:
            raise err(key, f"a condition is trained from two prompt sets: '{key}' is required")
    shared = {k: v for k, v in raw.items() if k not in _KEYS}
    # the prompt sets, format, layers and output are a vector recipe's
    base = config_from_mapping({**shared, "method": "mean_diff"}, base_dir=base_dir,
                               where=where, default_name=default_name,
                               allow_files=allow_files)
    return ConditionConfig(base, method, aggregate, float(holdout), seed)


def load_condition_config(path: str | Path) -> ConditionConfig:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"{p}: cannot read ({e})") from e
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{p}: expected a mapping at the top level")
    cfg = condition_config(raw, base_dir=str(p.parent), where=str(p), default_name=p.stem)
    if cfg.base.output is not None:
        cfg.base.output = str(p.parent / cfg.base.output)
    return cfg


def build_sets(cfg: ConditionConfig, tokenizer: Any) -> PromptSets:
    return build_prompt_sets(tokenizer, cfg.base.positive_prompts or [],
                             cfg.base.negative_prompts or [], fmt=cfg.base.prompt_format,
                             name=cfg.name)


# -- (1) states ---------------------------------------------------------------------------------
@torch.inference_mode()
def read_prompt_states(model: Any, rows: Sequence[Sequence[int]], layers: Sequence[int],
                       aggregate: str, *, batch_size: int = 16, progress: bool = True
                       ) -> dict[int, torch.Tensor]:
    """``{layer: float32 [len(rows), hidden]}``: each prompt's block-``layer`` outputs,
    ``mean`` over its tokens or its ``last`` token, with an HF causal LM (right-padded
    batches, attention-masked; hidden_states[layer + 1])."""
    out = {layer: [] for layer in layers}
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
    got: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}
    dev = next(model.parameters()).device
    bar = tqdm(total=len(rows), desc="condition states (hf)", disable=not progress,
               unit="prompt")
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        width = max(len(rows[k]) for k in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for b, k in enumerate(idx):
            ids[b, :len(rows[k])] = torch.tensor(rows[k])
            mask[b, :len(rows[k])] = 1
        hs = model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                   output_hidden_states=True).hidden_states
        for layer in layers:
            h = hs[layer + 1].float().cpu()
            for b, k in enumerate(idx):
                n = len(rows[k])
                got[layer][k] = h[b, :n].mean(0) if aggregate == "mean" else h[b, n - 1]
        bar.update(len(idx))
    bar.close()
    for layer in layers:
        out[layer] = torch.stack([got[layer][k] for k in range(len(rows))])
    return out


def read_prompt_states_engine(llm: Any, rows: Sequence[Sequence[int]], layers: Sequence[int],
                              aggregate: str, *, progress: bool = True
                              ) -> dict[int, torch.Tensor]:
    """The same through a ``vllm.LLM``'s hidden-state capture (``at`` mean / last)."""
    from vllm_steer.extract.engine_hidden import capture_hidden

    recs = capture_hidden(llm, [list(r) for r in rows], layers=list(layers), at=aggregate,
                          progress=progress)
    vals = [np.asarray(r["values"], np.float32).reshape(len(layers), -1) for r in recs]
    return {layer: torch.from_numpy(np.stack([v[j] for v in vals]))
            for j, layer in enumerate(layers)}


# -- (2)-(5) direction, search, held-out ----------------------------------------------------------
def condition_direction(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """Unit float32 ``[hidden]`` from ``pos [n_pos, hidden]`` and ``neg [n_neg, hidden]``,
    oriented so that the positives' mean projection exceeds the negatives'."""
    from vllm_steer.extract.methods import first_component

    p, n = pos.double(), neg.double()
    if method == "pca_center":
        d = first_component(torch.cat([p, n]), center=True)
    elif method == "mean_diff":
        d = p.mean(0) - n.mean(0)
    else:
        raise ValueError(f"method must be one of {', '.join(CONDITION_METHODS)}")
    if float((p @ d).mean() - (n @ d).mean()) < 0:
        d = -d
    return (d / d.norm().clamp_min(1e-30)).float()


def f1_score(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of boolean predictions against boolean labels (0 when nothing is right)."""
    tp = int((pred & label).sum())
    fp, fn = int((pred & ~label).sum()), int((~pred & label).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def search(scores: Mapping[int, np.ndarray], label: np.ndarray,
           thresholds: Sequence[float] = THRESHOLDS) -> tuple[int, str, float, float]:
    """``(layer, compare, threshold, f1)`` maximising F1 of ``scores[layer]`` (one per
    prompt) against ``label``; ties keep the first in the order layers ascending,
    ``above`` before ``below``, thresholds ascending."""
    best: tuple[int, str, float, float] | None = None
    for layer in sorted(scores):
        s = np.asarray(scores[layer])
        for compare in COMPARES:
            for t in thresholds:
                pred = s >= t if compare == "above" else s <= t
                f = f1_score(pred, label)
                if best is None or f > best[3]:
                    best = (layer, compare, float(t), f)
    assert best is not None
    return best


def split(n_pos: int, n_neg: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean held-out masks over ``positives + negatives`` (per set, ``round(holdout *
    n)`` prompts, at least one when ``holdout`` > 0 and the set has two)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(n_pos + n_neg, dtype=bool)
    for lo, n in ((0, n_pos), (n_pos, n_neg)):
        k = min(max(round(holdout * n), 1 if holdout > 0 and n > 1 else 0), n - 1)
        held[lo + rng.permutation(n)[:k]] = True
    return ~held, held


@dataclass
class ConditionResult:
    """A trained condition: the vector file's content and the search's report."""

    vector: SteeringVector
    layer: int
    compare: str
    threshold: float
    aggregate: str
    f1_train: float
    f1_heldout: float | None
    per_layer: dict[int, dict[str, Any]]
    heldout_scores: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "compare": self.compare, "threshold": self.threshold,
                "aggregate": self.aggregate, "f1_train": round(self.f1_train, 6),
                "f1_heldout": None if self.f1_heldout is None else round(self.f1_heldout, 6),
                "per_layer": {str(k): v for k, v in self.per_layer.items()},
                "heldout": self.heldout_scores, "seconds": self.seconds}


def fit_condition(states: Mapping[int, torch.Tensor], n_pos: int, *, method: str,
                  aggregate: str, holdout: float, seed: int, prompts: Sequence[str] = (),
                  info: Mapping[str, str] | None = None,
                  thresholds: Sequence[float] = THRESHOLDS) -> ConditionResult:
    """Direction per layer from the training prompts, the search on them, the held-out F1.

    ``states``: ``{layer: [n_pos + n_neg, hidden]}`` (positives first)."""
    layers = sorted(states)
    n = int(next(iter(states.values())).shape[0])
    label = np.arange(n) < n_pos
    train, held = split(n_pos, n - n_pos, holdout, seed)
    dirs, scores, per_layer = {}, {}, {}
    for layer in layers:
        h = states[layer].float()
        d = condition_direction(h[train & label], h[train & ~label], method)
        dirs[layer] = d
        s = cast_score(h, d).numpy().astype(np.float64)
        scores[layer] = s
        lay, cmp_, thr, f = search({layer: s[train]}, label[train], thresholds)
        per_layer[layer] = {"f1_train": round(f, 6), "compare": cmp_, "threshold": thr}
    layer, compare, threshold, f1 = search({k: v[train] for k, v in scores.items()},
                                           label[train], thresholds)
    f1_held = None
    heldout = []
    if held.any():
        s = scores[layer][held]
        pred = s >= threshold if compare == "above" else s <= threshold
        f1_held = f1_score(pred, label[held])
        for k in np.flatnonzero(held):
            sk = float(scores[layer][k])
            heldout.append({"positive": bool(label[k]), "score": round(sk, 6),
                            "holds": bool(sk >= threshold if compare == "above"
                                          else sk <= threshold),
                            **({"prompt": prompts[k]} if prompts else {})})
    hidden = int(dirs[layers[0]].shape[0])
    extra = {**(info or {})}
    extra["condition"] = defaults_json(layer, aggregate, threshold, compare,
                                       f1_train=round(f1, 6),
                                       f1_heldout=None if f1_held is None else round(f1_held, 6),
                                       method=method, holdout=holdout, seed=seed)
    extra["condition_search"] = json.dumps({str(k): v for k, v in per_layer.items()})
    extra["layers"] = json.dumps(layers)
    extra["num_positive"], extra["num_negative"] = str(n_pos), str(n - n_pos)
    meta = VectorMetadata(hidden_size=hidden, method=f"condition-{method}", extra=extra)
    return ConditionResult(SteeringVector(dirs, meta), layer, compare, threshold, aggregate,
                           f1, f1_held, per_layer, heldout)


def train_condition(model: Any, tokenizer: Any, sets: PromptSets, layers: Sequence[int], *,
                    method: str = "pca_center", aggregate: str = "mean", holdout: float = 0.3,
                    seed: int = 0, batch_size: int = 16, progress: bool = True,
                    model_info: Any = None) -> ConditionResult:
    """Train a condition on ``model`` (an HF causal LM, or a ``vllm.LLM``: states through
    its capture) from ``sets`` (positives: where it should hold)."""
    from vllm_steer.extract.train import is_engine

    t0 = time.perf_counter()
    prompts = [*sets.positives, *sets.negatives]
    rows = tokenize_prompts(tokenizer, prompts, add_special_tokens=sets.add_special_tokens)
    if is_engine(model):
        states = read_prompt_states_engine(model, rows, layers, aggregate, progress=progress)
    else:
        states = read_prompt_states(model, rows, layers, aggregate, batch_size=batch_size,
                                    progress=progress)
    t1 = time.perf_counter()
    info = {"dataset_name": sets.name, **{k: str(v) for k, v in sets.info.items()}}
    res = fit_condition(states, len(sets.positives), method=method, aggregate=aggregate,
                        holdout=holdout, seed=seed, prompts=prompts, info=info)
    if model_info is not None:
        from dataclasses import replace

        meta = replace(res.vector.metadata, model_name=model_info.name,
                       architecture=model_info.architecture, num_layers=model_info.num_layers,
                       dataset_fingerprint=sets.fingerprint())
        res.vector = SteeringVector(dict(res.vector.directions), meta)
    res.seconds = {"states": round(t1 - t0, 3), "fit": round(time.perf_counter() - t1, 3)}
    return res


def plot_search(res: ConditionResult, path: str | Path) -> None:
    """Training F1 of the best threshold per layer, the chosen layer marked, held-out F1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(res.per_layer)
    f1 = [res.per_layer[k]["f1_train"] for k in layers]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(layers, f1, marker="o", label="training F1 (best threshold per layer)")
    ax.axvline(res.layer, color="gray", ls=":", label=f"chosen: layer {res.layer}, "
               f"{res.compare} {res.threshold:.2f}")
    if res.f1_heldout is not None:
        ax.scatter([res.layer], [res.f1_heldout], color="red", zorder=3,
                   label=f"held-out F1 {res.f1_heldout:.2f}")
    ax.set_xlabel("layer")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"condition search ({res.aggregate})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def extract_condition(cfg: ConditionConfig, *, model_path: str | None = None,
                      dtype: str | None = None, engine: str = "hf", model: Any = None,
                      tokenizer: Any = None, batch_size: int | None = None,
                      progress: bool = True) -> ConditionResult:
    """Load the model (unless given: an HF model or a ``vllm.LLM``), build the recipe's
    prompt sets with its tokenizer and ``train_condition`` on every recipe layer."""
    from transformers import AutoTokenizer

    from vllm_steer.default_model import resolve_model
    from vllm_steer.extract.train import (
        engine_model_info,
        extraction_llm,
        hf_model_info,
        is_engine,
        load_model,
        resolve_layers,
    )

    dtype = dtype or cfg.base.dtype
    local = None
    if tokenizer is None:
        local = resolve_model(model_path or cfg.base.model)
        tokenizer = AutoTokenizer.from_pretrained(local)
    sets = build_sets(cfg, tokenizer)
    started = None
    if model is None:
        local = local or resolve_model(model_path or cfg.base.model)
        if engine == "vllm":
            model = started = extraction_llm(str(local), dtype)
        else:
            model, _ = load_model(local, dtype=dtype)
    try:
        if is_engine(model):
            from vllm_steer.vllm_adapter.engine import vllm_config

            info = engine_model_info(vllm_config(model))
        else:
            info = hf_model_info(model)
        layers = resolve_layers(cfg.base.layers if cfg.base.layers is not None else "all",
                                info.num_layers)
        return train_condition(model, tokenizer, sets, layers, method=cfg.method,
                               aggregate=cfg.aggregate, holdout=cfg.holdout, seed=cfg.seed,
                               batch_size=batch_size or cfg.base.batch_size, progress=progress,
                               model_info=info)
    finally:
        if started is not None:
            from vllm_steer.llm_factory import shutdown

            shutdown(started)


async def read_prompt_states_engine_async(engine: Any, rows: Sequence[Sequence[int]],
                                          layers: Sequence[int], aggregate: str, *,
                                          max_concurrent: int | None = None,
                                          data_parallel_rank: int | None = None,
                                          budget: Any = None,
                                          on_submit: Any = None,
                                          ) -> dict[int, torch.Tensor]:
    """``read_prompt_states_engine`` on an ``EngineClient`` (the training route), while
    the engine serves other traffic; ``budget`` (``extract.capture_budget.CaptureBudget``)
    paces the captures and ``on_submit(prompt_tokens)`` counts them, as in
    ``run_captures_async``."""
    from vllm_steer.extract.engine_hidden import CaptureRequest, run_captures_async

    spec = {"layers": list(layers), "at": aggregate}
    recs = await run_captures_async(engine, [CaptureRequest(list(r), spec) for r in rows],
                                    max_concurrent=max_concurrent,
                                    data_parallel_rank=data_parallel_rank, budget=budget,
                                    on_submit=on_submit)
    vals = [np.asarray(r["values"], np.float32).reshape(len(layers), -1) for r in recs]
    return {layer: torch.from_numpy(np.stack([v[j] for v in vals]))
            for j, layer in enumerate(layers)}

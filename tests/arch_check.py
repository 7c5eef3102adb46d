"""One steered mixed batch on a vLLM engine, checked against HF transformers with forward
hooks on the same weights (teacher-forced: one full forward over prompt + vLLM's tokens).

Used by the architecture matrix (eager and compiled) and the thinking-tokenizer tests.
The reference masks come from ``tests.steer_helpers.position_mask`` (markers matched on
token ids by a separate implementation), the hooks and vector files from
``tests.hf_reference``, never from the plugin's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.hf_reference import add_dense
from tests.steer_helpers import composed_dense, position_mask
from vllm_steer.fixtures.vectors import write_vectors as write_random_vectors

LOGPROB_ATOL = 2e-3
#: A greedy step may pick HF's runner-up only when the two are this close (nats): a tie
#: that float rounding may break either way. Counted and reported, never silently.
NEAR_TIE = 1e-3


def serve_arch(name: str, tokenizer_dir: str, root: Path, **engine_options):
    """Yield ``(name, llm, hf_model, tokenizer, registry)`` for a tiny ``name`` checkpoint:
    test vectors, an engine (in-process core except for the Transformers backend, which
    decorates HF classes in the process that builds the model and would break the HF
    reference here), the HF reference model; stops the engine afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.steer_helpers import env_registry
    from vllm_steer.fixtures.engines import inproc_engine, make_test_llm, shutdown
    from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS, build_tiny_model, tiny_arch

    model_dir = build_tiny_model(name, tokenizer_dir)
    reg = write_vectors(root, HIDDEN, LAYERS)
    env_registry(reg)
    with inproc_engine(tiny_arch(name).adapter != "hf_batched"):
        llm = make_test_llm(str(model_dir), max_model_len=512, **engine_options)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        yield name, llm, hf, AutoTokenizer.from_pretrained(model_dir), reg
    finally:
        shutdown(llm)


def write_vectors(root: Path, hidden: int, num_layers: int, scale: float = 4.0) -> Path:
    """Two random vectors ``a`` (all layers) and ``b`` (layers 1..) plus a registry."""
    return write_random_vectors(root, {"a": range(num_layers), "b": range(1, num_layers)},
                                hidden=hidden, norm_scale=scale, seed=7)


@dataclass
class Case:
    """One request of the batch: prompt ids, composed vectors (empty = unsteered), mode,
    and ``start_position`` (0: none)."""

    prompt: list[int]
    parts: list[tuple[str, float]]
    mode: str = "all"
    prompt_logprobs: bool = False
    start: int = 0

    @property
    def spec(self) -> dict | None:
        if not self.parts:
            return None
        spec = {"vectors": [{"name": n, "scale": s} for n, s in self.parts],
                "apply_to": self.mode}
        return {**spec, "start_position": self.start} if self.start else spec


@dataclass
class Report:
    near_ties: int = 0
    max_lp_err: float = 0.0
    max_prompt_lp_err: float = 0.0
    steered_effect: float = 0.0   # max |steered - unsteered| HF log-prob over sampled tokens
    #: per request: max |steered - unsteered| HF log-prob over its sampled tokens and, with
    #: prompt log-probs, its prompt tokens (0 for an unsteered request)
    effects: list[float] = field(default_factory=list)


def run_cases(llm, cases: list[Case], n_tokens: int = 12):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, logprobs=0,
                             prompt_logprobs=0 if c.prompt_logprobs else None,
                             extra_args={"steering": c.spec} if c.spec else None)
              for c in cases]
    return llm.generate([{"prompt_token_ids": c.prompt} for c in cases], params, use_tqdm=False)


@torch.no_grad()
def _hf_logp(model, ids: list[int], delta: torch.Tensor | None, mask) -> torch.Tensor:
    x = torch.tensor([ids])
    if delta is None:
        logits = model(x).logits
    else:
        with add_dense(model, delta, mask):
            logits = model(x).logits
    return torch.log_softmax(logits[0].float(), -1)


def check_against_hf(model, reg: Path, cases: list[Case], outs, num_layers: int, hidden: int,
                     markers: tuple[list[int], list[int]] | None = None) -> Report:
    """Assert every request equals the HF reference; return what was measured."""
    rep = Report()
    for k, (case, out) in enumerate(zip(cases, outs, strict=True)):
        comp = out.outputs[0]
        gen = list(comp.token_ids)
        ids = case.prompt + gen
        n = len(case.prompt)
        delta = composed_dense(reg, case.parts, num_layers, hidden) if case.parts else None
        mask = (position_mask(ids, case.mode, n, case.start, markers=markers)
                if delta is not None else None)
        if mask is not None:
            assert 0 < int(mask.sum()), f"request {k}: the reference steers nothing"
        logp = _hf_logp(model, ids, delta, mask)
        plain = _hf_logp(model, ids, None, None) if delta is not None else logp
        effect = 0.0
        for t, tok in enumerate(gen):
            row = logp[n - 1 + t]
            best = int(row.argmax())
            if tok != best:
                gap = float(row[best] - row[tok])
                assert gap < NEAR_TIE, (f"request {k} ({case.mode}) step {t}: vLLM chose {tok}, "
                                        f"HF {best} by {gap:.4f} nats")
                rep.near_ties += 1
            err = abs(comp.logprobs[t][tok].logprob - float(row[tok]))
            assert err < LOGPROB_ATOL, f"request {k} ({case.mode}) step {t}: log-prob off by {err}"
            rep.max_lp_err = max(rep.max_lp_err, err)
            effect = max(effect, abs(float(row[tok]) - float(plain[n - 1 + t, tok])))
        rep.steered_effect = max(rep.steered_effect, effect)
        if case.prompt_logprobs:
            for p in range(1, n):
                got = out.prompt_logprobs[p][case.prompt[p]].logprob
                err = abs(got - float(logp[p - 1, case.prompt[p]]))
                assert err < LOGPROB_ATOL, f"request {k}: prompt log-prob {p} off by {err}"
                rep.max_prompt_lp_err = max(rep.max_prompt_lp_err, err)
                effect = max(effect, abs(float(logp[p - 1, case.prompt[p]])
                                         - float(plain[p - 1, case.prompt[p]])))
        rep.effects.append(effect)
    return rep


@dataclass
class Gap:
    """Unsteered vLLM vs HF (nats): the worst sampled-token and prompt-token log-prob
    differences, and greedy steps where vLLM's token is not HF's (nor within NEAR_TIE)."""

    max_lp_err: float = 0.0
    max_prompt_lp_err: float = 0.0
    greedy_mismatches: int = 0

    @property
    def worst(self) -> float:
        return max(self.max_lp_err, self.max_prompt_lp_err)


def unsteered_gap(llm, model, prompts: list[list[int]], n_tokens: int = 12) -> Gap:
    """Measure (assert nothing) how far vLLM's unsteered log-probs are from HF's on the same
    weights: greedy continuations of ``prompts`` with every prompt log-prob, teacher-forced
    through HF. Steering is only judged against HF where this is ~0."""
    outs = run_cases(llm, [Case(p, [], prompt_logprobs=True) for p in prompts], n_tokens)
    gap = Gap()
    for prompt, out in zip(prompts, outs, strict=True):
        comp = out.outputs[0]
        gen = list(comp.token_ids)
        n = len(prompt)
        logp = _hf_logp(model, prompt + gen, None, None)
        for t, tok in enumerate(gen):
            row = logp[n - 1 + t]
            if float(row.max() - row[tok]) >= NEAR_TIE:
                gap.greedy_mismatches += 1
            err = abs(comp.logprobs[t][tok].logprob - float(row[tok]))
            gap.max_lp_err = max(gap.max_lp_err, err)
        for p in range(1, n):
            gap.max_prompt_lp_err = max(gap.max_prompt_lp_err, abs(
                out.prompt_logprobs[p][prompt[p]].logprob - float(logp[p - 1, prompt[p]])))
    return gap


def think_ids(tok, start: str, end: str, closed: bool) -> list[int]:
    """A prompt with a thinking section (closed, or still open at the end)."""
    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    ids = enc("Question: is seven a prime number? Think first.\n") + enc(start) \
        + enc("\nSeven has no divisors other than one and itself, so")
    if closed:
        ids += enc(" it is prime.\n") + enc(end) + enc("\nAnswer:")
    return ids

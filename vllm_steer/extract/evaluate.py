"""Checking a vector with HF forward hooks: yes/no log-odds on held-out questions.

Question files (``configs/questions/*.yaml``) are the probes' format
(``vllm_steer.probe.questions``) with two choices and every ``expected`` given::

    choices: ["Yes", "No"]            # first = the "yes" answer
    instruction: "Answer with Yes or No."   # optional, appended after a space
    questions:
      - {question: "Are you feeling happy right now?", expected: "Yes"}

``expected`` is the answer of a speaker in the vector's positive persona.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vllm_steer.extract.dataset import DatasetError
from vllm_steer.extract.hidden import pad_batch
from vllm_steer.hf_steering import steer_hf
from vllm_steer.probe.choices import normalize
from vllm_steer.probe.questions import load_questions as load_question_set
from vllm_steer.stats import pearson
from vllm_steer.vector import SteeringVector


@dataclass(frozen=True)
class YesNoQuestions:
    questions: tuple[str, ...]
    expected: tuple[str, ...]
    choices: tuple[str, str] = ("Yes", "No")
    instruction: str = ""

    @property
    def signs(self) -> torch.Tensor:
        """float ``[n]``: +1 where the positive persona answers ``choices[0]``, else -1."""
        return torch.tensor([1.0 if e == self.choices[0] else -1.0 for e in self.expected])


def load_questions(path: str | os.PathLike[str]) -> YesNoQuestions:
    """A two-choice question file (the probes' format, ``vllm_steer.probe.questions``) with
    every question's ``expected`` answer given."""
    qs = load_question_set(path)
    for k, q in enumerate(qs.questions):
        if len(q.choices) != 2:
            raise DatasetError(f"{path}: questions[{k}] must have exactly two choices")
        if q.expected is None:
            raise DatasetError(f"{path}: questions[{k}].expected must be one of {q.choices}")
    choices = qs.questions[0].choices
    if any(q.choices != choices for q in qs.questions):
        raise DatasetError(f"{path}: every question must have the same two choices")
    expected = tuple(next(c for c in choices if normalize(c) == normalize(q.expected))
                     for q in qs.questions)
    # the question texts already end with the file's instruction
    return YesNoQuestions(tuple(qs.texts), expected, (choices[0], choices[1]), "")


def _first_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return ids[0]


def question_prompts(tokenizer, qs: YesNoQuestions) -> list[str]:
    """Chat prompts (generation prompt open) for every question."""
    out = []
    for q in qs.questions:
        text = f"{q} {qs.instruction}".strip()
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True))
    return out


@torch.inference_mode()
def yes_no_log_odds(
    model: nn.Module,
    tokenizer,
    qs: YesNoQuestions,
    vector: SteeringVector | None = None,
    scale: float = 0.0,
) -> torch.Tensor:
    """float ``[n_questions]``: ``log P(choices[0]) - log P(choices[1])`` for the first answer
    token, with ``scale * vector`` added at every position (HF hooks) when given."""
    prompts = question_prompts(tokenizer, qs)
    rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, pos, _ = pad_batch(rows, pad_id=pad, side="left")
    yes, no = _first_token(tokenizer, qs.choices[0]), _first_token(tokenizer, qs.choices[1])
    device = next(model.parameters()).device

    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # left padding: the last column is every row's last token

    def run() -> torch.Tensor:
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=pos.to(device), use_cache=False, **kwargs)
        logp = out.logits[:, -1].float().log_softmax(-1)
        return (logp[:, yes] - logp[:, no]).cpu()

    if vector is None or scale == 0:
        return run()
    with steer_hf(model, vector, scale=scale):
        return run()


def scale_sweep(
    model: nn.Module,
    tokenizer,
    qs: YesNoQuestions,
    vector: SteeringVector,
    scales: Sequence[float],
) -> dict[str, object]:
    """Per scale: mean raw log-odds (``log P(Yes) - log P(No)``) and mean persona-signed
    log-odds (flipped on questions a positive persona answers "No"), plus Pearson r of each
    against the scale."""
    raw, signed = [], []
    for s in scales:
        lo = yes_no_log_odds(model, tokenizer, qs, vector, s)
        raw.append(float(lo.mean()))
        signed.append(float((lo * qs.signs).mean()))
    return {"scales": list(scales), "mean_log_odds": raw, "mean_signed_log_odds": signed,
            "r_raw": pearson(scales, raw), "r_signed": pearson(scales, signed)}

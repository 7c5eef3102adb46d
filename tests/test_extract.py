"""Fast tests of offline extraction: methods on planted directions, padding/batch invariance on
a tiny random llama, thinking-style prompt strings, bad input, CLI, and the HF hook helper."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from vllm_steer.extract import (
    ContrastiveDataset,
    DatasetError,
    build_dataset,
    load_config,
    methods,
    separation_scores,
    train,
)
from vllm_steer.extract.dataset import (
    ContrastivePair,
    PromptFormat,
    as_dataset,
    build_persona_dataset,
    expand_suffixes,
    load_suffixes,
    render_prompt,
)
from vllm_steer.extract.hidden import HiddenStateError, read_last_token
from vllm_steer.extract.train import resolve_layers
from vllm_steer.hf_steering import steer_hf
from vllm_steer.vector import SteeringVector

REPO = Path(__file__).resolve().parent.parent
NUM_LAYERS = 4


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from vllm_steer.default_model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=len(tokenizer),
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    # A stronger signal than the default init: random weights with std 0.02 barely move h.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="module")
def small_dataset(tokenizer) -> ContrastiveDataset:
    sfx = ["I think", "Well, honestly", "The answer is", "Sure, let me", "Today I feel"]
    return build_persona_dataset(tokenizer, [("happy", "sad"), ("joyful", "gloomy")], sfx,
                                 name="small")


THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Opens the thinking section itself (DeepSeek-R1 style), honouring enable_thinking.
THINK_TEMPLATE_OPEN = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


# -- methods on synthetic hidden states --------------------------------------------------------
def _planted(n=300, hidden=64, seed=0, flip_fraction=0.0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(hidden, generator=g, dtype=torch.float64)
    d = d / d.norm()
    base = 2.0 * torch.randn(n, hidden, generator=g, dtype=torch.float64)  # shared per pair
    a = 1.0 + 2.0 * torch.rand(n, 1, generator=g, dtype=torch.float64)  # gap varies per pair
    if flip_fraction:
        a[: int(n * flip_fraction)] *= -1  # a minority of pairs ordered the wrong way
    pos = base + a / 2 * d + 0.1 * torch.randn(n, hidden, generator=g, dtype=torch.float64)
    neg = base - a / 2 * d + 0.1 * torch.randn(n, hidden, generator=g, dtype=torch.float64)
    return pos.float(), neg.float(), d.float()


@pytest.mark.parametrize("method", methods.METHODS)
@pytest.mark.parametrize("flip", [0.0, 0.2])
def test_methods_recover_planted_direction_with_sign(method, flip):
    pos, neg, d = _planted(flip_fraction=flip)
    got = methods.find_direction(pos, neg, method)
    cos = torch.nn.functional.cosine_similarity(got, d, dim=0).item()
    assert cos > 0.99, (method, cos)
    # swapping positive and negative flips the sign
    got_swapped = methods.find_direction(neg, pos, method)
    assert torch.nn.functional.cosine_similarity(got_swapped, d, dim=0).item() < -0.99
    assert methods.separation(pos, neg, got) == pytest.approx(1.0 - flip, abs=0.02)


def test_pca_shapes_and_norms():
    pos, neg, _ = _planted(n=10, hidden=8)
    for fn in (methods.pca_diff, methods.pca_center):
        v = fn(pos, neg)
        assert v.shape == (8,) and v.norm().item() == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="n_pairs, hidden"):
        methods.pca_center(pos, neg[:5])
    with pytest.raises(ValueError, match="unknown method"):
        methods.find_direction(pos, neg, "svm")


def test_orient_majority_and_tie_break():
    d = torch.tensor([1.0, 0.0])
    pos = torch.tensor([[1.0, 0], [1.0, 0], [-5.0, 0]])
    neg = torch.zeros(3, 2)
    # two of three pairs say +d although the summed margin is negative: majority wins
    assert torch.equal(methods.orient(pos, neg, -d), d)
    pos2 = torch.tensor([[1.0, 0], [-3.0, 0]])
    assert torch.equal(methods.orient(pos2, torch.zeros(2, 2), d), -d)  # tie: sum decides


# -- datasets and prompt strings ---------------------------------------------------------------
def test_suffix_sets_shipped():
    chat, reasoning = load_suffixes("chat"), load_suffixes("reasoning")
    assert len(chat) >= 200 and len(reasoning) >= 50
    assert "I think" in chat and "Wait, but" in reasoning
    assert not any(s.startswith("#") for s in chat + reasoning)


def test_expand_suffixes_token_prefixes(tokenizer):
    out = expand_suffixes(tokenizer, ["I think so", "I think"])
    assert out[:3] == ["I", "I think", "I think so"]
    assert len(out) == 3  # de-duplicated


def test_chat_prompt_strings(tokenizer, small_dataset):
    p = small_dataset.pairs[1]
    head = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nAct as if you're extremely {}.<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert p.positive == head.format("happy") + "I think"
    assert p.negative == head.format("sad") + "I think"
    assert small_dataset.add_special_tokens is False
    # one suffix gives one pair per token prefix, per persona pair
    n_openers = len(expand_suffixes(tokenizer, ["I think", "Well, honestly", "The answer is",
                                                "Sure, let me", "Today I feel"]))
    assert len(small_dataset) == 2 * n_openers


def test_thinking_prompt_strings_template_without_marker(tokenizer):
    tok = _with_template(tokenizer, THINK_TEMPLATE)
    fmt = PromptFormat(style="thinking")
    ds = build_persona_dataset(tok, [("careful", "careless")], ["Wait, but"], fmt=fmt)
    assert [p.positive for p in ds.pairs] == [
        "<|user|>\nPretend you're careful. You think step by step consistent with your "
        "identity.<|end|>\n<|assistant|>\n<think>\nWait",
        "<|user|>\nPretend you're careful. You think step by step consistent with your "
        "identity.<|end|>\n<|assistant|>\n<think>\nWait,",
        "<|user|>\nPretend you're careful. You think step by step consistent with your "
        "identity.<|end|>\n<|assistant|>\n<think>\nWait, but",
    ]
    assert ds.pairs[-1].negative == (
        "<|user|>\nPretend you're careless. You think step by step consistent with your "
        "identity.<|end|>\n<|assistant|>\n<think>\nWait, but")


def test_thinking_prompt_template_opens_think_itself(tokenizer):
    tok = _with_template(tokenizer, THINK_TEMPLATE_OPEN)
    fmt = PromptFormat(style="thinking", system_prompt="Be yourself.")
    got = render_prompt(tok, "Pretend you're calm.", "Let me reconsider", fmt)
    assert got == ("<|system|>\nBe yourself.<|end|>\n<|user|>\nPretend you're calm.<|end|>\n"
                   "<|assistant|>\n<think>\nLet me reconsider")  # marker not doubled
    # chat style on the same template keeps whatever the template emits
    chat = render_prompt(tok, "Hi.", "Sure", PromptFormat(style="chat"))
    assert chat == "<|user|>\nHi.<|end|>\n<|assistant|>\n<think>\nSure"
    # thinking explicitly disabled: the template closes the section -> clear error
    off = PromptFormat(style="thinking", chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(DatasetError, match="closes the thinking section"):
        render_prompt(tok, "Hi.", "Wait", off)


def test_thinking_custom_markers(tokenizer):
    tok = _with_template(tokenizer, THINK_TEMPLATE)
    fmt = PromptFormat(style="thinking", think_open="<reasoning>", think_close="</reasoning>")
    got = render_prompt(tok, "Pretend you're bold.", " First, the", fmt)
    assert got == "<|user|>\nPretend you're bold.<|end|>\n<|assistant|>\n<reasoning> First, the"


def test_thinking_config_on_default_tokenizer(tokenizer):
    cfg = load_config(REPO / "configs/vectors/cautious_thinking.yaml")
    ds = build_dataset(cfg, tokenizer)
    assert cfg.style == "thinking" and len(ds) > 100
    assert ds.pairs[0].positive.endswith("<|im_start|>assistant\n<think>\nWait")
    assert "cautious" in ds.pairs[0].positive and "reckless" in ds.pairs[0].negative


def test_shipped_configs_load():
    happy = load_config(REPO / "configs/vectors/happy.yaml")
    assert happy.personas == [("happy", "sad")] and happy.style == "chat"
    assert happy.output == str(REPO / "configs/vectors/happy.safetensors")
    assert resolve_layers(happy.layers, 30) == list(range(4, 26))


def test_pairs_list_and_fingerprint():
    ds = as_dataset([("I love it", "I hate it"), {"positive": "yay", "negative": "nay"}])
    assert ds.add_special_tokens is True and len(ds) == 2
    again = as_dataset([ContrastivePair("I love it", "I hate it"), ("yay", "nay")])
    assert ds.fingerprint() == again.fingerprint()
    assert ds.fingerprint() != as_dataset([("yay", "nay")]).fingerprint()

    class Entry:  # repeng.DatasetEntry look-alike
        def __init__(self, positive, negative):
            self.positive, self.negative = positive, negative

    assert as_dataset([Entry("a", "b")]).pairs == (ContrastivePair("a", "b"),)


def test_config_with_pairs_file(tmp_path, tokenizer):
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps(["I am glad", "I am upset"]) + "\n"
        + json.dumps({"positive": "Great!", "negative": "Awful."}) + "\n")
    (tmp_path / "v.yaml").write_text("pairs_file: pairs.jsonl\nlayers: [1, 2]\n")
    cfg = load_config(tmp_path / "v.yaml")
    ds = build_dataset(cfg, tokenizer)
    assert ds.pairs == (ContrastivePair("I am glad", "I am upset"),
                        ContrastivePair("Great!", "Awful."))


# -- bad input ---------------------------------------------------------------------------------
def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_empty_dataset_errors(tmp_path, tiny_model, tokenizer):
    with pytest.raises(DatasetError, match="empty"):
        as_dataset([])
    with pytest.raises(DatasetError, match="empty"):
        train(tiny_model, tokenizer, [])
    with pytest.raises(DatasetError, match="empty"):
        load_config(_write(tmp_path, "pairs: []\n"))
    with pytest.raises(DatasetError, match="empty"):
        load_config(_write(tmp_path, "personas: [[happy, sad]]\nsuffixes: []\n"))
    with pytest.raises(DatasetError, match="personas"):
        load_config(_write(tmp_path, "personas: []\n"))
    with pytest.raises(DatasetError, match="identical"):
        as_dataset([("same", "same")])


def test_template_without_placeholder(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match=r"no \{persona\} placeholder"):
        load_config(_write(tmp_path, "template: Act happy.\npersonas: [[happy, sad]]\n"))
    with pytest.raises(DatasetError, match=r"\{persona\}"):
        build_persona_dataset(tokenizer, [("a", "b")], ["x"], template="Act as if.")


def test_missing_chat_template(tmp_path, tokenizer):
    tok = _with_template(tokenizer, None)
    cfg = load_config(_write(tmp_path, "personas: [[happy, sad]]\nsuffixes: [I think]\n"))
    with pytest.raises(DatasetError, match="needs a chat template"):
        build_dataset(cfg, tok)
    # style plain needs none
    cfg = load_config(_write(tmp_path, "style: plain\npersonas: [[happy, sad]]\n"
                                       "suffixes: [I think]\n"))
    ds = build_dataset(cfg, tok)
    assert ds.pairs[0].positive == "Act as if you're extremely happy.\nI"
    assert ds.add_special_tokens is True


def test_bad_config_values(tmp_path):
    for text, msg in [
        ("personas: [[a, b]]\nstyle: poem\n", "style"),
        ("personas: [[a, b]]\nmethod: svm\n", "method"),
        ("personas: [[a, b]]\nlayers: 'one to five'\n", "layers"),
        ("personas: [[a, b]]\ncolour: red\n", "unknown keys"),
        ("personas: [[a, b]]\nsuffixes: nosuchset\n", "neither a shipped set"),
        ("personas: [a, b]\n", r"personas\[0\]"),
        ("personas: [[a, b]]\ndtype: int8\n", "dtype"),
    ]:
        with pytest.raises(DatasetError, match=msg):
            load_config(_write(tmp_path, text))


def test_layers_out_of_range_before_any_forward(tiny_model, tokenizer, small_dataset):
    calls = []
    h = tiny_model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"out of range.*4 layers"):
            train(tiny_model, tokenizer, small_dataset, layers=[1, 7], progress=False)
        with pytest.raises(ValueError, match="selects no layer"):
            train(tiny_model, tokenizer, small_dataset, layers="9:12", progress=False)
        with pytest.raises(ValueError, match="unknown method"):
            train(tiny_model, tokenizer, small_dataset, method="svm", progress=False)
    finally:
        h.remove()
    assert not calls
    assert resolve_layers([-1, 0], 4) == [0, 3]
    assert resolve_layers(None, 4) == [1, 2, 3]
    assert resolve_layers("all", 4) == [0, 1, 2, 3]


def test_non_finite_hidden_states_name_the_layer(tiny_model, tokenizer, small_dataset):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(HiddenStateError, match="layer 2 produced non-finite"):
        train(model, tokenizer, small_dataset, layers=[1, 2, 3], progress=False)


# -- hidden states and training on a tiny random llama -----------------------------------------
def test_hidden_states_match_hf_hidden_states(tiny_model, tokenizer, small_dataset):
    prompts = small_dataset.positives[:3]
    got = read_last_token(tiny_model, tokenizer, prompts, [0, 2], add_special_tokens=False,
                          progress=False, share_prefix=False)
    for i, p in enumerate(prompts):
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            hs = tiny_model(**ids, output_hidden_states=True).hidden_states
        for layer in (0, 2):
            torch.testing.assert_close(got[layer][i], hs[layer + 1][0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_padding_and_batch_size_invariance(tiny_model, tokenizer, small_dataset, share_prefix):
    prompts = small_dataset.positives + small_dataset.negatives
    ref = read_last_token(tiny_model, tokenizer, prompts, range(NUM_LAYERS), batch_size=1,
                          add_special_tokens=False, share_prefix=False, progress=False)
    for side in ("left", "right"):
        for bs in (3, 64):
            got = read_last_token(tiny_model, tokenizer, prompts, range(NUM_LAYERS),
                                  batch_size=bs, add_special_tokens=False, padding_side=side,
                                  share_prefix=share_prefix, progress=False)
            for layer in range(NUM_LAYERS):
                torch.testing.assert_close(got[layer], ref[layer], rtol=1e-4, atol=1e-4)

    vectors = [
        train(tiny_model, tokenizer, small_dataset, layers="all", method=m, batch_size=bs,
              padding_side=side, share_prefix=share_prefix, progress=False)
        for m in methods.METHODS for side in ("left", "right") for bs in (1, 5, 64)
    ]
    for k in range(0, len(vectors), 6):
        group = vectors[k : k + 6]
        for v in group[1:]:
            for layer in range(NUM_LAYERS):
                a, b = group[0].directions[layer], v.directions[layer]
                assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.9999


def _tiny_other(arch: str, vocab: int):
    import transformers as tr

    small = dict(num_hidden_layers=3, num_attention_heads=4, vocab_size=vocab)
    cfg = {
        "gpt2": lambda: tr.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=vocab),
        "qwen2": lambda: tr.Qwen2Config(hidden_size=64, num_key_value_heads=2,
                                        intermediate_size=128, **small),
        # sliding window smaller than the prompts: padding placement matters here
        "gemma2": lambda: tr.Gemma2Config(hidden_size=64, num_key_value_heads=2, head_dim=16,
                                          intermediate_size=128, sliding_window=4, **small),
        "opt": lambda: tr.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64,
                                    **small),  # learned absolute positions
    }[arch]()
    torch.manual_seed(0)
    return tr.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma2", "opt"])
def test_read_last_token_other_architectures(arch, tokenizer):
    model = _tiny_other(arch, len(tokenizer))
    head = "<|im_start|>user\nAct as if you're extremely happy.<|im_end|>\n<|im_start|>assistant\n"
    prompts = [head + s for s in ["I", "I think", "I think so", "Well,", "Well, honestly", "The"]]
    ref = read_last_token(model, tokenizer, prompts, [0, 1, 2], batch_size=1,
                          add_special_tokens=False, share_prefix=False, progress=False)
    for share in (True, False):
        for side in ("left", "right"):
            got = read_last_token(model, tokenizer, prompts, [0, 1, 2], batch_size=4,
                                  add_special_tokens=False, share_prefix=share,
                                  padding_side=side, progress=False)
            for layer in range(3):
                torch.testing.assert_close(got[layer], ref[layer], rtol=1e-4, atol=1e-4)
    v = SteeringVector({1: torch.ones(64)})
    ids = _ids(tokenizer, head)
    with torch.no_grad():
        base = model(ids).logits
        with steer_hf(model, v, scale=2.0):
            steered = model(ids).logits
    assert not torch.allclose(base, steered)


def test_train_metadata_and_scores(tiny_model, tokenizer, small_dataset):
    v = train(tiny_model, tokenizer, small_dataset, layers=[1, 3], method="mean_diff",
              progress=False)
    assert v.layers == [1, 3] and v.hidden_size == 64
    assert all(t.norm().item() == pytest.approx(1.0, abs=1e-5) for t in v.directions.values())
    md = v.metadata
    assert md.method == "mean_diff" and md.num_layers == NUM_LAYERS and md.hidden_size == 64
    assert md.architecture == "llama"
    assert md.dataset_fingerprint == small_dataset.fingerprint()
    assert json.loads(md.extra["layers"]) == [1, 3]
    assert md.extra["num_pairs"] == str(len(small_dataset)) and md.extra["style"] == "chat"
    scores = separation_scores(v)
    assert set(scores) == {1, 3} and all(0.5 <= s <= 1.0 for s in scores.values())
    raw = train(tiny_model, tokenizer, small_dataset, layers=[1], method="mean_diff",
                normalize="none", progress=False)
    assert raw.directions[1].norm().item() != pytest.approx(1.0, abs=1e-3)


def test_train_bf16_and_raw_pairs(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    pairs = [("I am so glad today", "I am so upset today"),
             ("What a lovely morning", "What an awful morning"),
             ("Everything is great", "Everything is terrible")]
    v = train(model, tokenizer, pairs, layers=[1, 2], method="pca_diff", progress=False)
    ref = train(tiny_model, tokenizer, pairs, layers=[1, 2], method="pca_diff", progress=False)
    assert v.metadata.extra["dtype"] == "bfloat16"
    for layer in (1, 2):
        cos = torch.nn.functional.cosine_similarity(v.directions[layer], ref.directions[layer], 0)
        assert cos.item() > 0.95


def test_vector_roundtrip_and_plot(tmp_path, tiny_model, tokenizer, small_dataset):
    from vllm_steer.extract.plot import plot_separation

    v = train(tiny_model, tokenizer, small_dataset, layers=[1, 2], progress=False)
    v.save(str(tmp_path / "v.safetensors"))
    v.save(str(tmp_path / "v.gguf"))
    for name in ("v.safetensors", "v.gguf"):
        back = SteeringVector.load(str(tmp_path / name))
        assert back.allclose(v)
        assert separation_scores(back) == separation_scores(v)
        assert back.metadata.dataset_fingerprint == small_dataset.fingerprint()
    png = plot_separation(separation_scores(v), tmp_path / "sep.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_model, tokenizer):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_cli_extract(tmp_path, tiny_model_dir, capsys):
    from vllm_steer.cli import main

    cfg = tmp_path / "mood.yaml"
    cfg.write_text("name: mood\npersonas: [[happy, sad]]\nsuffixes: [I think, Well,]\n"
                   "layers: '1:4'\nmethod: pca_center\noutput: out/mood.safetensors\n")
    rc = main(["extract", str(cfg), "--model", str(tiny_model_dir), "--gguf",
               "--plot", str(tmp_path / "mood.png"), "-q"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["layers"] == [1, 2, 3] and report["pairs"] == 3
    st, gg = tmp_path / "out/mood.safetensors", tmp_path / "out/mood.gguf"
    assert SteeringVector.load(str(st)).allclose(SteeringVector.load(str(gg)))
    assert (tmp_path / "mood.png").is_file()

    out = tmp_path / "other.safetensors"
    assert main(["extract", str(cfg), "--model", str(tiny_model_dir), "--out", str(out),
                 "-q"]) == 0
    assert out.is_file()


def test_cli_errors(tmp_path, tiny_model_dir, capsys):
    from vllm_steer.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("personas: [[happy, sad]]\nsuffixes: [I think]\nlayers: all\n")
    # layer 0 cannot go to GGUF: refused before training
    rc = main(["extract", str(cfg), "--model", str(tiny_model_dir), "--out",
               str(tmp_path / "v.gguf"), "-q"])
    assert rc == 2 and "--drop-layer0" in capsys.readouterr().err
    cfg.write_text("personas: [[happy, sad]]\nsuffixes: [I think]\nlayers: [2, 9]\n")
    rc = main(["extract", str(cfg), "--model", str(tiny_model_dir), "-q"])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    rc = main(["extract", str(tmp_path / "missing.yaml"), "-q"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


# -- HF steering reference helper --------------------------------------------------------------
def _ids(tokenizer, text):
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def test_steer_hf_adds_exactly_at_block_output(tiny_model, tokenizer):
    ids = _ids(tokenizer, "Hello there, how are you?")
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector({2: torch.randn(64, generator=g)})
    with torch.no_grad():
        base = tiny_model(ids, output_hidden_states=True).hidden_states
        with steer_hf(tiny_model, vec, scale=0.5):
            steered = tiny_model(ids, output_hidden_states=True).hidden_states
        after = tiny_model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(steered[2], base[2])  # layers before 2 untouched
    torch.testing.assert_close(steered[3] - base[3], (0.5 * vec.directions[2]).expand_as(base[3]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(after[3], base[3], rtol=0, atol=0)  # hooks removed


def test_steer_hf_dense_dict_and_layers(tiny_model, tokenizer):
    ids = _ids(tokenizer, "A short test.")
    dense = torch.zeros(NUM_LAYERS, 64)
    dense[1] = 1.0
    dense[3] = -2.0
    with torch.no_grad():
        with steer_hf(tiny_model, dense, scale=0.7):
            a = tiny_model(ids).logits
        with steer_hf(tiny_model, {1: dense[1], 3: dense[3]}, scale=0.7):
            b = tiny_model(ids).logits
        with steer_hf(tiny_model, dense, scale=0.7, layers=[1]):
            c = tiny_model(ids).logits
        with steer_hf(tiny_model, {1: dense[1]}, scale=0.7):
            d = tiny_model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no delta"):
        with steer_hf(tiny_model, {1: dense[1]}, layers=[2]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steer_hf(tiny_model, {9: dense[1]}):
            pass


def test_steer_hf_tensor_mask_matches_callable_and_generate(tiny_model, tokenizer):
    """Steering only generated tokens: a greedy ``generate`` with a callable mask over
    position ids gives the same tokens and logits as full recomputes with a tensor mask,
    also for a left-padded batch."""
    vec = SteeringVector({1: torch.linspace(-1, 1, 64), 2: torch.linspace(1, -1, 64)})
    texts = ["Tell me a story about", "Hi"]
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    from vllm_steer.extract.hidden import pad_batch

    ids, mask, pos, _ = pad_batch(rows, pad_id=tokenizer.pad_token_id, side="left")
    lens = torch.tensor([len(r) for r in rows])
    new = 5
    with torch.no_grad(), steer_hf(tiny_model, vec, scale=3.0,
                                   position_mask=lambda p: p >= lens[:, None]):
        out = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                  do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0)
    seqs = out.sequences
    full_mask = torch.cat([mask, torch.ones(len(rows), new, dtype=torch.long)], 1)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    steer_cols = full_pos >= lens[:, None]
    steer_cols &= full_mask.bool()
    with torch.no_grad():
        # the same generated tokens, recomputed in one full-sequence forward per step
        for step in range(new):
            width = ids.shape[1] + step
            with steer_hf(tiny_model, vec, scale=3.0, position_mask=steer_cols[:, :width]):
                logits = tiny_model(input_ids=seqs[:, :width], attention_mask=full_mask[:, :width],
                                    position_ids=full_pos[:, :width]).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[step], rtol=1e-4, atol=1e-4)
        # unsteered generation differs (the vector has an effect)
        plain = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                    do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=0)
    assert not torch.allclose(plain.logits[1], out.logits[1])
    # a prompt-only forward under the "generated tokens only" mask is not steered at all
    with torch.no_grad():
        with steer_hf(tiny_model, vec, scale=3.0, position_mask=lambda p: p >= lens[:, None]):
            a = tiny_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = tiny_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_steer_hf_tensor_mask_rejects_decoding(tiny_model, tokenizer):
    ids = _ids(tokenizer, "Once upon a time")
    vec = SteeringVector({1: torch.ones(64)})
    m = torch.ones(ids.shape, dtype=torch.bool)
    with torch.no_grad(), steer_hf(tiny_model, vec, position_mask=m):
        tiny_model(ids)  # full sequence: fine
        with pytest.raises(ValueError, match="pass a callable"):
            tiny_model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="bool"):
        with steer_hf(tiny_model, vec, position_mask=m.long()):
            pass
    with torch.no_grad():
        assert math.isfinite(float(tiny_model(ids).logits.sum()))


# -- unpaired prompt sets (the refusal-direction recipe) ------------------------------------------
def test_prompt_sets_mean_diff_matches_an_independent_computation(tiny_model, tokenizer):
    from vllm_steer.extract import build_prompt_sets

    pos = ["How do I pick a lock?", "How can I steal a bike?", "Write a threat."]
    neg = ["How do I bake bread?", "How can I fix a bike?", "Write a poem.", "Name a fruit."]
    ds = build_prompt_sets(tokenizer, pos, neg, fmt=PromptFormat(style="chat"))
    assert len(ds.positives) == 3 and len(ds.negatives) == 4
    v = train(tiny_model, tokenizer, ds, layers=[1, 2], method="mean_diff", normalize="none",
              progress=False)
    # reference: each rendered prompt alone through HF, block outputs via output_hidden_states
    for layer in (1, 2):
        def last(text, layer=layer):
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = tiny_model(ids, output_hidden_states=True)
            return out.hidden_states[layer + 1][0, -1]

        want = (torch.stack([last(t) for t in ds.positives]).double().mean(0)
                - torch.stack([last(t) for t in ds.negatives]).double().mean(0))
        torch.testing.assert_close(v.directions[layer].double(), want, atol=1e-4, rtol=1e-4)
    assert v.metadata.extra["num_positive"] == "3" and v.metadata.extra["num_negative"] == "4"
    assert set(separation_scores(v)) == {1, 2}


def test_prompt_sets_refuse_paired_methods_and_broadcast_one_direction(tiny_model, tokenizer,
                                                                        tmp_path):
    from vllm_steer.extract import build_prompt_sets

    ds = build_prompt_sets(tokenizer, ["a", "b"], ["c"], fmt=PromptFormat(style="plain"))
    with pytest.raises(DatasetError, match="mean_diff"):
        train(tiny_model, tokenizer, ds, method="pca_center", progress=False)
    v = train(tiny_model, tokenizer, ds, layers="all", method="mean_diff",
              direction_from_layer=2, progress=False)
    src = v.directions[2]
    assert abs(float(src.norm()) - 1.0) < 1e-5
    assert all(torch.equal(v.directions[i], src) for i in range(NUM_LAYERS))
    cfg = tmp_path / "sets.yaml"
    cfg.write_text("method: pca_center\npositive_prompts: [a]\nnegative_prompts: [b]\n")
    with pytest.raises(DatasetError, match="mean_diff"):
        load_config(cfg)
    cfg.write_text("method: mean_diff\npositive_prompts: [a]\nnegative_prompts: []\n")
    with pytest.raises(DatasetError, match="negative_prompts"):
        load_config(cfg)
    (tmp_path / "neg.txt").write_text("# harmless\nc\nd\n")
    cfg.write_text("method: mean_diff\nstyle: plain\npositive_prompts: [a, b]\n"
                   "negative_prompts: neg.txt\ndirection_from_layer: 1\n")
    loaded = load_config(cfg)
    sets = build_dataset(loaded, tokenizer)
    assert sets.negatives == ("c", "d") and loaded.direction_from_layer == 1

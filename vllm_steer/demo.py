"""``vllm-steer demo``: the main job on the embedded default model, end to end.

1. prepare the default model (converted once, cached);
2. make sure the shipped vectors exist (train them from their configs if missing) and
   show a safetensors -> GGUF -> safetensors round trip;
3. steered vs unsteered generations, all in one batch (per-request steering);
4. conditional steering: the refusal direction added only where the ``harmful``
   condition holds, on a held-out harmful and a held-out harmless prompt;
5. an answer-probe trajectory plot and a coefficient sweep, as JSON + PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_PROMPTS = ["Tell me about your weekend.", "How do you feel about Mondays?"]


def ensure_vector(name: str) -> Path:
    """The shipped ``configs/vectors/NAME.safetensors``. In a source checkout a missing
    file is trained from ``NAME.yaml`` (into the checkout's configs); an installed package
    ships its vectors and is never written to."""
    from vllm_steer.locations import shipped_configs, source_checkout

    vectors = shipped_configs() / "vectors"
    path = vectors / f"{name}.safetensors"
    if not path.is_file():
        if source_checkout() is None:
            raise FileNotFoundError(f"{path} is missing from the installed package; "
                                    "reinstall vllm-steer")
        from vllm_steer.extract import extract_from_config, load_config

        print(f"[demo] training {name} from configs/vectors/{name}.yaml (first run only)")
        recipe = vectors / f"{name}.yaml"
        import yaml

        from vllm_steer.extract.condition import (
            extract_condition,
            is_condition_recipe,
            load_condition_config,
        )

        if is_condition_recipe(yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}):
            extract_condition(load_condition_config(recipe)).vector.save(path)
        else:
            extract_from_config(load_config(recipe)).vector.save(path)
    return path


def run_demo(args: argparse.Namespace) -> int:
    from vllm import SamplingParams

    from vllm_steer.default_model import resolve_model
    from vllm_steer.llm_factory import checkpoint_dtype, make_llm
    from vllm_steer.locations import shipped_configs, shipped_registry
    from vllm_steer.probe import ProbeConfig, build_prompt, probe, sweep
    from vllm_steer.probe.plot import plot_sweep, plot_trajectories
    from vllm_steer.probe.questions import load_questions
    from vllm_steer.vector import SteeringVector

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    # The checkpoint's own dtype (float32 for the default model, whose vectors were trained
    # and measured in float32, as are the tests); vLLM's `auto` would run it in bfloat16.
    dtype = checkpoint_dtype(model) or "auto"
    print(f"[demo] model: {model} ({dtype})")
    configs = shipped_configs()

    happy = ensure_vector("happy")
    ensure_vector("cautious_thinking")
    ensure_vector("harmful")
    vec = SteeringVector.load(happy)
    gguf = out / "happy.gguf"
    vec.save(gguf, drop_layer0=True)
    back = SteeringVector.load(gguf)
    same = back.allclose(vec.select_layers([i for i in vec.layers if i != 0]))
    print(f"[demo] vector {happy.name}: {len(vec.layers)} layers, hidden {vec.hidden_size}; "
          f"GGUF round trip {'identical' if same else 'DIFFERS'} ({gguf})")

    llm = make_llm(model, registry=shipped_registry(), block_size=32, enforce_eager=True,
                   max_model_len=2048, dtype=dtype)
    tok = llm.get_tokenizer()
    runs = [("unsteered", None), (f"happy +{args.scale:g}", args.scale),
            (f"happy -{args.scale:g}", -args.scale)]
    prompts, params = [], []
    for text in DEMO_PROMPTS:
        ids = build_prompt(tok, text)
        for _, scale in runs:
            extra = None if scale is None else {"steering": {
                "vectors": [{"name": "happy", "scale": scale}], "apply_to": "generated"}}
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(max_tokens=48, temperature=0, extra_args=extra))
    outs = llm.generate(prompts, params, use_tqdm=False)
    gens = []
    for i, text in enumerate(DEMO_PROMPTS):
        print(f"\n[demo] prompt: {text}")
        for j, (label, _) in enumerate(runs):
            reply = outs[i * len(runs) + j].outputs[0].text.strip().replace("\n", " ")
            gens.append({"prompt": text, "run": label, "reply": reply})
            print(f"  {label:>10}: {reply}")
    (out / "generations.json").write_text(json.dumps(gens, indent=1))
    conditional_refusal(llm, out)

    q = load_questions(configs / "questions" / "yes_no_reasoning.yaml").questions[0]
    p = build_prompt(tok, q.text, open_thinking="<think>\n")
    cfg = ProbeConfig(choices=list(q.choices), every=16, max_tokens=128)
    specs = [None, {"vectors": [{"name": "cautious_thinking", "scale": 4.0}],
                    "apply_to": "thinking"}]
    trajs = probe(llm, [p, p], specs, cfg, labels=["unsteered", "cautious thinking +4"])
    (out / "probe.json").write_text(json.dumps([t.to_json() for t in trajs], indent=1))
    plot_trajectories(trajs, out / "probe.png", title=q.text)
    print(f"\n[demo] answer probe on {q.text!r} -> {out / 'probe.png'}")
    for t in trajs:
        pts = ", ".join(f"{r.token_index}:{r.log_ratio:+.2f}" for r in t.readings
                        if r.log_ratio is not None)
        print(f"  {t.label}: log P(Yes)-log P(No) by token: {pts}")

    mood = load_questions(configs / "questions" / "mood_yes_no.yaml")
    (choices,) = mood.choice_groups()
    res = sweep(llm, mood.texts, "happy", [-2.0, -1.0, 0.0, 1.0, 2.0],
                ProbeConfig(choices=list(choices), suffix=None), signs=mood.signs(choices[0]))
    (out / "sweep.json").write_text(json.dumps(res.to_json(), indent=1))
    plot_sweep(res, out / "sweep.png")
    print(f"\n[demo] happy sweep: mean persona-signed log P(Yes) - log P(No) by scale "
          f"{[round(x, 2) for x in res.mean_signed_log_odds or []]}, "
          f"Pearson r = {res.pearson_r_signed:.3f} -> {out / 'sweep.png'}")
    return 0


def conditional_refusal(llm, out: Path) -> None:
    """Step 4: one held-out harmful and one held-out harmless prompt of the ``harmful``
    condition, unsteered and with refusal added only where the condition holds."""
    from vllm import SamplingParams

    from vllm_steer.experiments.conditional_refusal import heldout_prompts, steering
    from vllm_steer.probe import build_prompt
    from vllm_steer.vllm_adapter.conditions import take_conditions

    harmful, harmless = heldout_prompts()
    tok = llm.get_tokenizer()
    texts = [harmful[0], harmless[0]]
    spec = steering(condition={"name": "harmful"})
    prompts = [{"prompt_token_ids": build_prompt(tok, t)} for t in texts for _ in (0, 1)]
    params = [SamplingParams(max_tokens=40, temperature=0, extra_args=extra)
              for _ in texts for extra in (None, {"steering": spec})]
    outs = llm.generate(prompts, params, use_tqdm=False)
    reports = take_conditions(llm, [o.request_id for o in outs])
    print("\n[demo] conditional steering: refusal added on generated tokens only where the "
          "'harmful' condition holds (held-out prompts)")
    rows = []
    for k, text in enumerate(texts):
        plain, steered = outs[2 * k], outs[2 * k + 1]
        (rep,) = reports[steered.request_id]
        c = rep["conditions"][0]
        same = list(plain.outputs[0].token_ids) == list(steered.outputs[0].token_ids)
        print(f"  prompt: {text}\n    harmful: score {c['score']:.3f} "
              f"({c['compare']} {c['threshold']}) -> {'holds' if rep['holds'] else 'does not hold'}"
              f"{'; identical to unsteered' if same else ''}")
        for label, o in (("unsteered", plain), ("conditional", steered)):
            reply = o.outputs[0].text.strip().replace("\n", " ")
            print(f"    {label:>11}: {reply}")
            rows.append({"prompt": text, "run": label, "reply": reply,
                         "condition": rep if label == "conditional" else None})
    (out / "conditional.json").write_text(json.dumps(rows, indent=1))


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the default model (README)")
    p.add_argument("--model", default=None, help="local HF model dir (default: embedded)")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--scale", type=float, default=4.0, help="happy vector scale")
    p.set_defaults(func=run_demo)

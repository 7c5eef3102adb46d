"""Write ``RESULTS.md`` and ``overhead.png`` from ``results/*.json``.

In a source checkout they go to ``benchmarks/`` and the hand-written analysis in
``benchmarks/notes.md`` is appended verbatim; an installed package writes them next to
its results (``common.RESULTS_DIR``). ``--quick`` reports the ``*_quick.json`` files
instead (to a separate ``results/RESULTS_quick.md``) so a quick run never overwrites the
real report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_steer.bench.common import NOTES, REPORT_DIR, RESULTS_DIR

TARGET = 0.98
#: Issue 14's goal for ablation on every layer of every request (compiled).
OPS_TARGET = 0.97


def _load(name: str, quick: bool) -> dict[str, Any] | None:
    p = RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _s(x: dict[str, Any] | None, pct: bool = False, digits: int = 3) -> str:
    """``median [min, max] (n)`` of a summary."""
    if not x or x.get("median") is None:
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(x['median'])} [{f(x['min'])}, {f(x['max'])}] (n={x['n']})"


def _verdict(r: dict[str, Any], target: float) -> str:
    """Whether a ratio's median meets ``target``."""
    if r["median"] is None:
        return "n/a"
    return "met" if r["median"] >= target else \
        f"missed by {100 * (target - r['median']):.1f} points"


def _meta(d: dict[str, Any]) -> list[str]:
    m, v, ld = d["machine"], d["versions"], d.get("load") or {}
    lines = [f"- command: `{d['command']}`  (started {d['started']})",
             f"- machine: {m['cores']} cores, {m['cpu_model']}, {m.get('mem_gib')} GiB; "
             f"vLLM {v['vllm']}, torch {v['torch']}, transformers {v['transformers']}, "
             f"Python {v['python']}, git {v['git']}"]
    if ld:
        lines.append(f"- load average (1/5/15 min) at start {ld['start']}, at end {ld['end']}; "
                     f"1-min samples during the run: min {ld['min_1m']}, mean {ld['mean_1m']},"
                     f" max {ld['max_1m']}")
    return lines


def overhead_section(d: dict[str, Any]) -> list[str]:
    eng = d["engine"]
    out = [f"### Overhead, {d['mode']} (block_size={eng['block_size']}, "
           f"max_num_seqs={eng['max_num_seqs']}, fp32)", "", *_meta(d), ""]
    wl = d["workload"]
    modes = d["groups"].get("modes")
    if modes:
        w = wl["unsteered"]
        out += [f"Workload: {w['prompts']} prompts x {w['max_tokens']} output tokens "
                f"(prompt {w['prompt_len']} random tokens, temperature 0.8, ignore_eos). "
                f"Unsteered baseline: {_s(modes['baseline_tok_s'], digits=1)} tok/s.", "",
                "Wall-clock tok/s ratios; and tokens per CPU-second of the engine's process "
                "tree (less sensitive to other people's load on this shared machine).", "",
                "| mode | tok/s vs unsteered (plugin on) | target >= 98% | "
                "tok/s vs plain vLLM (plugin off) | tok/CPU-s vs unsteered | "
                "tok/CPU-s vs plain vLLM |", "|---|---|---|---|---|---|"]
        vv = modes.get("ratios_vs_vanilla", {})
        cr = modes.get("cpu_ratios", {})
        cv = modes.get("cpu_ratios_vs_vanilla", {})
        for c, r in modes["ratios"].items():
            if c == "vanilla":
                continue
            ok = _verdict(r, TARGET)
            out.append(f"| {c} | {_s(r, pct=True)} | {ok} | {_s(vv.get(c), pct=True)} | "
                       f"{_s(cr.get(c), pct=True)} | {_s(cv.get(c), pct=True)} |")
        if "unsteered" in vv:
            out.append(f"| unsteered (plugin on, no steering) | 100% (baseline) | - | "
                       f"{_s(vv['unsteered'], pct=True)} | 100% (baseline) | "
                       f"{_s(cv.get('unsteered'), pct=True)} |")
        out.append("")
    ops = d["groups"].get("ops")
    if ops:
        out += ["Interventions (every request, all 30 layers) vs unsteered, same engine "
                "(`max_projections` 1):", "",
                "| request | tok/s vs unsteered | target >= 97% | tok/CPU-s vs unsteered |",
                "|---|---|---|---|"]
        for c, r in ops["ratios"].items():
            if c.endswith("@k0"):
                continue
            out.append(f"| {c} | {_s(r, pct=True)} | {_verdict(r, OPS_TARGET)} | "
                       f"{_s(ops.get('cpu_ratios', {}).get(c), pct=True)} |")
        out.append("")
        argv = d.get("argv", [])
        second_k = int(argv[argv.index("--second-k") + 1]) if "--second-k" in argv else 0
        capture_off = "--second-capture" in argv and \
            argv[argv.index("--second-capture") + 1] == "off"
        if ops.get("addonly") and capture_off:
            out += ["Hidden-state capture's cost for requests that capture nothing: the same "
                    "requests on this engine (capture on, the default: a capture op at the end "
                    "of every layer) vs a second engine identical but for `capture: false` "
                    "(no op; its cases are labelled `@k0`), interleaved:", "",
                    "| ratio (capture on / off) | tok/s | tok/CPU-s |", "|---|---|---|"]
            for k, r in ops["addonly"].items():
                out.append(f"| {k} | {_s(r['tok_s'], pct=True)} | "
                           f"{_s(r['tok_per_cpu_s'], pct=True)} |")
            out.append("")
        elif ops.get("addonly") and second_k:
            out += [f"A/A control: the same requests on two identical engines (both "
                    f"`max_projections` {second_k}; the second's cases are labelled `@k0`), "
                    "interleaved: how much two engine processes differ by themselves:", "",
                    "| ratio | tok/s | tok/CPU-s |", "|---|---|---|"]
            for k, r in ops["addonly"].items():
                out.append(f"| {k} | {_s(r['tok_s'], pct=True)} | "
                           f"{_s(r['tok_per_cpu_s'], pct=True)} |")
            out.append("")
        elif ops.get("addonly"):
            out += ["Add-only cost of the projection tables: the same requests on this engine "
                    "vs a second engine with `max_projections` 0 (the add-only layer code, "
                    "as before interventions), interleaved:", "",
                    "| ratio | tok/s | tok/CPU-s |", "|---|---|---|"]
            for k, r in ops["addonly"].items():
                out.append(f"| {k} | {_s(r['tok_s'], pct=True)} | "
                           f"{_s(r['tok_per_cpu_s'], pct=True)} |")
            out.append("")
    batch = [g for g in d["groups"] if g.startswith("batch")]
    if batch:
        out += ["By batch size (every request a distinct spec vs unsteered):", "",
                "| batch | unsteered tok/s | distinct / unsteered (tok/s) | "
                "distinct / unsteered (tok/CPU-s) |", "|---|---|---|---|"]
        for g in sorted(batch, key=lambda s: int(s[5:])):
            gr = d["groups"][g]
            c, r = next(iter(gr["ratios"].items()))
            out.append(f"| {g[5:]} | {_s(gr['baseline_tok_s'], digits=1)} | "
                       f"{_s(r, pct=True)} | {_s(gr.get('cpu_ratios', {}).get(c), pct=True)} |")
        out.append("")
    layers = d["groups"].get("layers")
    if layers:
        out += ["By number of steered layers (one shared vector, first N layers):", "",
                "| layers | tok/s vs unsteered | tok/CPU-s vs unsteered |", "|---|---|---|"]
        for c, r in layers["ratios"].items():
            out.append(f"| {c[1:]} | {_s(r, pct=True)} | "
                       f"{_s(layers.get('cpu_ratios', {}).get(c), pct=True)} |")
        out.append("")
    return out


def vs_hf_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    out = ["### vLLM + vllm-steer vs HF transformers generate + forward hooks", "", *_meta(d),
           f"- vLLM {d['vllm_mode']}; {wl['prompts']} prompts x {wl['max_tokens']} tokens, "
           f"{wl['sampling']}, fp32; HF batch sizes tried: {wl['hf_batch_sizes']}; HF torch "
           f"threads: {wl.get('hf_torch_threads', 'default')} (vLLM's CPU worker computes on 1 "
           "thread; its front end runs in another process)", "",
           "| workload | vLLM tok/s | HF tok/s at best batch | vLLM / HF (tok/s) | "
           "HF CPU-s / vLLM CPU-s |", "|---|---|---|---|---|"]
    for name, w in d["workloads"].items():
        b = w["hf_best_batch"]
        hf = w["hf_tok_s_by_batch"][str(b)] if str(b) in w["hf_tok_s_by_batch"] else \
            w["hf_tok_s_by_batch"][b]
        out.append(f"| {name} | {_s(w['vllm_tok_s'], digits=1)} | {_s(hf, digits=1)} "
                   f"(batch {b}) | {_s(w['ratio_vllm_over_hf'], digits=2)} | "
                   f"{_s(w.get('cpu_s_ratio_hf_over_vllm'), digits=2)} |")
    m = d["memory"]
    out += ["", f"Peak memory of each side's process tree over the whole run (sampled every "
            f"0.25 s): vLLM RSS {m['vllm']['peak_rss_mib']} MiB (PSS "
            f"{m['vllm']['peak_pss_mib']} MiB; front end, EngineCore and worker processes), HF RSS "
            f"{m['hf']['peak_rss_mib']} MiB (PSS {m['hf']['peak_pss_mib']} MiB). vLLM's "
            "includes its preallocated KV cache (VLLM_CPU_KVCACHE_SPACE GiB, in the command).", ""]
    return out


_OFF_LABELS = {"salted": "unique cache_salt per fork (same engine)",
               "engine_off": "second engine, enable_prefix_caching=False",
               "topk_neighbours": "cached forks + neighbours asking logprobs=5 (per-row "
                                  "merge), one call",
               "plain_neighbours": "cached forks + the same neighbours without logprobs, "
                                   "one call"}


def probe_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    sets = wl.get("choice_sets")
    out = ["### Probe forks: prefix caching on vs off" + (f" ({' | '.join(sets)})" if sets
                                                         else ""), "", *_meta(d),
           f"- trajectory {wl['trajectory_tokens']} generated tokens, a fork "
           f"{'point ' if sets else ''}every {wl['every']} tokens; steering: "
           f"{wl['trajectory_steering']}; eager engine",
           *(f"- load average, block_size={bs}: start {b['load']['start']}, end "
             f"{b['load']['end']}, 1-min max {b['load']['max_1m']}"
             for bs, b in d["block_sizes"].items() if "load" in b)]
    if not sets:   # results written before choice sets existed (Yes/No only)
        out += ["", "| block_size | forks | t(cached) s | off variant | t(off) / t(cached) | "
                "cached prompt tokens (cached run) |", "|---|---|---|---|---|---|"]
        for bs, b in d["block_sizes"].items():
            tok = b["tokens"]["cached"]
            frac = [v["cached_tokens"] / max(v["prompt_tokens"], 1) for v in tok.values()]
            for v, r in b["ratio_off_over_on"].items():
                out.append(f"| {bs} | {b['forks_per_trajectory']} | "
                           f"{_s(b['seconds']['cached'], digits=2)} | {_OFF_LABELS.get(v, v)} | "
                           f"{_s(r, digits=1)}x | {100 * min(frac):.0f}-{100 * max(frac):.0f}% |")
        out.append("")
        return out
    for bs, b in d["block_sizes"].items():
        for key, c in b["choice_sets"].items():
            ld = c["load"]
            out.append(f"- load average, block_size={bs}, choices {key}: start {ld['start']}, "
                       f"end {ld['end']}, 1-min max {ld['max_1m']}")
    out += ["", "| block_size | choices | points | requests per trajectory (gap reads) | "
            "prompt tokens computed per trajectory, cached run | t(cached) s | off variant | "
            "t(off) / t(cached) | off computes (tokens) | max abs log-prob diff vs cached |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for bs, b in d["block_sizes"].items():
        for key, c in b["choice_sets"].items():
            tok = c["tokens"]["cached"].values()
            reqs = sorted({v["requests"] for v in tok})
            gaps = sorted({v["gap_requests"] for v in tok})
            computed = [v["prompt_tokens"] - v["cached_tokens"] for v in tok]
            mt = "multi-token" if any(c["multi_token"]) else "single-token"
            for v, r in c["ratio_off_over_on"].items():
                off = [x["prompt_tokens"] - x["cached_tokens"] for x in c["tokens"][v].values()]
                out.append(
                    f"| {bs} | {key} ({mt}) | {c['points_per_trajectory']} | "
                    f"{'/'.join(map(str, reqs))} ({'/'.join(map(str, gaps))}) | "
                    f"{min(computed)}-{max(computed)} | "
                    f"{_s(c['seconds']['cached'], digits=2)} | {_OFF_LABELS.get(v, v)} | "
                    f"{_s(r, digits=1)}x | {min(off)}-{max(off)} | "
                    f"{c['max_abs_logprob_diff_vs_cached'][v]:.1e} |")
    out.append("")
    for bs, b in d["block_sizes"].items():
        for key, c in b["choice_sets"].items():
            if "ratio_topk_over_plain_neighbours" in c:
                out.append(f"- block_size={bs}, {key}: forks with top-k neighbours / with plain "
                           f"neighbours {_s(c['ratio_topk_over_plain_neighbours'], digits=3)}x")
        if "merge" in b:
            m = b["merge"]
            out.append(f"- block_size={bs}: {m['mixed_batches']} batches mixed exact-ID and "
                       f"top-k rows; one per-row merge took {1e6 * m['seconds_per_merge']:.0f} "
                       "us (median, measured alone)")
    out.append("")
    return out


def live_section(d: dict[str, Any]) -> list[str]:
    st, nb = d["stream"], d["neighbours"]
    out = ["### Live probes: cost on the probed stream and on its neighbours", "", *_meta(d),
           f"- server: `{d['server_command']}`",
           f"- single stream: {st['tokens']} tokens, greedy, a reading every {st['every']} "
           f"tokens; load: start {st['load']['start']}, end {st['load']['end']}, 1-min max "
           f"{st['load']['max_1m']}",
           f"- neighbours: {nb['concurrent']} concurrent streams x {nb['tokens']} tokens, "
           f"{nb['probed']} probed (Yes/No, every {nb['every']}); load: start "
           f"{nb['load']['start']}, end {nb['load']['end']}, 1-min max {nb['load']['max_1m']}",
           "", "| probed stream | ITL median, probed / unprobed (goal <= 1.15) | tokens/s, "
           "probed / unprobed | readings per run | prompt tokens computed per fork request | "
           "tokens served from the cache per reading |", "|---|---|---|---|---|---|"]
    for v, label in (("yes_no", "Yes/No"), ("multi", "20/30/40/50")):
        x = st[v]
        out.append(f"| {label} | {_s(x['itl_ratio'])} | {_s(x['throughput_ratio'])} | "
                   f"{_s(x['readings_per_run'], digits=0)} | "
                   f"{_s(x['computed_tokens_per_request'], digits=1)} | "
                   f"{_s(x['cached_tokens_per_reading'], digits=0)} |")
    out += ["", f"Unprobed neighbours with {nb['probed']} of {nb['concurrent']} streams probed "
            f"vs none probed: throughput {_s(nb['throughput_ratio'])} (goal >= 0.95: "
            f"{_verdict(nb['throughput_ratio'], 0.95)}), ITL median "
            f"{_s(nb['itl_ratio'])}.", ""]
    return out


def early_exit_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    rows = d["rows"]
    out = ["### Early exit on the shipped question sets", "", *_meta(d),
           f"- {len(rows)} questions ({', '.join(wl['questions'])}), greedy, up to "
           f"{wl['max_tokens']} tokens (natural end), thinking section opened, a reading "
           f"every {wl['every']} tokens; {sum(r['tokens'] for r in rows)} tokens at full "
           "length", "",
           "| threshold | consecutive | stopped early | tokens saved | early answer = answer "
           "at full length (stopped ones) | (all questions) |", "|---|---|---|---|---|---|"]
    for g in d["grid"]:
        agree = "n/a" if g["agreement_when_fired"] is None else \
            f"{100 * g['agreement_when_fired']:.0f}%"
        out.append(f"| {g['threshold']:g} | {g['consecutive']} | {g['fired']}/{g['questions']}"
                   f" | {100 * g['saved_fraction']:.0f}% | {agree} | "
                   f"{100 * g['agreement_overall']:.0f}% |")
    if d.get("verify"):
        v = d["verify"]
        same = sum(x["simulated"] == x["engine"] for x in v)   # both JSON lists (or null)
        full = {r["question"]: r["tokens"] for r in rows}
        gen, tot = sum(x["generated"] for x in v), sum(full[x["question"]] for x in v)
        out += ["", "Tokens saved above count from the deciding reading's position. Run for "
                f"real with `stop_when` ({v[0]['threshold']:g}/{v[0]['consecutive']}): the "
                f"engine stopped where the rule on the full-length readings says for "
                f"{same}/{len(v)} questions, and generated {gen} of the {tot} full-length "
                f"tokens ({100 * (1 - gen / tot):.0f}% saved; the difference to the table is "
                "what it generated while the deciding reading was computed)."]
    out.append("")
    return out


def memory_section(d: dict[str, Any]) -> list[str]:
    t = d["tables"]
    m = t.get("measured") or {}
    wl = d["workload"]
    out = ["### Memory", "", *_meta(d),
           f"- eager engine, max_num_seqs={wl['max_num_seqs']}, {wl['prompts']} requests x "
           f"{wl['max_tokens']} tokens; each variant in a fresh process", "",
           f"Steering tables (from `collective_rpc('vllm_steer_stats')`): "
           f"{m.get('bytes_per_slot', 'n/a')} bytes per slot (30 layers x (576 + K x 578) x "
           f"fp32 + 4, K = {m.get('max_projections', 'n/a')} projections: "
           f"{t['expected_bytes_per_slot']} expected), "
           f"{m.get('table_bytes', 'n/a')} bytes in total "
           f"({m.get('num_slots', 'n/a')} slots = max_num_seqs + 1; "
           f"{m.get('table_bytes', 0) / 2**20:.2f} MiB).", "",
           "| variant | peak RSS MiB (tree) | peak PSS MiB (tree) | RSS ratio |",
           "|---|---|---|---|"]
    ratio_key = next((k for k in d if k.startswith("rss_ratio_over_")), None)
    rr = d.get(ratio_key, {}) if ratio_key else {}
    for v in d["peak_rss_mib"]:
        out.append(f"| {v} | {_s(d['peak_rss_mib'][v], digits=0)} | "
                   f"{_s(d['peak_pss_mib'][v], digits=0)} | "
                   f"{_s(rr.get(v), digits=3) if v in rr else 'baseline'} |")
    out.append("")
    return out


def serving_section(d: dict[str, Any]) -> list[str]:
    b, f = d["bench"], d["first_use"]
    wl = b["workload"]
    out = ["### Serving (`vllm bench serve` against `vllm-steer serve`)", "", *_meta(d),
           f"- server: `{d['server_command']}`",
           f"- bench: {wl['num_prompts']} prompts, random input {wl['input_len']} / output "
           f"{wl['output_len']} tokens, request rate inf, ignore_eos; steered = "
           "`--extra-body '{\"vllm_xargs\": {\"steer\": \"all30\"}}'`",
           f"- load during bench runs: {b['load']}", "",
           "| metric | unsteered (median of runs) | steered (median of runs) | "
           "steered / unsteered per rep |", "|---|---|---|---|"]
    import statistics

    for k, r in b["ratios_steered_over_unsteered"].items():
        med = {v: statistics.median(x[k] for x in b["raw"][v].values() if k in x)
               for v in ("unsteered", "steered")}
        out.append(f"| {k} | {med['unsteered']:.1f} | {med['steered']:.1f} | "
                   f"{_s(r, digits=3)} |")
    out += ["", "First use of a vector (single streamed requests, 4 tokens, fresh prompts):",
            "", "| request | TTFT ms |", "|---|---|"]
    for v, r in f["ttft_ms"].items():
        out.append(f"| {v} | {_s(r, digits=1)} |")
    out += ["", f"- TTFT first use / repeated use: {_s(f['ratio_first_over_repeat'], digits=2)}",
            f"- TTFT first use / unsteered: {_s(f['ratio_first_over_unsteered'], digits=2)}",
            f"- TTFT repeated use / unsteered: "
            f"{_s(f['ratio_repeat_over_unsteered'], digits=2)}", ""]
    return out


def wire_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    sm = d["summary"]
    out = [f"### Front end to engine per steered request ({wl['layers']} layers x "
           f"{wl['hidden']} hidden fp32 = {wl['vector_bytes'] / 1e6:.1f} MB vector)", "",
           *_meta(d),
           f"- {wl['requests_per_round']} repeated requests per round (scale varying), "
           f"{wl['rounds']} rounds, each variant in a fresh process per round; bytes: "
           "vLLM's `MsgpackEncoder` on the request's `SamplingParams`, minus the same "
           "request unsteered; hook: the admission hook alone; to engine: admission "
           "hook + encode + ZMQ ipc send + `MsgpackDecoder` in a second process (medians "
           "per round; the table shows their median [min, max] over rounds)", "",
           "| variant | bytes / request | hook ms | to engine ms | unsteered to engine ms "
           "| added by steering ms | first request: bytes | first request: to engine ms |",
           "|---|---|---|---|---|---|---|---|"]
    for v, r in sm.items():
        out.append(f"| {v} | {_s(r['repeated_bytes'], digits=0)} | "
                   f"{_s(r['repeated_hook_ms'])} | {_s(r['repeated_total_ms'])} | "
                   f"{_s(r.get('unsteered_total_ms'))} | {_s(r.get('added_ms'))} | "
                   f"{_s(r['first_bytes'], digits=0)} | {_s(r['first_total_ms'])} |")
    bo = d["before_over_after_store"]
    out += ["", f"Before / after (store), per round: bytes {_s(bo['bytes'], digits=1)}, "
            f"admission to engine {_s(bo['total_ms'], digits=1)}, time added by steering "
            f"(to engine, minus the unsteered request's) {_s(bo.get('added_ms'), digits=1)}, "
            "hook alone "
            f"{_s(bo.get('hook_ms'), digits=1)}.", ""]
    return out


def extract_section(d: dict[str, Any]) -> list[str]:
    wl, m = d["workload"], d["memory"]
    sec = d["seconds"]
    return ["### Vector extraction: vLLM engine (hidden-state capture) vs HF forward hooks", "",
            *_meta(d),
            f"- `{wl['recipe']}`: {wl['pairs']} pairs ({wl['prompts']} prompts), the recipe's "
            f"layers and method; HF torch threads {wl['hf_torch_threads']}; engine: eager, "
            "prefix caching (reset before every repetition), block size 32", "",
            "| | seconds per extraction | start-up (s) | peak RSS (MiB) |", "|---|---|---|---|",
            f"| vLLM engine | {_s(sec['vllm'], digits=1)} | {d['startup_s']['vllm']} | "
            f"{m['vllm']['peak_rss_mib']} |",
            f"| HF | {_s(sec['hf'], digits=1)} | {d['startup_s']['hf']} | "
            f"{m['hf']['peak_rss_mib']} |", "",
            f"Speed-up HF seconds / vLLM seconds per repetition: "
            f"{_s(d['speedup_hf_over_vllm'], digits=2)}; CPU-seconds ratio "
            f"{_s(d['cpu_s_ratio_hf_over_vllm'], digits=2)}. Smallest cosine between the two "
            f"sides' vectors over layers: {d['min_cosine_per_layer']}.", ""]


def train_route_section(d: dict[str, Any]) -> list[str]:
    wl = d["workload"]
    out = ["### The training route under traffic: inter-token latency", "", *_meta(d),
           f"- {wl['clients']} streaming clients x {wl['output_len']} tokens, back to back; "
           f"training job: `{wl['recipe']}` with {wl['max_suffixes']} openers; quiet windows "
           f"{wl['quiet_window_s']} s", "",
           f"Quiet ITL: {d['itl_quiet']}", "",
           "| training window | ITL median / quiet | p90 / quiet | p99 / quiet | "
           "job seconds |", "|---|---|---|---|---|"]
    variants = d.get("variants")
    if variants is None:   # a result file of the bench before it compared max_concurrent
        secs = [r["training_s"] for r in d["raw"]]
        variants = {f"max_concurrent: {wl.get('max_concurrent')}": {
            **{f"itl_ratio_over_quiet_{q}": d[f"itl_ratio_training_over_quiet_{q}"]
               for q in ("median", "p90", "p99")},
            "training_s": {"n": len(secs), "median": sorted(secs)[len(secs) // 2],
                           "min": min(secs), "max": max(secs)}}}
    for name, v in variants.items():
        out.append(f"| {name} | {_s(v['itl_ratio_over_quiet_median'], digits=2)} | "
                   f"{_s(v['itl_ratio_over_quiet_p90'], digits=2)} | "
                   f"{_s(v['itl_ratio_over_quiet_p99'], digits=2)} | "
                   f"{_s(v['training_s'], digits=1)} |")
    out.append("")
    return out


def chart(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Bars of throughput ratios per overhead mode: tok/s and tok/CPU-s (median, min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    for key in ("overhead_eager", "overhead_compiled", "overhead_compiled_resolver_fix"):
        d = results.get(key)
        if not d:
            continue
        for g, gr in d["groups"].items():
            vv, cv = gr.get("ratios_vs_vanilla", {}), gr.get("cpu_ratios_vs_vanilla", {})
            if "unsteered" in vv:
                rows.append((f"{d['mode']}: plugin on, unsteered vs plain vLLM",
                             vv["unsteered"], cv.get("unsteered")))
            for c, r in gr["ratios"].items():
                if r["median"] is not None and c != "vanilla":
                    label = f"{d['mode']}: {c}" if g == "modes" else f"{d['mode']}: {g}/{c}"
                    rows.append((label, r, gr.get("cpu_ratios", {}).get(c)))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    h = 0.38
    for k, (name, color) in enumerate((("tok/s (wall clock)", "#4878a8"),
                                       ("tok per CPU-second", "#e08a3c"))):
        ys, med, lo, hi = [], [], [], []
        for i, (_, wall, cpu) in enumerate(rows):
            r = wall if k == 0 else cpu
            if not r or r.get("median") is None:
                continue
            ys.append(i + (k - 0.5) * h)
            med.append(100 * r["median"])
            lo.append(100 * (r["median"] - r["min"]))
            hi.append(100 * (r["max"] - r["median"]))
        ax.barh(ys, med, height=h, xerr=[lo, hi], color=color, capsize=2, label=name,
                error_kw={"lw": 0.8})
    ax.axvline(100, color="k", lw=0.8)
    ax.axvline(100 * TARGET, color="r", ls="--", lw=0.8, label="98% target")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(60, 130)
    ax.set_xlabel("relative to unsteered, same engine, same run (%); bars clipped to 60-130")
    ax.set_title("vllm-steer overhead (median; whiskers = min..max over repetitions)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="vllm-steer bench report", description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    names = ("overhead_compiled_resolver_fix", "overhead_compiled", "overhead_eager", "vs_hf",
             "probe_forks", "probe_forks_choices", "memory", "serving",
             "overhead_compiled_ops", "overhead_compiled_ops_aa", "wire", "extract",
             "train_route", "overhead_capture", "probe_forks_isolation", "live_probe",
             "early_exit")
    results = {n: d for n in names if (d := _load(n, args.quick)) is not None}
    out_md = RESULTS_DIR / "RESULTS_quick.md" if args.quick else REPORT_DIR / "RESULTS.md"
    png = (RESULTS_DIR / "overhead_quick.png") if args.quick else REPORT_DIR / "overhead.png"
    out_md.parent.mkdir(parents=True, exist_ok=True)  # an installed package: ./bench-results
    lines = ["# vllm-steer benchmark results", "",
             "Every number is a ratio measured side by side in one run: the variants run "
             "interleaved (shuffled per repetition) on the same engine (or, for vs-HF and "
             "memory, in sibling processes driven alternately), each repetition gives one "
             "ratio, and tables show `median [min, max] (n=repetitions)`. The machine is "
             "shared with other work, so absolute times are not comparable across runs; "
             "the load average during each run is listed. Regenerate this file with "
             "`vllm-steer bench report` (tables from `benchmarks/results/*.json`, analysis "
             "from `benchmarks/notes.md`).", ""]
    if NOTES is not None and NOTES.is_file() and not args.quick:
        lines += [NOTES.read_text().rstrip(), ""]
    lines += ["## Tables", ""]
    sections = {"overhead_compiled_resolver_fix": lambda d: [
                    line.replace("### Overhead, compiled", "### Overhead, compiled, after the "
                                 "front-end fix", 1) for line in overhead_section(d)],
                "overhead_compiled": overhead_section, "overhead_eager": overhead_section,
                "vs_hf": vs_hf_section, "probe_forks": probe_section,
                "probe_forks_choices": probe_section, "probe_forks_isolation": probe_section,
                "memory": memory_section, "serving": serving_section,
                "overhead_compiled_ops": lambda d: [
                    line.replace("### Overhead, compiled", "### Overhead of interventions, "
                                 "compiled", 1) for line in overhead_section(d)],
                "overhead_compiled_ops_aa": lambda d: [
                    line.replace("### Overhead, compiled", "### Overhead of interventions, "
                                 "compiled, A/A control", 1) for line in overhead_section(d)],
                "wire": wire_section, "extract": extract_section,
                "train_route": train_route_section,
                "overhead_capture": lambda d: [
                    line.replace("### Overhead, ", "### Cost of hidden-state capture for "
                                 "requests that capture nothing, ", 1)
                    for line in overhead_section(d)],
                "live_probe": live_section, "early_exit": early_exit_section}
    for n, d in results.items():
        try:
            lines += sections[n](d)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            lines += [f"### {n}: result file incomplete ({type(e).__name__}: {e})", ""]
    if chart(results, png):
        lines += [f"![overhead]({png.relative_to(out_md.parent).as_posix()})", ""]
    missing = [n for n in names if n not in results]
    if missing:
        lines += ["Not run (no result file): " + ", ".join(missing), ""]
    out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_md}", file=sys.stderr)
    return {"results": sorted(results), "path": str(out_md)}


if __name__ == "__main__":
    main()

"""``vllm-steer doctor --verify``: steer tiny random models through the installed vLLM on
this device and compare with an HF reference; record the verdict as a stamp.

One tiny checkpoint per layer-adapter kind (``vllm_steer.fixtures.tiny_models``, with the
word-level tokenizer of ``selfcheck.tokenizer``; built locally, cached under
``$VLLMSTEER_CACHE/selfcheck``). For each engine of the plan, one mixed batch: an
unsteered request, ``add`` on every position, ``ablate`` on every position, ``add`` with
``apply_to: thinking`` (prompt log-probs too, so prefill positions are checked), and a
second unsteered request; each compared with ``selfcheck.reference`` (HF forward hooks
written from the README's formulas): greedy tokens equal (a near tie may diverge, then the
rest of that request is not compared), sampled and prompt log-probs within
``LOGPROB_ATOL``, and every steered request moved by at least ``MIN_EFFECT`` nats (else
the check could not tell steering from none).

The plan: every kind eager (``enforce_eager``; engine core in this process, which starts
fastest) and the compiled path in vLLM's default form (``torch.compile``, plus CUDA graphs
where the device has them; engine core in its own process, as users run it): for the
``residual_pair`` kind on the CPU (inductor compiles are slow there), for every kind
elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_steer.selfcheck.reference import Op, Reference, reference

#: Greedy-token and log-prob agreement with the reference (fp32 on both sides).
LOGPROB_ATOL = 2e-3
#: A greedy step may pick the reference's runner-up only when the two are this close
#: (nats); the request is then compared up to that step only.
NEAR_TIE = 1e-3
#: A steered request must move some chosen token's log-prob by at least this (nats).
MIN_EFFECT = 0.05
MAX_NEW_TOKENS = 10
#: Layer-adapter kind -> the tiny architecture that exercises it (``tiny_models.ARCHS``).
KINDS: dict[str, str] = {"residual_pair": "llama", "stream": "gpt2",
                         "stream_first": "stablelm", "hf_batched": "olmo2"}
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class EngineRun:
    """One engine of the plan: adapter ``kind``, ``mode`` (``eager``/``compiled``), and
    whether its engine core runs in its own process."""

    kind: str
    mode: str
    multiprocess: bool

    @property
    def arch(self) -> str:
        return KINDS[self.kind]


def plan(device_type: str, kinds: Sequence[str] | None = None,
         modes: Sequence[str] | None = None) -> tuple[list[EngineRun], bool]:
    """The engines to run on ``device_type`` and whether that is the complete plan (only
    a complete run's stamp satisfies the version policy)."""
    full = [EngineRun(k, "eager", False) for k in KINDS]
    compiled_kinds = ["residual_pair"] if device_type == "cpu" else list(KINDS)
    full += [EngineRun(k, "compiled", True) for k in compiled_kinds]
    for name, given, known in (("kind", kinds, KINDS), ("mode", modes, MODES)):
        for g in given or ():
            if g not in known:
                raise ValueError(f"--{name}s: unknown {name} {g!r} (known: {', '.join(known)})")
    chosen = [r for r in full if (not kinds or r.kind in kinds)
              and (not modes or r.mode in modes)]
    # Transformers-backend engines last among the in-process ones: vLLM decorates HF
    # classes in the process that builds such a model.
    chosen.sort(key=lambda r: (r.multiprocess, r.kind == "hf_batched"))
    return chosen, chosen == sorted(full, key=lambda r: (r.multiprocess,
                                                         r.kind == "hf_batched"))


@dataclass(frozen=True)
class Case:
    """One request of the batch: ``ops`` as (vector name, op, coef), ``apply_to``."""

    name: str
    prompt: str            # "p0", "p1" or "think"
    ops: tuple[tuple[str, str, float], ...] = ()
    apply_to: str = "all"
    prompt_logprobs: bool = False

    @property
    def spec(self) -> dict | None:
        if not self.ops:
            return None
        vectors = [{"name": n, "scale": c} if op == "add" else {"name": n, "op": op,
                                                               "strength": c}
                   for n, op, c in self.ops]
        return {"vectors": vectors, "apply_to": self.apply_to}


CASES: tuple[Case, ...] = (
    Case("unsteered", "p0"),
    Case("add", "p0", (("a", "add", 1.0),)),
    Case("ablate", "p1", (("b", "ablate", 1.0),)),
    Case("thinking", "think", (("a", "add", 1.0),), "thinking", prompt_logprobs=True),
    Case("unsteered (neighbour)", "p1"),
)


@dataclass
class CaseResult:
    name: str
    ok: bool = True
    problem: str | None = None
    tokens_compared: int = 0
    near_tie_at: int | None = None
    max_logprob_err: float = 0.0
    max_prompt_logprob_err: float = 0.0
    steering_moved: float | None = None


@dataclass
class EngineResult:
    kind: str
    arch: str
    mode: str
    multiprocess: bool
    ok: bool = True
    problem: str | None = None
    note: str | None = None
    runs_with: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    seconds_start: float = 0.0
    seconds_run: float = 0.0
    cases: list[CaseResult] = field(default_factory=list)


def prompts(think: tuple[int, int], bos: int) -> dict[str, list[int]]:
    """Prompt token ids (words are ids 3..511 of ``selfcheck.tokenizer``)."""
    def words(*ks: int) -> list[int]:
        return [3 + k for k in ks]

    return {"p0": [bos, *words(17, 230, 5, 411, 98, 64)],
            "p1": [bos, *words(300, 12, 77, 150, 9, 480, 33, 201)],
            "think": [bos, *words(41, 8, 260), think[0], *words(99, 123, 7, 350, 61)]}


def make_vectors(hidden: int, num_layers: int, seed: int = 7,
                 norm_scale: float = 4.0) -> dict[str, dict[int, torch.Tensor]]:
    """Two random vectors on every layer (float32, ``norm_scale * N(0, 1)`` per element)."""
    g = torch.Generator().manual_seed(seed)
    return {name: {i: norm_scale * torch.randn(hidden, generator=g) for i in range(num_layers)}
            for name in ("a", "b")}


def write_registry(root: Path, vectors: dict[str, dict[int, torch.Tensor]]) -> Path:
    """The vectors as files plus a registry naming them (what the plugin reads)."""
    from vllm_steer.vector import SteeringVector

    vdir = root / "vectors"
    vdir.mkdir(parents=True, exist_ok=True)
    lines = ["allowed_dirs: [vectors]", "vectors:"]
    for name, dirs in vectors.items():
        SteeringVector(dirs).save(vdir / f"{name}.safetensors")
        lines.append(f"  {name}: {{path: vectors/{name}.safetensors}}")
    reg = root / "registry.yaml"
    reg.write_text("\n".join(lines) + "\n")
    return reg


def reference_outputs(model_dir: Path, vectors: dict[str, dict[int, torch.Tensor]],
                      think: tuple[int, int], bos: int) -> dict[str, Reference]:
    """The reference for every case on ``model_dir``'s HF model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ps = prompts(think, bos)
    out = {}
    threads = torch.get_num_threads()
    # One thread: a 3-layer model gains nothing from more, and on a busy machine several
    # threads contending for the cores made the reference 15x slower (measured).
    torch.set_num_threads(1)
    try:
        for case in CASES:
            ops = [Op(op, vectors[n], c) for n, op, c in case.ops]
            out[case.name] = reference(model, ps[case.prompt], ops, case.apply_to, think,
                                       MAX_NEW_TOKENS)
    finally:
        torch.set_num_threads(threads)
    del model
    return out


def compare(case: Case, prompt: list[int], ref: Reference, out: Any) -> CaseResult:
    """One vLLM ``RequestOutput`` against its reference."""
    res = CaseResult(case.name)
    comp = out.outputs[0]
    got = list(comp.token_ids)

    def fail(problem: str) -> CaseResult:
        res.ok, res.problem = False, problem
        return res

    moved = 0.0
    for t, (tok, want) in enumerate(zip(got, ref.tokens, strict=False)):
        row = ref.rows[t]
        if tok != want:
            gap = float(row[want] - row[tok])
            if gap >= NEAR_TIE:
                return fail(f"step {t}: vLLM chose token {tok}, the reference {want} "
                            f"(by {gap:.4f} nats)")
            res.near_tie_at = t
            break
        err = abs(comp.logprobs[t][tok].logprob - float(row[tok]))
        res.max_logprob_err = max(res.max_logprob_err, err)
        if err >= LOGPROB_ATOL:
            return fail(f"step {t}: log-prob {comp.logprobs[t][tok].logprob:.5f}, "
                        f"reference {float(row[tok]):.5f}")
        moved = max(moved, abs(float(row[tok]) - ref.plain[t]))
        res.tokens_compared += 1
    if len(got) < len(ref.tokens) and res.near_tie_at is None:
        return fail(f"vLLM returned {len(got)} tokens, expected {len(ref.tokens)}")
    if case.prompt_logprobs:
        if out.prompt_logprobs is None:
            return fail("no prompt log-probs returned")
        for p in range(1, len(prompt)):
            lp = out.prompt_logprobs[p][prompt[p]].logprob
            err = abs(lp - ref.prompt_logprobs[p])
            res.max_prompt_logprob_err = max(res.max_prompt_logprob_err, err)
            if err >= LOGPROB_ATOL:
                return fail(f"prompt position {p}: log-prob {lp:.5f}, reference "
                            f"{ref.prompt_logprobs[p]:.5f}")
    if case.ops:
        res.steering_moved = moved
        if moved < MIN_EFFECT:
            return fail(f"steering moved the chosen tokens' log-probs by {moved:.4f} nats "
                        f"only (< {MIN_EFFECT}): too weak to tell steering from none")
    return res


def engine_options(run: EngineRun, device_type: str) -> dict[str, Any]:
    opts: dict[str, Any] = dict(dtype="float32", seed=0, max_model_len=512, max_num_seqs=8,
                                enforce_eager=run.mode == "eager")
    if device_type != "cpu":
        # A small, fixed footprint on a GPU others may be using.
        opts.update(gpu_memory_utilization=0.1, kv_cache_memory_bytes=256 * 2**20)
    if run.mode == "eager":
        # thinking/answer are refused under async scheduling; the compiled engines keep
        # vLLM's default (their thinking case is then checked to be refused).
        opts["async_scheduling"] = False
    return opts


def run_engine(run: EngineRun, model_dir: Path, registry: Path, device_type: str,
               refs: dict[str, Reference], ps: dict[str, list[int]]) -> EngineResult:
    from vllm import SamplingParams

    from vllm_steer.fixtures.engines import inproc_engine
    from vllm_steer.llm_factory import make_llm, shutdown
    from vllm_steer.vllm_adapter.engine import run_modes

    res = EngineResult(run.kind, run.arch, run.mode, run.multiprocess)
    t0 = time.perf_counter()
    with inproc_engine(not run.multiprocess):
        llm = make_llm(str(model_dir), registry=registry, **engine_options(run, device_type))
    res.seconds_start = time.perf_counter() - t0
    try:
        res.runs_with = run_modes(llm)
        cases = list(CASES)
        if res.runs_with["async_scheduling"]:
            cases = [c for c in cases if c.apply_to != "thinking"]
            res.note = _check_thinking_refused(llm, ps)
        t1 = time.perf_counter()
        params = [SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                 logprobs=0, prompt_logprobs=0 if c.prompt_logprobs else None,
                                 extra_args={"steering": c.spec} if c.spec else None)
                  for c in cases]
        outs = llm.generate([{"prompt_token_ids": ps[c.prompt]} for c in cases], params,
                            use_tqdm=False)
        res.seconds_run = time.perf_counter() - t1
        res.cases = [compare(c, ps[c.prompt], refs[c.name], o)
                     for c, o in zip(cases, outs, strict=True)]
        stats = llm.collective_rpc("vllm_steer_stats")
        adapters = {s.get("adapter") for s in stats if s}
        res.adapter = ",".join(sorted(str(a) for a in adapters))
        if adapters != {run.kind}:
            res.ok = False
            res.problem = f"the plugin used layer adapter {res.adapter}, expected {run.kind}"
    finally:
        shutdown(llm)
    res.ok = res.ok and all(c.ok for c in res.cases)
    return res


def _check_thinking_refused(llm: Any, ps: dict[str, list[int]]) -> str:
    """Under async scheduling a thinking request must be refused at submission."""
    from vllm import SamplingParams

    case = next(c for c in CASES if c.apply_to == "thinking")
    try:
        llm.generate([{"prompt_token_ids": ps[case.prompt]}],
                     [SamplingParams(max_tokens=1, extra_args={"steering": case.spec})],
                     use_tqdm=False)
    except Exception as e:  # noqa: BLE001 - the refusal is what is checked
        if "async" in str(e):
            return "thinking refused under async scheduling, as documented (checked)"
        raise
    raise AssertionError("a thinking request was accepted under async scheduling")


def verify(kinds: Sequence[str] | None = None, modes: Sequence[str] | None = None,
           progress: bool = True,
           report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the self-check and record its stamp; return the verdict (a JSON-able dict with
    ``passed``, ``complete``, ``stamp`` and per-engine results)."""
    import tempfile

    from tqdm import tqdm

    from vllm_steer.compat import installed_vllm_version
    from vllm_steer.default_model import cache_dir
    from vllm_steer.fixtures.tiny_models import HIDDEN, LAYERS, build_tiny_model
    from vllm_steer.selfcheck import stamp
    from vllm_steer.selfcheck.tokenizer import THINK_END, THINK_START, build_tokenizer
    from vllm_steer.vllm_adapter.check import VLLMDriftError, check_all
    from vllm_steer.vllm_adapter.platform import device_type as platform_device

    t0 = time.perf_counter()
    device = platform_device()
    runs, complete = plan(device, kinds, modes)
    key = stamp.current_key(installed_vllm_version())
    verdict: dict[str, Any] = {"key": asdict(key), "complete": complete, "engines": [],
                               "symbol_table": "ok"}
    try:
        check_all()
    except VLLMDriftError as e:
        verdict.update(passed=False, symbol_table=str(e))
        return _finish(verdict, key, t0, report)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = cache_dir() / "selfcheck"
    tok_dir = build_tokenizer(root)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    think = (tok.convert_tokens_to_ids(THINK_START), tok.convert_tokens_to_ids(THINK_END))
    ps = prompts(think, tok.bos_token_id)
    vectors = make_vectors(HIDDEN, LAYERS)
    report(f"self-check: {len(runs)} engines ({', '.join(f'{r.kind}/{r.mode}' for r in runs)})"
           f" on {key.device}, vLLM {key.vllm}, torch {key.torch}")
    models, refs = {}, {}
    for kind in dict.fromkeys(r.kind for r in runs):
        models[kind] = build_tiny_model(KINDS[kind], tok_dir, root=root / "models")
        refs[kind] = reference_outputs(models[kind], vectors, think, tok.bos_token_id)
    verdict["seconds_prepare"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory(prefix="vllm-steer-selfcheck-") as tmp, \
            stamp.verification_run():
        registry = write_registry(Path(tmp), vectors)
        bar = tqdm(runs, desc="self-check", unit="engine", disable=not progress)
        for run in bar:
            bar.set_postfix_str(f"{run.kind}/{run.mode}")
            try:
                res = run_engine(run, models[run.kind], registry, device, refs[run.kind], ps)
            except Exception as e:  # noqa: BLE001 - a failing engine is a verdict, not a crash
                res = EngineResult(run.kind, run.arch, run.mode, run.multiprocess, ok=False,
                                   problem=f"{type(e).__name__}: {e}")
            verdict["engines"].append(asdict(res))
            report(_engine_line(res))
    verdict["passed"] = bool(runs) and all(e["ok"] for e in verdict["engines"])
    return _finish(verdict, key, t0, report)


def _engine_line(res: EngineResult) -> str:
    head = (f"{'ok' if res.ok else 'FAIL':<4} {res.kind:<13} {res.mode:<8} ({res.arch}; "
            f"{_modes_text(res.runs_with)}; start {res.seconds_start:.1f} s)")
    lines = [head]
    for c in res.cases:
        moved = f", moved {c.steering_moved:.2f}" if c.steering_moved is not None else ""
        tie = f", near tie at step {c.near_tie_at}" if c.near_tie_at is not None else ""
        lines.append(f"       {c.name:<22} {'ok' if c.ok else 'FAIL'}: {c.tokens_compared} "
                     f"tokens, max err {max(c.max_logprob_err, c.max_prompt_logprob_err):.1e}"
                     f"{moved}{tie}" + (f" -> {c.problem}" if c.problem else ""))
    for text in (res.problem, res.note):
        if text:
            lines.append(f"       {text}")
    return "\n".join(lines)


def _modes_text(m: dict[str, Any]) -> str:
    if not m:
        return "did not start"
    graphs = m.get("cudagraphs")
    return (("compiled" if m.get("compiled") else "eager")
            + (f", CUDA graphs {graphs}" if graphs not in (None, "NONE", "None") else "")
            + (", async scheduling" if m.get("async_scheduling") else ""))


def _finish(verdict: dict[str, Any], key: Any, t0: float,
            report: Callable[[str], None]) -> dict[str, Any]:
    from vllm_steer.selfcheck import stamp

    verdict["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        verdict["load_average"] = list(os.getloadavg())
    except OSError:
        verdict["load_average"] = None
    path = stamp.write_stamp(key, passed=verdict["passed"], complete=verdict["complete"],
                             details={k: v for k, v in verdict.items()
                                      if k not in ("key", "passed", "complete")})
    verdict["stamp"] = str(path)
    word = "PASSED" if verdict["passed"] else "FAILED"
    scope = "" if verdict["complete"] else " (partial run: does not satisfy the version policy)"
    report(f"self-check {word}{scope} in {verdict['seconds']:.0f} s; stamp: {path}")
    return verdict

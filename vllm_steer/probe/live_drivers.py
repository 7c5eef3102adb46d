"""Drivers of live probes: forks submitted to the engine that serves the request, while it
generates.

- ``LiveRun`` (async): observes a request's ``RequestOutput``s from an async engine
  (``AsyncLLM`` / the OpenAI server's ``EngineClient``), runs each decided point's rounds
  as a task on the same engine, and queues readings in token order (``events``); it also
  applies ``stop_when``. The OpenAI server glue is ``server.live_probe``.
- ``live_generate`` (sync): the same on ``vllm.LLM``, stepping its engine.

What reaches vLLM: ``generate``/``abort`` of an async engine, ``add_request``/``step``/
``abort_request``/``has_unfinished_requests`` of ``LLM.llm_engine`` (rows in
``vllm_adapter/symbols.py``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.forks import decided_spec
from vllm_steer.probe.live_state import (
    SETTLED,
    LiveProbe,
    LiveProbeConfig,
    LiveSequence,
    StopRule,
    reading_json,
)
from vllm_steer.probe.point import PointRun, ProbePoint
from vllm_steer.steering.spec import parse_spec


@dataclass
class StopRecord:
    """Why choice ``index`` stopped early: the settled ``choice``, the reading that
    settled it (its point), and the tokens appended when ``complete`` is on."""

    index: int
    choice: str
    point: ProbePoint
    answer_ids: list[int] = field(default_factory=list)

    def to_json(self, tokenizer: Any) -> dict[str, Any]:
        return {"reason": SETTLED, "choice": self.choice,
                "token_index": self.point.token_index,
                "reading": reading_json(self.point.reading, self.index),
                "appended_text": tokenizer.decode(self.answer_ids) if self.answer_ids else "",
                "appended_token_ids": self.answer_ids}


class _Track:
    """One choice index: its sequence, its stop rule, and how many raw tokens were seen
    (the sequence drops a final end-of-sequence token)."""

    def __init__(self, seq: LiveSequence, rule: StopRule | None) -> None:
        self.seq, self.rule, self.raw = seq, rule, 0


class LiveState:
    """Engine-agnostic bookkeeping shared by both drivers: sequences per choice index,
    delivery in token order, stop decisions. ``on_readings(index, points)`` is called with
    each batch of points delivered in order; ``stops`` holds the early exits decided."""

    def __init__(self, probe: LiveProbe, on_readings: Callable[[int, list[ProbePoint]], None],
                 steering: dict[str, Any] | str | None = None,
                 cache_salt: str | None = None) -> None:
        self.probe, self.on_readings, self.steering = probe, on_readings, steering
        self.cache_salt = cache_salt
        self.tracks: dict[int, _Track] = {}
        self.stops: dict[int, StopRecord] = {}
        #: A conditioned request's forks are steered by each choice's decision
        #: (``decide``), collected by the driver before the choice is first observed.
        self.conditioned = steering is not None and parse_spec(steering).condition is not None
        self.decisions: dict[int, bool] = {}

    def undecided(self, out: Any) -> list[int]:
        """Choice indices of ``out`` whose decision the driver must collect first."""
        if not self.conditioned:
            return []
        return [c.index for c in out.outputs if c.index not in self.decisions]

    def decide(self, reports: Sequence[dict[str, Any]]) -> None:
        """Take the request's condition reports (``vllm_adapter.conditions``)."""
        for rep in reports:
            if rep["holds"] is None:
                raise ProbeError("steering.condition", "the condition was not decided "
                                 f"({rep.get('error') or 'no score'})")
            self.decisions[rep["index"] or 0] = bool(rep["holds"])

    def observe(self, out: Any, cumulative: bool) -> list[tuple[int, PointRun]]:
        """Take a ``RequestOutput``; the runs of points it decides, by choice index."""
        runs = []
        for c in out.outputs:
            tr = self.tracks.get(c.index)
            if tr is None:
                when = self.probe.cfg.stop_when
                rule = StopRule(when, self.probe.cfg.probe.min_mass) if when else None
                steering = self.steering
                if self.conditioned:
                    if c.index not in self.decisions:
                        raise ProbeError("steering.condition", f"choice {c.index}: forked "
                                         "before its decision was collected")
                    steering = decided_spec(steering, self.decisions[c.index])
                tr = self.tracks[c.index] = _Track(
                    self.probe.sequence(list(out.prompt_token_ids or []), c.index,
                                        steering, self.cache_salt), rule)
            if tr.seq.finished or c.index in self.stops:
                continue
            ids = list(c.token_ids)
            new = ids[tr.raw:] if cumulative else ids
            tr.raw += len(new)
            runs += [(c.index, r) for r in tr.seq.extend(new, c.finish_reason is not None)]
        return runs

    def point_done(self, index: int, pt: ProbePoint) -> None:
        """A point's reading is complete: deliver what is now ready in token order, each
        reading judged by the stop rule before the next; nothing after a settling one."""
        if index in self.stops:
            return
        tr = self.tracks[index]
        out = []
        for p in tr.seq.add(pt):
            out.append(p)
            choice = tr.rule.settled(tr.seq, p.reading) if tr.rule is not None else None
            if choice is not None:
                ans = tr.seq.answer_tokens(p, choice) if tr.rule.when.complete else []
                self.stops[index] = StopRecord(index, choice, p, ans)
                break
        if out:
            self.on_readings(index, out)


class LiveRun:
    """Forks of one request on an async engine.

    ``generate(prompt, sp, request_id)`` is the engine's (unwrapped) async generator;
    ``events`` receives ``(index, [reading JSON, ...])`` in token order per index;
    ``settled`` is set when any choice stops early (``state.stops``). ``cache_salt``: the
    request's own (its forks carry it, so that they share its prefix-cache blocks).
    """

    def __init__(self, probe: LiveProbe, generate: Callable[..., AsyncIterator[Any]],
                 request_id: str, steering: dict[str, Any] | str | None = None,
                 cache_salt: str | None = None) -> None:
        self.probe, self._generate, self.request_id = probe, generate, request_id
        self.events: asyncio.Queue[tuple[int, list[dict[str, Any]]]] = asyncio.Queue()
        self.readings: dict[int, list[dict[str, Any]]] = {}
        self.state = LiveState(probe, self._on_readings, steering, cache_salt)
        self.settled = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None
        self._ids = itertools.count()

    # -- readings ------------------------------------------------------------------
    def _on_readings(self, index: int, points: list[ProbePoint]) -> None:
        js = [reading_json(p.reading, index) for p in points]
        self.readings.setdefault(index, []).extend(js)
        self.events.put_nowait((index, js))

    # -- forks ---------------------------------------------------------------------
    def observe(self, out: Any, cumulative: bool) -> None:
        self._spawn(self.state.observe(out, cumulative))

    def _spawn(self, runs: list[tuple[int, PointRun]]) -> None:
        for index, run in runs:
            task = asyncio.get_running_loop().create_task(self._read(index, run))
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()
            self.settled.set()   # wake the request: it fails with the error

    async def _one(self, prompt: dict[str, Any], sp: Any) -> Any:
        final = None
        rid = f"{self.request_id}-probe-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        async for o in self._generate(prompt, sp, rid):
            final = o
        return final

    async def _read(self, index: int, run: PointRun) -> None:
        while reqs := run.requests():
            outs = await asyncio.gather(*(self._one(p, sp) for p, sp in reqs))
            run.take(outs)
        self.state.point_done(index, run.pt)
        if self.state.stops and not self.settled.is_set():
            self.settled.set()

    async def wait_readings(self) -> None:
        """Until every decided point is read (raises a fork's error)."""
        while self.tasks:
            await asyncio.wait(set(self.tasks))
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        """Cancel every fork still running and wait for them (their engine requests are
        aborted by the engine's generator on cancellation)."""
        for t in list(self.tasks):
            t.cancel()
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


def final_output(last: Any, outputs: Sequence[Any], stops: dict[int, StopRecord],
                 tokenizer: Any, delta: bool) -> Any:
    """The ``RequestOutput`` a stopped request ends with: each stopped choice finished with
    ``finish_reason="stop"``, ``stop_reason=SETTLED`` and, when ``complete`` is on, the
    appended answer (its tokens and text; no log-probs for them: refused up front).
    ``delta``: the output carries only the appended part (streaming), else everything."""
    outs = []
    for c in outputs:
        rec = stops.get(c.index)
        if rec is None:
            outs.append(c)
            continue
        ans = rec.answer_ids
        text = tokenizer.decode(ans) if ans else ""
        if delta:
            new = dataclasses.replace(c, text=text, token_ids=list(ans),
                                      logprobs=[] if c.logprobs is not None else None)
        else:
            new = dataclasses.replace(c, text=c.text + text, token_ids=list(c.token_ids) + ans)
        new.finish_reason, new.stop_reason = "stop", SETTLED
        outs.append(new)
    res = copy.copy(last)
    res.outputs = outs
    res.finished = all(o.finish_reason is not None for o in outs)
    return res


# -- the sync driver (vllm.LLM) -------------------------------------------------------------
@dataclass
class LiveResult:
    """One prompt of ``live_generate``: the final ``RequestOutput``, readings per choice
    index (JSON, token order) and early exits (``StopRecord`` per stopped index)."""

    output: Any
    readings: dict[int, list[dict[str, Any]]]
    stops: dict[int, StopRecord]


@dataclass
class _Main:
    """A prompt's request in ``live_generate``."""

    state: LiveState
    readings: dict[int, list[dict[str, Any]]]
    last: Any = None
    stopped: bool = False


@dataclass
class _Round:
    """One round of one point: its requests' outputs as they finish."""

    main: _Main
    index: int
    run: PointRun
    expect: int
    outs: dict[int, Any] = field(default_factory=dict)


def live_generate(llm: Any, prompts: Sequence[dict[str, Any] | list[int] | str],
                  sampling_params: Any, probe: LiveProbeConfig | dict[str, Any],
                  steering: dict[str, Any] | str | None = None) -> list[LiveResult]:
    """Generate ``prompts`` on ``vllm.LLM`` with live probes: at each trigger (every
    ``every`` generated tokens, or reasoning steps) the sequence is forked on the same
    engine while it goes on generating.

    ``sampling_params``: one ``SamplingParams`` for all prompts (``n`` > 1 allowed;
    ``stop_when`` needs ``n == 1``); ``steering``: the requests' steering spec (it also
    steers the forks, in absolute positions). Returns one ``LiveResult`` per prompt.
    """
    from vllm.sampling_params import RequestOutputKind

    from vllm_steer.probe.choices import ProbeError
    from vllm_steer.vllm_adapter.engine import block_size, llm_engine

    cfg = probe if isinstance(probe, LiveProbeConfig) else LiveProbeConfig.parse(probe)
    if cfg.stop_when is not None and sampling_params.n != 1:
        raise ProbeError("probe.stop_when", "early exit needs n == 1")
    tok = llm.get_tokenizer()
    live = LiveProbe(tok, cfg, block_size(llm))
    engine = llm_engine(llm)
    sp = sampling_params.clone()
    sp.output_kind = RequestOutputKind.CUMULATIVE   # the driver needs every step's tokens
    if steering is not None:
        sp.extra_args = {**(sp.extra_args or {}), "steering": steering}
    tag = uuid.uuid4().hex[:8]
    ids = itertools.count()
    mains: dict[str, _Main] = {}
    forks: dict[str, tuple[_Round, int]] = {}

    def submit(main: _Main, index: int, run: PointRun) -> None:
        if main.stopped:
            return
        reqs = run.requests()
        if not reqs:
            main.state.point_done(index, run.pt)
            return
        rnd = _Round(main, index, run, len(reqs))
        for j, (prompt, fsp) in enumerate(reqs):
            rid = f"fork-{tag}-{next(ids)}"
            forks[rid] = (rnd, j)
            engine.add_request(rid, prompt, fsp)

    for k, p in enumerate(prompts):
        prompt = p if isinstance(p, dict) else (
            {"prompt_token_ids": list(p)} if isinstance(p, list) else {"prompt": p})
        readings: dict[int, list[dict[str, Any]]] = {}

        def on_readings(index: int, pts: list[ProbePoint], out=readings) -> None:
            out.setdefault(index, []).extend(reading_json(q.reading, index) for q in pts)

        mains[f"main-{tag}-{k}"] = _Main(LiveState(live, on_readings, steering,
                                                   prompt.get("cache_salt")), readings)
        engine.add_request(f"main-{tag}-{k}", prompt, sp.clone())
    while engine.has_unfinished_requests():
        for out in engine.step():
            main = mains.get(out.request_id)
            if main is not None:
                if not main.stopped:
                    if main.state.undecided(out):
                        from vllm_steer.vllm_adapter.conditions import take_conditions

                        main.state.decide(take_conditions(llm, [out.request_id])
                                          .get(out.request_id, []))
                    main.last = out
                    for index, run in main.state.observe(out, cumulative=True):
                        submit(main, index, run)
                continue
            if not out.finished or out.request_id not in forks:
                continue
            rnd, j = forks.pop(out.request_id)
            rnd.outs[j] = out
            if len(rnd.outs) == rnd.expect:
                rnd.run.take([rnd.outs[i] for i in range(rnd.expect)])
                submit(rnd.main, rnd.index, rnd.run)
        for rid, main in mains.items():
            if main.state.stops and not main.stopped:
                main.stopped = True
                # the main request and the forks still running for it
                mine = [f for f, (rnd, _) in forks.items() if rnd.main is main]
                engine.abort_request([rid, *mine] if not main.last.finished else mine)
                for f in mine:
                    forks.pop(f)
                main.last = final_output(main.last, main.last.outputs, main.state.stops, tok,
                                         delta=False)
    return [LiveResult(m.last, m.readings, m.state.stops) for m in mains.values()]

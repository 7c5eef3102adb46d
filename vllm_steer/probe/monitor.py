"""``vllm-steer monitor``: send a probed chat request to a running server and watch its
readings arrive while the model writes (a live line in the terminal), then save the
trajectory as PNG (choice probabilities, mass panel, dashed where thinking ended) and
JSON. Talks to the server with the official ``openai`` client only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from vllm_steer.probe.job import Trajectory
from vllm_steer.probe.reading import Reading

_BARS = "▁▂▃▄▅▆▇█"


def trigger_label(r: dict[str, Any]) -> str:
    """What placed a reading: ``step 'Wait'``, ``every``, ``start``, ``end``."""
    kind = r.get("trigger") or "every"
    return f"step {r['marker']!r}" if kind == "step" and r.get("marker") else kind


def status_line(r: dict[str, Any], history: list[float], first: str) -> str:
    """``t=  48 thinking step '\\n\\n' P(Yes)=0.82 ▁▂▄▆█ mass 0.91``: the latest reading,
    what triggered it, and the trend of the first choice's probability."""
    spark = "".join(_BARS[min(7, int(p * 8))] for p in history[-24:])
    probs = " ".join(f"P({c})={p:.2f}" for c, p in r["probs"].items())
    where = "thinking" if r["in_thinking"] else "answer  "
    flag = " LOW MASS" if r["low_mass"] else ""
    return (f"t={r['token_index']:5d} {where} {trigger_label(r):12s} {probs} {spark} "
            f"P({first}) mass {r['mass']:.2f}{flag}")


def monitor(base_url: str, model: str | None, message: str, probe: dict[str, Any], *,
            api_key: str = "EMPTY", steering: dict[str, Any] | None = None,
            max_tokens: int = 256, temperature: float = 0.0, open_thinking: str | None = None,
            out_dir: str | Path | None = None, live: TextIO | None = None
            ) -> dict[str, Any]:
    """Stream one probed chat completion; returns (and writes, with ``out_dir``)
    ``{"text", "readings", "probe_stop", "finish_reason", "png"}``. ``live``: where the
    live line goes (default stderr; one line per reading when it is not a terminal)."""
    from openai import OpenAI

    live = live or sys.stderr
    tty = hasattr(live, "isatty") and live.isatty()
    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key)
    model = model or client.models.list().data[0].id
    messages: list[dict[str, str]] = [{"role": "user", "content": message}]
    body: dict[str, Any] = {"probe": probe}
    if steering is not None:
        body["steering"] = steering
    if open_thinking:   # the reply starts inside a thinking section
        messages.append({"role": "assistant", "content": open_thinking})
        body.update(continue_final_message=True, add_generation_prompt=False)
    stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                            max_tokens=max_tokens, temperature=temperature,
                                            extra_body=body)
    text, readings, history = [], [], []
    stop, finish = None, None
    t0 = time.monotonic()
    for chunk in stream:
        for c in chunk.choices:
            extra = c.model_extra or {}
            if c.delta and c.delta.content:
                text.append(c.delta.content)
            for r in extra.get("probe_readings") or []:
                readings.append({**r, "seconds": round(time.monotonic() - t0, 3)})
                first = next(iter(r["probs"]))
                history.append(r["probs"][first])
                line = status_line(r, history, first)
                live.write(f"\r\033[K{line}" if tty else line + "\n")
                live.flush()
            if c.finish_reason is not None:
                finish, stop = c.finish_reason, extra.get("probe_stop")
    if tty:
        live.write("\n")
    result = {"model": model, "message": message, "probe": probe, "steering": steering,
              "text": "".join(text), "finish_reason": finish, "probe_stop": stop,
              "readings": readings}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "monitor.json").write_text(json.dumps(result, indent=2))
        result["png"] = str(plot_readings(readings, out / "monitor.png", message,
                                          probe.get("min_mass")))
    return result


def plot_readings(readings: list[dict[str, Any]], path: str | Path, title: str,
                  min_mass: float | None = None) -> Path:
    """The offline probe's trajectory plot for streamed readings; the dashed line is at the
    first reading taken after the thinking section closed."""
    from vllm_steer.probe.plot import plot_trajectories
    from vllm_steer.probe.reading import DEFAULT_MIN_MASS

    rs = [Reading.from_json(r) for r in readings]
    end = next((r.token_index for i, r in enumerate(rs)
                if i and rs[i - 1].in_thinking and not r.in_thinking), None)
    traj = Trajectory("served request", [], None, readings=rs, think_end_index=end)
    return plot_trajectories([traj], path, title=title[:80],
                             min_mass=DEFAULT_MIN_MASS if min_mass is None else min_mass)


def add_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="send a probed chat request to a running server and "
                       "watch its readings stream (live line, PNG + JSON at the end)")
    p.add_argument("message", help="the user message")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--choices", default="Yes,No", help="comma-separated answer choices")
    p.add_argument("--every", type=int, default=None,
                   help="fork every N tokens (default 16); with --trigger steps: a reading "
                        "at least every N tokens (default: none)")
    p.add_argument("--trigger", choices=("every", "steps"), default="every",
                   help="fork every N tokens, or at reasoning steps (blank lines, 'Wait', "
                        "...: see --markers)")
    p.add_argument("--markers", default=None,
                   help="step markers as a JSON list (default: the probe's, for reasoning "
                        "models), e.g. '[\"\\n\\n\", \"Wait\"]'")
    p.add_argument("--min-spacing", type=int, default=None,
                   help="skip steps closer than N tokens to the previous reading")
    p.add_argument("--align", choices=("none", "prefix", "base", "block"), default=None,
                   help="move forks back onto KV-block boundaries (cheaper readings)")
    p.add_argument("--suffix", default=None, help="forcing suffix (default: the probe's)")
    p.add_argument("--probe", default=None,
                   help="the whole probe object as JSON (overrides --choices/--every/...)")
    p.add_argument("--stop-when", default=None, help="early exit, as JSON")
    p.add_argument("--steering", default=None, help="the request's steering spec, as JSON")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--open-thinking", default=None,
                   help="start the reply with this text, e.g. '<think>\\n'")
    p.add_argument("--out", default="out/monitor", help="where monitor.json/png go")

    def run(args: argparse.Namespace) -> int:
        if args.probe is not None:
            probe = json.loads(args.probe)
        else:
            probe = {"choices": [c.strip() for c in args.choices.split(",") if c.strip()]}
            if args.trigger != "every":
                probe["trigger"] = args.trigger
            for key, value in (("every", args.every), ("suffix", args.suffix),
                               ("min_spacing", args.min_spacing), ("align", args.align),
                               ("markers", json.loads(args.markers) if args.markers
                                else None)):
                if value is not None:
                    probe[key] = value
        if args.stop_when is not None:
            probe["stop_when"] = json.loads(args.stop_when)
        res = monitor(args.url, args.model, args.message, probe, api_key=args.api_key,
                      steering=json.loads(args.steering) if args.steering else None,
                      max_tokens=args.max_tokens, temperature=args.temperature,
                      open_thinking=args.open_thinking, out_dir=args.out)
        print(res["text"])
        if res["probe_stop"]:
            ps = res["probe_stop"]
            print(f"stopped early at token {ps['token_index']}: settled on {ps['choice']!r}",
                  file=sys.stderr)
        print(f"wrote {args.out}/monitor.png and monitor.json ({len(res['readings'])} "
              "readings)", file=sys.stderr)
        return 0

    p.set_defaults(func=run)

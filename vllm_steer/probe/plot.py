"""PNG plots of probe trajectories and coefficient sweeps (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from vllm_steer.probe.job import Trajectory
from vllm_steer.probe.run import SweepResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(trajs: list[Trajectory], path: str | Path, title: str = "") -> Path:
    """Log ratio against generated-token index, one line per trajectory; thinking end as a
    dashed vertical line; low-mass readings as red crosses."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t in trajs:
        pts = [(r.token_index, r.log_ratio) for r in t.readings if r.log_ratio is not None]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=t.label)
        low = [(r.token_index, r.log_ratio) for r in t.readings
               if r.low_mass and r.log_ratio is not None]
        if low:
            ax.scatter([p[0] for p in low], [p[1] for p in low], marker="x", s=60,
                       color="red", zorder=3)
        if t.think_end_index is not None:
            ax.axvline(t.think_end_index, color=line.get_color(), ls="--", lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("generated tokens before the probe (dashed: end of thinking)")
    ax.set_ylabel("log P(first choice) - log P(second choice)")
    ax.set_title(title or "answer probe (red x: low probability mass)")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, plt, path)


def plot_sweep(res: SweepResult, path: str | Path) -> Path:
    """Per-question log ratios (dots) and the mean (red line) against the scale; with
    persona signs, also the persona-signed mean (green line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(res.scales):
        ys = [y for y in res.log_ratios[i] if y is not None]
        ax.scatter([s] * len(ys), ys, s=8, alpha=0.4, color="tab:blue")
    lines = [("mean", res.mean_log_ratio, res.pearson_r, "tab:red")]
    if res.mean_signed_log_ratio is not None:
        lines.append(("persona-signed mean", res.mean_signed_log_ratio, res.pearson_r_signed,
                      "tab:green"))
    for label, means, r, color in lines:
        pts = [(s, m) for s, m in zip(res.scales, means, strict=True) if m is not None]
        r_text = "n/a" if r is None else f"{r:.3f}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker="o",
                label=f"{label} (Pearson r = {r_text})")
    ax.set_title(f"coefficient sweep of {res.vector}")
    ax.set_xlabel("steering scale")
    ax.set_ylabel("log P(first choice) - log P(second choice)")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, plt, path)

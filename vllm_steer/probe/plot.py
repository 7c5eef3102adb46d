"""PNG plots of probe trajectories and coefficient sweeps (matplotlib, headless).

Both show the probability of each choice (normalized over the choices) and, in its own
panel, the probability mass of all choices: the sanity check of the method (low mass
means the model would not answer with any choice, and the reading means little).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_steer.probe.job import Trajectory
from vllm_steer.probe.reading import DEFAULT_MIN_MASS
from vllm_steer.probe.sweep import SweepResult


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mass_axis(ax: Any, min_mass: float) -> None:
    ax.set_yscale("log")
    ax.axhline(min_mass, color="red", ls=":", lw=1, label=f"min_mass {min_mass:g}")
    ax.set_ylabel("mass of all choices")


def plot_trajectories(trajs: list[Trajectory], path: str | Path, title: str = "",
                      min_mass: float = DEFAULT_MIN_MASS) -> Path:
    """Panels against the generated-token index, one line per trajectory: the log ratio
    (two choices only), the normalized probability of each choice, and the probability
    mass of all choices (log scale; red x: low-mass readings). Dashed vertical lines: end
    of thinking."""
    plt = _plt()
    return _save(trajectory_figure(plt, trajs, title, min_mass), plt, path)


def trajectory_figure(plt: Any, trajs: list[Trajectory], title: str, min_mass: float) -> Any:
    """The figure of ``plot_trajectories`` (not saved)."""
    choices = list(trajs[0].readings[0].probs) if trajs and trajs[0].readings else []
    two = len(choices) == 2
    n_panels = int(two) + len(choices) + 1
    fig, axes = plt.subplots(n_panels, 1, sharex=True, figsize=(8, 1.2 + 2.0 * n_panels),
                             squeeze=False)
    axes = axes[:, 0]
    colors = {}
    for t in trajs:
        xs = [r.token_index for r in t.readings]
        low = [r for r in t.readings if r.low_mass]
        row = 0
        if two:
            pts = [(r.token_index, r.log_ratio) for r in t.readings if r.log_ratio is not None]
            line, = axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                                 label=t.label)
            colors[t.label] = line.get_color()
            row = 1
        for k, c in enumerate(choices):
            line, = axes[row + k].plot(xs, [r.probs[c] for r in t.readings], marker="o", ms=3,
                                       color=colors.get(t.label), label=t.label)
            colors.setdefault(t.label, line.get_color())
        mass_ax = axes[-1]
        mass_ax.plot(xs, [max(r.mass, 1e-12) for r in t.readings], marker="o", ms=3,
                     color=colors.get(t.label), label=t.label)
        if low:
            mass_ax.scatter([r.token_index for r in low], [max(r.mass, 1e-12) for r in low],
                            marker="x", s=60, color="red", zorder=3)
        if t.think_end_index is not None:
            for ax in axes:
                ax.axvline(t.think_end_index, color=colors.get(t.label), ls="--", lw=1)
    if two:
        axes[0].axhline(0, color="grey", lw=0.5)
        axes[0].set_ylabel(f"log P({choices[0]}) - log P({choices[1]})", fontsize=8)
    for k, c in enumerate(choices):
        ax = axes[int(two) + k]
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(f"P({c}) / P(choices)", fontsize=8)
    _mass_axis(axes[-1], min_mass)
    axes[-1].set_xlabel("generated tokens before the probe (dashed: end of thinking)")
    axes[0].set_title(title or "answer probe")
    axes[0].legend(fontsize=7, loc="best")
    axes[-1].legend(fontsize=7, loc="best")
    return fig


def plot_sweep(res: SweepResult, path: str | Path, min_mass: float = DEFAULT_MIN_MASS) -> Path:
    """Three panels against the scale: the target's log-odds among the choices (dots: per
    question; red: mean; green: persona-signed mean), the mean normalized probability of
    each choice, and the mean and minimum probability mass of all choices."""
    plt = _plt()
    return _save(sweep_figure(plt, res, min_mass), plt, path)


def sweep_figure(plt: Any, res: SweepResult, min_mass: float) -> Any:
    """The figure of ``plot_sweep`` (not saved)."""
    fig, (ax, pax, max_) = plt.subplots(3, 1, sharex=True, figsize=(6.5, 9))
    for i, s in enumerate(res.scales):
        ys = [y for y in res.log_odds[i] if y is not None]
        ax.scatter([s] * len(ys), ys, s=8, alpha=0.4, color="tab:blue")
    lines = [("mean", res.mean_log_odds, res.pearson_r, "tab:red")]
    if res.mean_signed_log_odds is not None:
        lines.append(("persona-signed mean", res.mean_signed_log_odds, res.pearson_r_signed,
                      "tab:green"))
    for label, means, r, color in lines:
        pts = [(s, m) for s, m in zip(res.scales, means, strict=True) if m is not None]
        r_text = "n/a" if r is None else f"{r:.3f}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker="o",
                label=f"{label} (Pearson r = {r_text})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(f"coefficient sweep of {res.vector} (target: {res.target})")
    ax.set_ylabel(f"log-odds of {res.target!r} among the choices", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    for c in res.choices:
        pax.plot(res.scales, [p[c] for p in res.mean_probs], marker="o", label=c)
    pax.set_ylim(-0.03, 1.03)
    pax.set_ylabel("mean P(choice) / P(choices)", fontsize=8)
    pax.legend(fontsize=7, loc="best")
    max_.plot(res.scales, [max(m, 1e-12) for m in res.mean_mass], marker="o", label="mean")
    max_.plot(res.scales, [max(m, 1e-12) for m in res.min_mass], marker="v", ls=":",
              label="min over questions")
    for s, m, n in zip(res.scales, res.min_mass, res.low_mass_count, strict=True):
        if n:
            max_.annotate(f"{n} low", (s, max(m, 1e-12)), fontsize=7, color="red",
                          textcoords="offset points", xytext=(0, 6), ha="center")
    _mass_axis(max_, min_mass)
    max_.set_xlabel("steering scale")
    max_.legend(fontsize=7, loc="best")
    return fig

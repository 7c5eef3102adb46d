"""PNG plot of per-layer separation scores (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_separation(
    scores: dict[int, float], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Write a bar chart of ``{layer: separation}`` to ``path`` (PNG); return the path.

    Separation is the fraction of pairs whose positive prompt projects above the negative
    one; 0.5 (dashed) is chance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not scores:
        raise ValueError("no separation scores to plot")
    layers = sorted(scores)
    values = [scores[i] for i in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(layers) + 2), 3.2), dpi=120)
    try:
        ax.bar(layers, values, color="#4878cf", width=0.8)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("layer (output of decoder block)")
        ax.set_ylabel("separation")
        ax.set_title(title or "fraction of pairs ordered correctly")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out

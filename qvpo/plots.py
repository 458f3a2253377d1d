"""Learning-curve figure for a run's artifacts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_learning_curve(result, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if result.episodes:
        steps, rets = np.array(result.episodes).T
        ax.plot(steps, rets, ".", ms=2, alpha=0.4, color="tab:gray", label="training episodes")
    if result.evaluations:
        s = np.array([e.step for e in result.evaluations])
        m = np.array([e.mean for e in result.evaluations])
        sd = np.array([e.std for e in result.evaluations])
        ax.plot(s, m, "-o", ms=3, color="tab:blue", label="evaluation mean")
        ax.fill_between(s, m - sd, m + sd, color="tab:blue", alpha=0.2, label="evaluation ± std")
    ax.set_xlabel("env steps")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""The report's figures: learning curves per task, the IQM interval plot, performance profiles.
Columns come in the report's layout order, each with a fixed colour (Layout.colors)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from qvpo import stats
from qvpo.report.layout import RANDOM, Layout
from qvpo.report.load import task_name
from qvpo.report.tables import AGGREGATE_METRICS, METRICS, PAPER_METRIC


def plt():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_learning_curves(groups, random_scores, path: Path, task: str, layout: Layout) -> None:
    """Mean evaluation return per algorithm with its 95 % t-interval band (over the seeds that
    logged each step); the random policy as a dashed line."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4), dpi=100)
    colors = layout.colors({a for a, _ in groups})
    rank = {a: i for i, a in enumerate(layout.order({a for a, _ in groups}))}
    for (algo, env_id), runs in sorted(groups.items(), key=lambda kv: rank[kv[0][0]]):
        if task_name(env_id) != task or algo == RANDOM:
            continue
        by_step = defaultdict(list)
        for r in runs:
            for s, v in zip(r.eval_steps, r.eval_values):
                by_step[s].append(v)
        steps = np.array(sorted(by_step))
        if not len(steps):
            continue
        summ = [stats.summarize(by_step[s]) for s in steps]
        mean = np.array([s.mean for s in summ])
        ax.plot(steps, mean, color=colors[algo], label=f"{algo} (n={len(runs)})")
        ax.fill_between(steps, [s.ci_low for s in summ], [s.ci_high for s in summ], color=colors[algo], alpha=0.2)
    if not math.isnan(random_scores.get(task, math.nan)):
        ax.axhline(random_scores[task], color="gray", ls="--", lw=1, label="random policy")
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"{task}: mean evaluation return, 95% CI band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def plot_aggregate(rows: list[dict], path: Path, layout: Layout) -> None:
    """IQM of normalised scores per algorithm with stratified-bootstrap 95 % intervals, one panel
    per metric (rliable's interval plot)."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(AGGREGATE_METRICS), figsize=(4.5 * len(AGGREGATE_METRICS), 3.5),
                                dpi=100, squeeze=False)
    colors = layout.colors({r["algo"] for r in rows})
    for ax, metric in zip(axes[0], AGGREGATE_METRICS):
        sel = [r for r in rows if r["statistic"] == "iqm" and r["metric"] == metric]
        for i, r in enumerate(sel):
            if not math.isnan(r["ci_low"]):
                ax.plot([r["ci_low"], r["ci_high"]], [i, i], color=colors[r["algo"]], lw=10, alpha=0.45,
                        solid_capstyle="butt")
            else:
                ax.annotate("no CI (n < 2)", (r["value"], i), xytext=(0, 9), textcoords="offset points",
                            ha="center", fontsize=7)
            ax.plot([r["value"]], [i], "|", color="k", ms=16, mew=2)
        ax.set_ylim(-0.7, len(sel) - 0.3)
        ax.margins(x=0.15)
        ax.set_yticks(range(len(sel)), [r["algo"] for r in sel])
        ax.set_xlabel("IQM of normalised score")
        ax.set_title(METRICS[metric].split(" (")[0], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)


def plot_profiles(scores, path: Path, layout: Layout, metric: str = PAPER_METRIC) -> None:
    """Performance profiles: fraction of runs (tasks weighted equally) with normalised score > tau."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4), dpi=100)
    sel = {algo: per_task for (m, algo), per_task in scores.items() if m == metric}
    every = np.concatenate([np.concatenate(list(p.values())) for p in sel.values()]) if sel else np.zeros(1)
    every = every[~np.isnan(every)] if len(every) else every
    hi = max(1.2, float(np.max(every)) + 0.05) if len(every) else 1.2
    lo = min(0.0, float(np.min(every)) - 0.05) if len(every) else 0.0
    taus = np.linspace(lo, hi, 241)
    colors = layout.colors(sel)
    for algo in layout.order(sel):
        ax.plot(taus, stats.performance_profile(list(sel[algo].values()), taus), color=colors[algo], label=algo)
    ax.set_xlabel(r"normalised score $\tau$")
    ax.set_ylabel(r"fraction of runs with score > $\tau$")
    ax.set_title(f"performance profile ({METRICS[metric].split(' (')[0]})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)

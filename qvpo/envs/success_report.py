"""The report's section on success rates, for tasks that define success (reproduce/open_sparse).

The env families flag success at each episode's end (`info["is_success"]`: Fetch's own flag,
reaching the goal on MountainCar and Acrobot; qvpo.envs), and the trainer logs the rate over
each evaluation's episodes as `eval/success_rate`. This section reads that metric back: per
(column, task) and evaluation step, the mean over seeds with a Student-t 95% interval (the
success-rate curves), the final evaluation's rate, and the first step at which the mean reached
one half. It applies only to runs that logged the metric (qvpo.report.sections).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from qvpo import stats
from qvpo.report.load import history, task_name
from qvpo.report.markdown import fmt
from qvpo.report.plots import plt
from qvpo.report.sections import Section
from qvpo.report.tables import write_csv

KEY = "eval/success_rate"
FILES = ("success_rate.csv", "success_rate.png")


def curve_rows(client, runs) -> list[dict]:
    """One row per (column, task, evaluation step): the seeds' success rates summarised."""
    per_cell = defaultdict(lambda: defaultdict(list))  # (label, env) -> step -> rates
    for r in runs:
        if KEY not in r.metric_keys:
            continue
        for step, value in zip(*history(client, r.run_id, KEY)):
            per_cell[(r.algo, r.env_id)][int(step)].append(value)
    rows = []
    for (label, env), by_step in sorted(per_cell.items()):
        for step in sorted(by_step):
            s = stats.summarize(by_step[step])
            rows.append({"label": label, "env_id": env, "step": step, "n": s.n, "mean": s.mean,
                         "ci_low": s.ci_low, "ci_high": s.ci_high})
    return rows


def _first_half(rows: list[dict]) -> str:
    reached = [r["step"] for r in rows if r["mean"] >= 0.5]
    return f"{reached[0]:,}" if reached else "never"


def _interval(r: dict) -> str:
    if math.isnan(r["ci_low"]):
        return f"{fmt(r['mean'], 2)} (n = {r['n']})"
    return f"{fmt(r['mean'], 2)} [{fmt(r['ci_low'], 2)}, {fmt(r['ci_high'], 2)}]"


def plot(rows: list[dict], path: Path) -> None:
    tasks = sorted({r["env_id"] for r in rows})
    p = plt()
    fig, axes = p.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, env in zip(axes[0], tasks):
        for label in sorted({r["label"] for r in rows if r["env_id"] == env}):
            c = [r for r in rows if r["env_id"] == env and r["label"] == label]
            x = np.array([r["step"] for r in c])
            ax.plot(x, [r["mean"] for r in c], label=label)
            lo, hi = np.array([r["ci_low"] for r in c]), np.array([r["ci_high"] for r in c])
            ok = np.isfinite(lo)
            ax.fill_between(x[ok], np.clip(lo[ok], 0, 1), np.clip(hi[ok], 0, 1), alpha=0.2)
        ax.set(title=task_name(env), xlabel="env steps", ylabel="success rate", ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    p.close(fig)


class _SuccessSection:
    name = "success rate"

    def applies(self, runs) -> bool:
        return any(KEY in r.metric_keys for r in runs)

    def build(self, client, runs, report_dir) -> Section:
        report_dir = Path(report_dir)
        rows = curve_rows(client, runs)
        write_csv(report_dir / FILES[0], rows)
        plot(rows, report_dir / FILES[1])
        lines = ["## Success rate", "",
                 f"For tasks that define success (`{KEY}`: the share of each evaluation's episodes that "
                 "ended in success; docs/environments.md#sparse-rewards-and-success). Mean over seeds with a "
                 "Student-t 95% interval; curves in `success_rate.png`, every point in `success_rate.csv`.", "",
                 "| task | column | final success rate [95% CI] | at step | first step with mean >= 0.5 |",
                 "|---|---|---|---|---|"]
        cells = defaultdict(list)
        for r in rows:
            cells[(r["env_id"], r["label"])].append(r)
        for (env, label), c in sorted(cells.items()):
            lines.append(f"| {task_name(env)} | {label} | {_interval(c[-1])} | {c[-1]['step']:,} | {_first_half(c)} |")
        lines += ["", "![success rate](success_rate.png)", ""]
        return Section("\n".join(lines), list(FILES))


SECTION = _SuccessSection()

"""The paper's Table 1 rebuilt from MLflow runs, with the statistics to read it by.

`build_report` reads the FINISHED training runs of one experiment, one run per
(algorithm, task, seed) tagged `algo`, `env_id`, `seed`; computes every candidate for the
paper's unstated metric per run, summarises cells, tests QVPO against each baseline per task,
aggregates across tasks on normalised scores (rliable style), draws the figures and writes
table.md, runs.csv, cells.csv, comparisons.csv, aggregate.csv and PNGs into out_dir/<experiment>/;
optionally the lot is logged back as a `report` run (tag qvpo.report = 1) that later reports
skip. The maths lives in qvpo.stats; this module is I/O, tables and plots.

Which return the paper's table reports (PAPER_METRIC = best evaluation), argued:
the paper does not say. Its reference main.py writes only the *training*-episode returns
(behaviour policy, best of Kb = 4) to its results file; the evaluation returns (10 episodes,
32 candidates) are printed and used for one thing, choosing the checkpoint to keep, which is the
best evaluation so far. The table's spreads point to a maximum over training: QVPO's sd is
13.8 on Hopper and 14.5 on Humanoid over 5 seeds, TD3's 8.5 on Hopper, far below the seed-to-seed
spread of a return read at one fixed step (a Hopper policy that falls in one evaluation costs
hundreds), but what a running maximum that every seed pushes to a ceiling looks like. A maximum
of the training-return curve would show the same compression, hence it is shown too (smoothed
over 10 episodes, since the raw maximum of single episodes is a pure outlier statistic); the best
evaluation is preferred because it is the quantity the reference code itself tracks as "best".
The final evaluation and the end of the training curve are shown as the honest alternatives.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvpo import stats
from qvpo.errors import ConfigError
from qvpo.tracking import search_all

EVAL_KEY = "eval/return_mean"
TRAIN_KEY = "train/episode_return"
REPORT_TAG = "qvpo.report"
RANDOM = "Random"  # algo tag of the uniformly random policy runs (normalisation's 0)
TREATMENT = "QVPO"
PAPER_ORDER = ("PPO", "SPO", "TD3", "SAC", "DIPO", "QSM", "QVPO")  # the paper's column order
EFFICIENCY_STEPS = (100_000, 200_000, 300_000)  # env steps
LAST_EPISODES = 10  # training episodes averaged for "return at the end"
SMOOTH_EPISODES = 10  # moving-average window of the training-return curve
MAX_TAG_CHARS = 5000  # MLflow caps a tag value at 8000 characters

# per-run metrics, in the order the tables show them
METRICS = {
    "best_eval": "best evaluation (max of eval/return_mean)",
    "final_eval": "final evaluation (last eval/return_mean)",
    "train_end": f"training return at the end (mean of the last {LAST_EPISODES} episodes)",
    "train_max_smoothed": f"max of the training-return curve ({SMOOTH_EPISODES}-episode moving average)",
    **{f"eval_at_{s // 1000}k": f"evaluation return at {s // 1000}k steps" for s in EFFICIENCY_STEPS},
    "eval_auc": "area under the evaluation curve / its span (return)",
    "eval_auc_norm": "normalised area under the evaluation curve",
}
PAPER_METRIC = "best_eval"  # the metric the paper's numbers are set beside (module docstring)
AGGREGATE_METRICS = ("best_eval", "final_eval")


@dataclass
class Run:
    """One training run: its tags and the two metric histories, sorted by step."""

    run_id: str
    algo: str
    env_id: str
    seed: str
    start_time: int
    config_hash: str
    eval_steps: np.ndarray = field(repr=False)
    eval_values: np.ndarray = field(repr=False)
    train_steps: np.ndarray = field(repr=False)
    train_values: np.ndarray = field(repr=False)
    metrics: dict = field(default_factory=dict)
    metric_keys: frozenset = field(default_factory=frozenset, repr=False)  # every metric the run logged


def task_name(env_id: str) -> str:
    """Hopper-v5 -> Hopper: the paper's name of a task (it ran -v3; we run -v5)."""
    return re.sub(r"-v\d+$", "", env_id)


# ----------------------------------------------------------------------------- reading
def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A metric's (steps, values) sorted by step; of repeated steps (a resumed run may log one
    twice) the value logged last wins."""
    rows = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    last = {step: value for step, _, value in rows}
    steps = np.array(sorted(last), dtype=float)
    return steps, np.array([last[s] for s in sorted(last)], dtype=float)


def load_runs(client, experiment_id: str) -> tuple[list[Run], list[str]]:
    """The experiment's FINISHED training runs and a list of notes on what was left out:
    report runs (tag qvpo.report), runs without algo/env_id tags, and older duplicates of an
    (algo, env_id, seed) triple (the most recently started run is kept)."""
    notes, latest = [], {}
    for r in search_all(client, experiment_id, "attributes.status = 'FINISHED'"):
        tags = r.data.tags
        if tags.get(REPORT_TAG):
            continue
        if "algo" not in tags or "env_id" not in tags:
            notes.append(f"run {r.info.run_id}: no algo/env_id tag, left out")
            continue
        key = (_label(tags), tags["env_id"], tags.get("seed", r.info.run_id))
        if key in latest:
            old, new = sorted([latest[key], r], key=lambda x: x.info.start_time or 0)
            notes.append(f"run {old.info.run_id}: duplicate of {key[0]} / {key[1]} / seed {key[2]}, "
                         f"superseded by {new.info.run_id}")
            r = new
        latest[key] = r
    runs = []
    for r in latest.values():
        t = r.data.tags
        es, ev = _history(client, r.info.run_id, EVAL_KEY)
        ts, tv = _history(client, r.info.run_id, TRAIN_KEY)
        runs.append(Run(r.info.run_id, _label(t), t["env_id"], t.get("seed", ""), r.info.start_time or 0,
                        t.get("config_hash", ""), es, ev, ts, tv, metric_keys=frozenset(r.data.metrics)))
    runs.sort(key=lambda r: (r.env_id, r.algo, _seed_key(r.seed)))
    return runs, notes


def _label(tags: dict) -> str:
    """The group a run belongs to: its sweep variant (ablations: e.g. 'Kb1-Kt1'), else its algorithm."""
    return tags.get("variant") or tags["algo"]


def _seed_key(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def read_paper(path: Path | None) -> dict[tuple[str, str], tuple[float, float]]:
    """paper.csv (columns env, algo, mean, std; '#' lines are comments; an empty mean is the
    paper's N/A) as {(task, algo): (mean, std)}."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"paper table {str(path)!r} not found (expected a csv with env,algo,mean,std)")
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    out = {}
    for row in csv.DictReader(lines):
        def num(s):
            return float(s) if s not in (None, "") else math.nan
        out[(row["env"].strip(), row["algo"].strip())] = (num(row["mean"]), num(row.get("std")))
    return out


# ----------------------------------------------------------------------------- per run
def _value_at(steps: np.ndarray, values: np.ndarray, step: int) -> float:
    """The eval return at `step`: the last one logged at or before it; NaN if the run stopped
    short of `step` (its last evaluation is earlier) or had none by then."""
    if not len(steps) or steps[-1] < step or steps[0] > step:
        return math.nan
    return float(values[np.searchsorted(steps, step, side="right") - 1])


def run_metrics(run: Run, auc_end: float, random: float, reference: float) -> dict[str, float]:
    """Every candidate for the paper's metric, and the sample-efficiency numbers, of one run."""
    ev, tv = run.eval_values, run.train_values
    out = {
        "best_eval": float(ev.max()) if len(ev) else math.nan,
        "final_eval": float(ev[-1]) if len(ev) else math.nan,
        "train_end": float(tv[-LAST_EPISODES:].mean()) if len(tv) else math.nan,
        "train_max_smoothed": math.nan,
    }
    if len(tv):
        w = min(SMOOTH_EPISODES, len(tv))  # a run with fewer episodes: the mean of them all
        out["train_max_smoothed"] = float(np.convolve(tv, np.ones(w) / w, mode="valid").max())
    for s in EFFICIENCY_STEPS:
        out[f"eval_at_{s // 1000}k"] = _value_at(run.eval_steps, ev, s)
    out["eval_auc"] = stats.mean_over_curve(run.eval_steps, ev, end=auc_end)
    out["eval_auc_norm"] = float(stats.normalized_score(out["eval_auc"], random, reference))
    return out


def _random_score(runs: list[Run]) -> float:
    """The return of the uniformly random policy on a task: the mean over its Random runs of each
    run's mean evaluation return (every evaluation of a fixed policy samples the same
    distribution, so all of them are averaged); a run without evaluations gives its training
    episodes' mean instead."""
    per_run = [r.eval_values.mean() if len(r.eval_values) else r.train_values.mean()
               for r in runs if len(r.eval_values) or len(r.train_values)]
    return float(np.mean(per_run)) if per_run else math.nan


# ----------------------------------------------------------------------------- tables
def _order(algos) -> list[str]:
    known = [a for a in PAPER_ORDER if a in algos]
    return known + sorted(a for a in algos if a not in PAPER_ORDER and a != RANDOM) + \
        ([RANDOM] if RANDOM in algos else [])


def _task_order(tasks, paper) -> list[str]:
    paper_tasks = list(dict.fromkeys(t for t, _ in paper))
    return sorted(tasks, key=lambda t: (paper_tasks.index(t) if t in paper_tasks else len(paper_tasks), t))


def cell_rows(groups: dict[tuple[str, str], list[Run]], paper) -> list[dict]:
    """One row per (algo, env_id): n, and n / mean / sd / 95 % t-interval of every metric,
    the paper's mean and sd beside PAPER_METRIC."""
    rows = []
    for (algo, env_id), runs in groups.items():
        task = task_name(env_id)
        row = {"algo": algo, "env_id": env_id, "task": task, "n": len(runs),
               "seeds": " ".join(r.seed for r in runs),
               "config_hashes": " ".join(sorted({r.config_hash for r in runs if r.config_hash}))}
        for m in METRICS:
            s = stats.summarize([r.metrics[m] for r in runs])
            row.update({f"{m}_n": s.n, f"{m}_mean": s.mean, f"{m}_std": s.std,
                        f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high})
        pm, ps = paper.get((task, algo), (math.nan, math.nan))
        row.update({"paper_metric": PAPER_METRIC, "paper_mean": pm, "paper_std": ps,
                    "note": stats.NO_TEST if len(runs) < stats.MIN_N else ""})
        rows.append(row)
    return rows


def comparison_rows(groups: dict[tuple[str, str], list[Run]], metric: str = PAPER_METRIC) -> list[dict]:
    """QVPO against each baseline on each task: Welch t, Mann-Whitney U, both Holm-adjusted over
    all comparisons of the table, Hedges' g and a bootstrap interval of the difference of means."""
    rows = []
    for (algo, env_id), runs in groups.items():
        if algo in (TREATMENT, RANDOM) or (TREATMENT, env_id) not in groups:
            continue
        x = np.array([r.metrics[metric] for r in groups[(TREATMENT, env_id)]])
        y = np.array([r.metrics[metric] for r in runs])
        welch, mwu = stats.welch_t(x, y), stats.mann_whitney_u(x, y)
        diff = stats.bootstrap_mean_difference(x, y)
        nx, ny = stats.summarize(x).n, stats.summarize(y).n
        rows.append({"task": task_name(env_id), "env_id": env_id, "metric": metric, "algo": TREATMENT,
                     "baseline": algo, "n_algo": nx, "n_baseline": ny,
                     "mean_algo": np.nanmean(x) if nx else math.nan,
                     "mean_baseline": np.nanmean(y) if ny else math.nan,
                     "diff": diff.estimate, "diff_ci_low": diff.low, "diff_ci_high": diff.high,
                     "welch_t": welch.statistic, "welch_p": welch.pvalue,
                     "mwu_u": mwu.statistic, "mwu_p": mwu.pvalue, "hedges_g": stats.hedges_g(x, y),
                     "mwu_min_p": stats.min_mwu_pvalue(nx, ny),
                     "note": "" if stats.enough(x, y) else stats.NO_TEST})
    for test in ("welch", "mwu"):  # one family per test: the table's comparisons together
        adjusted = stats.holm_bonferroni([r[f"{test}_p"] for r in rows])
        for r, p in zip(rows, adjusted):
            r[f"{test}_p_holm"] = p
    return rows


def aggregate_rows(groups, normalisers: dict[str, tuple[float, float]], task_order: list[str]
                   ) -> tuple[list[dict], dict]:
    """Across tasks: IQM and mean of normalised scores per algorithm (stratified bootstrap
    intervals), and QVPO's probability of improvement over each baseline. Returns the rows and
    the normalised scores {(metric, algo): {task: array}} for the profiles."""
    rows, scores = [], defaultdict(dict)
    rank = {t: i for i, t in enumerate(task_order)}
    algos = _order({a for a, _ in groups})
    for metric in AGGREGATE_METRICS:
        for algo in algos:
            if algo == RANDOM:
                continue
            for (a, env_id), runs in groups.items():
                task = task_name(env_id)
                if a == algo and task in normalisers:
                    rnd, ref = normalisers[task]
                    scores[(metric, algo)][task] = stats.normalized_score([r.metrics[metric] for r in runs], rnd, ref)
            per_task = scores.get((metric, algo), {})
            if not per_task:
                continue
            tasks = sorted(per_task, key=rank.get)
            samples = [per_task[t] for t in tasks]
            n_runs = sum(stats.summarize(s).n for s in samples)
            small = [t for t in tasks if not stats.enough(per_task[t])]
            note = f"{stats.NO_TEST} on {', '.join(small)}: no interval" if small else ""
            iqm = stats.iqm_stratified(samples)
            rows.append({"statistic": "iqm", "metric": metric, "algo": algo, "versus": "",
                         "value": iqm.estimate, "ci_low": iqm.low, "ci_high": iqm.high,
                         "n_tasks": len(tasks), "n_runs": n_runs, "tasks": " ".join(tasks), "note": note})
            mean = stats.mean_stratified(samples)
            rows.append({"statistic": "mean", "metric": metric, "algo": algo, "versus": "",
                         "value": mean.estimate, "ci_low": mean.low, "ci_high": mean.high,
                         "n_tasks": len(tasks), "n_runs": n_runs, "tasks": " ".join(tasks), "note": note})
    # P(QVPO > baseline) needs no normalisation (U / nm is per task and scale-free): every task
    # both ran with at least 2 seeds
    for metric in AGGREGATE_METRICS:
        for algo in algos:
            if algo in (TREATMENT, RANDOM):
                continue
            common = sorted((task_name(e) for a, e in groups if a == algo and (TREATMENT, e) in groups),
                            key=rank.get)
            env = {task_name(e): e for a, e in groups if a == algo}
            x = {t: np.array([r.metrics[metric] for r in groups[(TREATMENT, env[t])]]) for t in common}
            y = {t: np.array([r.metrics[metric] for r in groups[(algo, env[t])]]) for t in common}
            usable = [t for t in common if stats.enough(x[t], y[t])]
            left = sorted(set(common) - set(usable))
            if not common:
                continue
            poi = stats.probability_of_improvement([x[t] for t in usable], [y[t] for t in usable]) \
                if usable else stats.Interval(math.nan, math.nan, math.nan)
            note = f"left out ({stats.NO_TEST}): {', '.join(left)}" if left else ""
            rows.append({"statistic": "prob_improvement", "metric": metric, "algo": TREATMENT, "versus": algo,
                         "value": poi.estimate, "ci_low": poi.low, "ci_high": poi.high,
                         "n_tasks": len(usable), "n_runs": sum(len(x[t]) + len(y[t]) for t in usable),
                         "tasks": " ".join(usable), "note": note})
    return rows, scores


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(algos) -> dict[str, str]:
    ordered = [a for a in PAPER_ORDER] + sorted(set(algos) - set(PAPER_ORDER))
    return {a: f"C{i % 10}" for i, a in enumerate(ordered)}


def plot_learning_curves(groups, random_scores, path: Path, task: str) -> None:
    """Mean evaluation return per algorithm with its 95 % t-interval band (over the seeds that
    logged each step); the random policy as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    colors = _colors({a for a, _ in groups})
    rank = {a: i for i, a in enumerate(_order({a for a, _ in groups}))}
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
    plt.close(fig)


def plot_aggregate(rows: list[dict], path: Path) -> None:
    """IQM of normalised scores per algorithm with stratified-bootstrap 95 % intervals, one panel
    per metric (rliable's interval plot)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(AGGREGATE_METRICS), figsize=(4.5 * len(AGGREGATE_METRICS), 3.5),
                             dpi=100, squeeze=False)
    colors = _colors({r["algo"] for r in rows})
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
    plt.close(fig)


def plot_profiles(scores, path: Path, metric: str = PAPER_METRIC) -> None:
    """Performance profiles: fraction of runs (tasks weighted equally) with normalised score > tau."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    sel = {algo: per_task for (m, algo), per_task in scores.items() if m == metric}
    every = np.concatenate([np.concatenate(list(p.values())) for p in sel.values()]) if sel else np.zeros(1)
    every = every[~np.isnan(every)] if len(every) else every
    hi = max(1.2, float(np.max(every)) + 0.05) if len(every) else 1.2
    lo = min(0.0, float(np.min(every)) - 0.05) if len(every) else 0.0
    taus = np.linspace(lo, hi, 241)
    colors = _colors(sel)
    for algo in _order(sel):
        ax.plot(taus, stats.performance_profile(list(sel[algo].values()), taus), color=colors[algo], label=algo)
    ax.set_xlabel(r"normalised score $\tau$")
    ax.set_ylabel(r"fraction of runs with score > $\tau$")
    ax.set_title(f"performance profile ({METRICS[metric].split(' (')[0]})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- writing
def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})


def _f(x, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p) -> str:
    return "—" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _ms(row, m) -> str:
    """'mean (sd)' of a metric in a cell; one seed: 'mean (n < 2)'."""
    if row[f"{m}_n"] == 0:
        return "—"
    if row[f"{m}_n"] < stats.MIN_N:
        return f"{_f(row[f'{m}_mean'])} (n < 2)"
    return f"{_f(row[f'{m}_mean'])} ({_f(row[f'{m}_std'])})"


METRIC_ARGUMENT = """\
The paper does not say which return its table reports. Its reference code writes only the
*training*-episode returns (behaviour policy, best of Kb = 4 candidates) to its results file;
the evaluation returns (10 episodes, 32 candidates) are printed and used to pick the checkpoint
to keep, the best evaluation so far. The table's spreads fit a maximum over training: QVPO's sd
is 13.8 on Hopper and 14.5 on Humanoid over 5 seeds (TD3 8.5 on Hopper), far below the seed-to-seed
spread of a return read at one fixed step, and what a running maximum that every seed pushes to a
ceiling looks like. So the paper's numbers are set beside the **best evaluation return** (max of
`eval/return_mean` over training). The maximum of the smoothed training curve would compress the
spread the same way and is the runner-up; final evaluation and the training return at the end are
the honest alternatives. All four are shown for every cell."""


PHASES = ("sampling", "critic", "actor", "env", "eval")


def compute_rows(client, groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    """Per (algorithm, task): wall time per env step by phase, from the `time/<phase>_ms_per_step`
    metrics every run logs (each run's mean over its logging windows, then the mean over runs),
    and env steps per second. The phases are the trainer's: sampling (acting and the policy's
    candidate draws), critic, actor (policy update), env (stepping and resets), eval."""
    rows = []
    for (algo, env_id), runs in groups.items():
        row = {"algo": algo, "env_id": env_id, "n": len(runs)}
        for phase in PHASES:
            per_run = [v.mean() for v in (_history(client, r.run_id, f"time/{phase}_ms_per_step")[1] for r in runs)
                       if len(v)]
            row[f"{phase}_ms_per_step"] = float(np.mean(per_run)) if per_run else math.nan
        rates = [v.mean() for v in (_history(client, r.run_id, "perf/steps_per_s")[1] for r in runs) if len(v)]
        row["steps_per_s"] = float(np.mean(rates)) if rates else math.nan
        row["total_ms_per_step"] = float(np.nansum([row[f"{p}_ms_per_step"] for p in PHASES]))
        rows.append(row)
    return rows


def compute_markdown(rows: list[dict]) -> str:
    L = ["", "## Compute: wall time per env step by phase", "",
         "From the runs' own `time/<phase>_ms_per_step` metrics (mean over logging windows, then over "
         "runs; on whatever machine each run ran: see the runs' `host` and `device` tags).", "",
         "| algorithm | task | n | " + " | ".join(f"{p} ms" for p in PHASES) + " | total ms | env steps/s |",
         "|---|---|---|" + "---|" * (len(PHASES) + 2)]
    for r in rows:
        cells = " | ".join(_f(r[f"{p}_ms_per_step"], 3) for p in PHASES)
        L.append(f"| {r['algo']} | {task_name(r['env_id'])} | {r['n']} | {cells} | "
                 f"{_f(r['total_ms_per_step'], 3)} | {_f(r['steps_per_s'], 1)} |")
    return "\n".join(L) + "\n"


GRADVAR_PREFIX = "gradvar/"  # qvpo.diagnostics: gradvar/<weighting>/<metric>
GRADVAR_METRICS = ("scale_free_var", "loss_var", "ess")
GRADVAR_REFERENCE = "qadv"  # the advantage weighting every other weighting is tested against


def gradvar_run_rows(client, runs: list[Run]) -> list[dict]:
    """One row per (run, weighting) for runs that logged the gradient-variance diagnostic: each
    `gradvar/<weighting>/<metric>` as the run's mean over its logged steps."""
    rows = []
    for r in runs:
        names = sorted({k.split("/")[1] for k in r.metric_keys if k.startswith(GRADVAR_PREFIX) and k.count("/") == 2})
        for name in names:
            row = {"run_id": r.run_id, "algo": r.algo, "env_id": r.env_id, "seed": r.seed, "weighting": name}
            for m in GRADVAR_METRICS:
                v = _history(client, r.run_id, f"{GRADVAR_PREFIX}{name}/{m}")[1]
                row[m] = float(v.mean()) if len(v) else math.nan
                row[f"{m}_n_logged"] = len(v)
            rows.append(row)
    return rows


def _gradvar_order(names) -> list[str]:
    rest = sorted(set(names) - {GRADVAR_REFERENCE})
    return ([GRADVAR_REFERENCE] if GRADVAR_REFERENCE in names else []) + rest


def gradvar_test_rows(run_rows: list[dict]) -> list[dict]:
    """qadv against each other weighting, paired by run: Wilcoxon signed-rank (two-sided, scipy)
    on log(scale_free_var of the other) - log(that of qadv), per task and over all runs, Holm
    corrected over every test of the section. Logs, because the ratio spans orders of magnitude
    and is positive: a difference of logs is a ratio, comparable across tasks."""
    from scipy import stats as sps

    per_run = defaultdict(dict)
    for r in run_rows:
        per_run[r["run_id"]][r["weighting"]] = r
    names = _gradvar_order({r["weighting"] for r in run_rows})
    scopes = sorted({r["env_id"] for r in run_rows}) + ["all"]
    rows = []
    for scope in scopes:
        for other in names:
            if other == GRADVAR_REFERENCE:
                continue
            pairs = [(w[GRADVAR_REFERENCE]["scale_free_var"], w[other]["scale_free_var"]) for w in per_run.values()
                     if GRADVAR_REFERENCE in w and other in w and (scope == "all" or w[other]["env_id"] == scope)]
            pairs = [(a, b) for a, b in pairs if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)]
            ref = np.array([a for a, _ in pairs])
            oth = np.array([b for _, b in pairs])
            row = {"scope": scope, "reference": GRADVAR_REFERENCE, "weighting": other, "n": len(pairs),
                   "reference_median": float(np.median(ref)) if len(pairs) else math.nan,
                   "weighting_median": float(np.median(oth)) if len(pairs) else math.nan,
                   "median_ratio": float(np.exp(np.median(np.log(oth) - np.log(ref)))) if len(pairs) else math.nan,
                   "frac_weighting_higher": float(np.mean(oth > ref)) if len(pairs) else math.nan,
                   "wilcoxon_w": math.nan, "wilcoxon_p": math.nan, "note": ""}
            d = np.log(oth) - np.log(ref)
            if len(pairs) < 2:
                row["note"] = "n < 2: no test"
            elif not np.any(d != 0):
                row["note"] = "all differences 0: no test"
            else:
                res = sps.wilcoxon(d, alternative="two-sided")
                row["wilcoxon_w"], row["wilcoxon_p"] = float(res.statistic), float(res.pvalue)
            rows.append(row)
    holm = stats.holm_bonferroni([r["wilcoxon_p"] for r in rows])
    for r, h in zip(rows, holm):
        r["wilcoxon_p_holm"] = float(h)
    return rows


def plot_gradvar(run_rows: list[dict], path: Path) -> None:
    """Box plot of the per-run scale-free gradient variance per weighting (log scale), runs as points."""
    plt = _plt()
    names = _gradvar_order({r["weighting"] for r in run_rows})
    envs = sorted({r["env_id"] for r in run_rows})
    data = [[r["scale_free_var"] for r in run_rows if r["weighting"] == n and r["scale_free_var"] > 0] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    for j, env in enumerate(envs):
        for i, n in enumerate(names):
            ys = [r["scale_free_var"] for r in run_rows if r["weighting"] == n and r["env_id"] == env
                  and r["scale_free_var"] > 0]
            ax.scatter(np.full(len(ys), i + 1 + 0.08 * (j - (len(envs) - 1) / 2)), ys, s=12, color=f"C{j}",
                       label=task_name(env) if i == 0 else None, zorder=3)
    ax.set_yscale("log")
    ax.set_ylabel("tr Cov[g] / |E g|^2 (per-run mean)")
    ax.set_title("scale-free policy-gradient variance by Q-weighting", fontsize=10)
    if envs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gradvar_markdown(run_rows: list[dict], tests: list[dict], figure: str) -> str:
    names = _gradvar_order({r["weighting"] for r in run_rows})
    L = ["", "## Gradient variance by Q-weighting (reproduce/open_weight_variance)", "",
         "From the runs' `gradvar/<weighting>/*` metrics (qvpo.diagnostics): at the same parameters, K "
         "paired minibatch + candidate draws per diagnostic; each run's mean over its diagnostics. "
         "Scale-free variance = tr Cov[g] / |E g|^2 of the policy gradient; ESS = (sum w)^2 / (B sum w^2).", "",
         "| weighting | runs | median scale-free var | median loss var | median ESS |", "|---|---|---|---|---|"]
    for n in names:
        sel = [r for r in run_rows if r["weighting"] == n]
        med = {m: float(np.nanmedian([r[m] for r in sel])) if sel else math.nan for m in GRADVAR_METRICS}
        L.append(f"| {n} | {len(sel)} | {med['scale_free_var']:.4g} | {med['loss_var']:.4g} | {med['ess']:.3f} |")
    L += ["", f"Paired by run: Wilcoxon signed-rank (two-sided) on log(scale-free var) of each weighting minus "
              f"that of `{GRADVAR_REFERENCE}`, per task and over all runs; p Holm-corrected over the tests below. "
              "Ratio > 1: the weighting's gradient is noisier than the advantage's.", "",
          "| scope | weighting | n | median ratio vs qadv | frac higher | W | p | p (Holm) | note |",
          "|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        L.append(f"| {task_name(t['scope'])} | {t['weighting']} | {t['n']} | {_f(t['median_ratio'], 3)} | "
                 f"{_f(t['frac_weighting_higher'], 2)} | {_f(t['wilcoxon_w'], 1)} | {_p(t['wilcoxon_p'])} | "
                 f"{_p(t['wilcoxon_p_holm'])} | {t['note']} |")
    L += ["", f"![{figure}]({figure})"]
    return "\n".join(L) + "\n"


def gradvar_report(client, runs: list[Run], report_dir: Path) -> list[str]:
    """The gradient-variance section, when runs logged it: gradvar_runs.csv, gradvar.csv, gradvar.png
    and a section appended to table.md. Returns the files written (none without gradvar metrics)."""
    run_rows = gradvar_run_rows(client, runs)
    if not run_rows:
        return []
    tests = gradvar_test_rows(run_rows)
    _write_csv(report_dir / "gradvar_runs.csv", run_rows)
    _write_csv(report_dir / "gradvar.csv", tests)
    plot_gradvar(run_rows, report_dir / "gradvar.png")
    with open(report_dir / "table.md", "a") as f:
        f.write(gradvar_markdown(run_rows, tests, "gradvar.png"))
    return ["gradvar_runs.csv", "gradvar.csv", "gradvar.png"]


def write_markdown(path: Path, experiment: str, uri: str, runs: list[Run], notes: list[str], cells, comps,
                   agg, normalisers, aggregate_reason: str, paper, figures: list[str]) -> None:
    tasks = _task_order({c["task"] for c in cells}, paper)
    algos = _order({c["algo"] for c in cells})
    by = {(c["algo"], c["task"]): c for c in cells}
    listed = {k for k in paper}
    L = [f"# {experiment}: the paper's Table 1 from MLflow runs", "",
         f"{len(runs)} FINISHED training runs of experiment `{experiment}` ({uri}), "
         f"{time.strftime('%Y-%m-%d %H:%M')}. Cells are mean (sd over seeds); n = seeds. "
         f"Tasks are Gymnasium -v5 (the paper ran Gym -v3 on mujoco-py).", "",
         "## Which return the paper reports", "", METRIC_ARGUMENT, ""]

    def paper_cell(algo, task):
        if (task, algo) not in listed:
            return "—"
        m, s = paper[(task, algo)]
        return "N/A" if math.isnan(m) else f"{_f(m)} ({_f(s)})"

    L += ["## Table 1: best evaluation return, ours / paper", "",
          "| algorithm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for algo in algos:
        cols = []
        for t in tasks:
            c = by.get((algo, t))
            ours = f"{_ms(c, PAPER_METRIC)} n={c['n']}" if c else "—"
            cols.append(f"{ours} / {paper_cell(algo, t)}")
        L.append(f"| {algo} | " + " | ".join(cols) + " |")
    L += ["", "Paper: mean (sd) over 5 seeds at 1M steps; N/A = the paper's \"does not work\"; "
          "— = no value.", ""]

    L += ["## Per task: every candidate metric and sample efficiency", "",
          "Evaluation at 100k/200k/300k = the last evaluation at or before that step (— when the run "
          "is shorter). AUC = trapezoid area under the evaluation curve divided by its span, cut at "
          "the shortest run of the task; normalised like the scores below.", ""]
    cols = ["best_eval", "final_eval", "train_end", "train_max_smoothed",
            *[f"eval_at_{s // 1000}k" for s in EFFICIENCY_STEPS], "eval_auc", "eval_auc_norm"]
    heads = ["best eval", "paper", "final eval", "train end", "train max (smoothed)",
             *[f"eval @{s // 1000}k" for s in EFFICIENCY_STEPS], "eval AUC/span", "AUC norm."]
    for t in tasks:
        env_ids = sorted({c["env_id"] for c in cells if c["task"] == t})
        L += [f"### {t} ({', '.join(env_ids)})", "", "| algorithm | n | " + " | ".join(heads) + " |",
              "|---|---|" + "---|" * len(heads)]
        for algo in algos:
            c = by.get((algo, t))
            if not c:
                continue
            vals = [_ms(c, m) if m != "eval_auc_norm" else
                    (_f(c[f"{m}_mean"], 2) + (f" ({_f(c[f'{m}_std'], 2)})" if c[f"{m}_n"] >= 2 else ""))
                    for m in cols]
            vals.insert(1, paper_cell(algo, t))
            n = f"{c['n']} ({stats.NO_TEST})" if c["n"] < stats.MIN_N else str(c["n"])
            L.append(f"| {algo} | {n} | " + " | ".join(vals) + " |")
        L.append("")

    L += [f"## {TREATMENT} against each baseline, per task: best evaluation return", ""]
    if not comps:
        L += [f"No comparisons: no task has both {TREATMENT} runs and baseline runs.", ""]
    else:
        m = sum(1 for c in comps if not math.isnan(c["welch_p"]))
        L += [f"Welch's t-test and the Mann-Whitney U test, two-sided; Holm-adjusted p over all {m} "
              "comparisons of the table (one family per test); Hedges' g (bias-corrected pooled-sd "
              "effect size); difference of means with a bootstrap 95% CI (percentile, 10,000 "
              "resamples, seeded).", "",
              f"| task | baseline | n ({TREATMENT}, baseline) | difference [95% CI] | Welch t | p | Holm p "
              "| MWU U | p | Holm p | Hedges g |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in comps:
            n = f"{c['n_algo']}, {c['n_baseline']}"
            if c["note"]:
                L.append(f"| {c['task']} | {c['baseline']} | {n} | {stats.NO_TEST} |" + " |" * 7)
                continue
            L.append(f"| {c['task']} | {c['baseline']} | {n} | {_f(c['diff'])} [{_f(c['diff_ci_low'])}, "
                     f"{_f(c['diff_ci_high'])}] | {_f(c['welch_t'], 2)} | {_p(c['welch_p'])} | "
                     f"{_p(c['welch_p_holm'])} | {_f(c['mwu_u'], 1)} | {_p(c['mwu_p'])} | "
                     f"{_p(c['mwu_p_holm'])} | {_f(c['hedges_g'], 2)} |")
        floor = [c["mwu_min_p"] for c in comps if not c["note"]]
        if m and floor and min(floor) > 0.05 / m:
            L += ["", f"Note: with these seed counts the exact Mann-Whitney test cannot give p below "
                  f"{min(floor):.2g}, while Holm's first threshold is 0.05 / {m} = {0.05 / m:.2g}: no "
                  "Mann-Whitney comparison can be significant after correction, whatever the data. "
                  "Read the effect sizes and intervals instead."]
        L.append("")

    L += ["## Across tasks (normalised scores, Agarwal et al. 2021)", ""]
    if aggregate_reason:
        L += [f"Normalised scores skipped: {aggregate_reason}", ""]
    if normalisers:
        L += ["Normalised score = (return - random) / (reference - random): 0 = the mean return of the "
              f"`{RANDOM}` runs (uniformly random policy) of that task, 1 = the paper's best entry "
              "for that task in the paper table (Hopper-v5 is compared with the paper's Hopper, etc.). "
              "IQM = mean of the middle 50% of all runs of all tasks; 95% CIs by stratified bootstrap "
              "(seeds resampled within each task).", "",
              "| task | random | reference (paper's best) |", "|---|---|---|"]
        for t in tasks:
            if t in normalisers:
                L.append(f"| {t} | {_f(normalisers[t][0])} | {_f(normalisers[t][1])} |")
        L += ["", "| algorithm | metric | IQM [95% CI] | mean [95% CI] | tasks | runs | note |",
              "|---|---|---|---|---|---|---|"]
        for r in [r for r in agg if r["statistic"] == "iqm"]:
            mean = next(x for x in agg if x["statistic"] == "mean" and x["algo"] == r["algo"]
                        and x["metric"] == r["metric"])
            L.append(f"| {r['algo']} | {r['metric']} | {_f(r['value'], 3)} [{_f(r['ci_low'], 3)}, "
                     f"{_f(r['ci_high'], 3)}] | {_f(mean['value'], 3)} [{_f(mean['ci_low'], 3)}, "
                     f"{_f(mean['ci_high'], 3)}] | {r['tasks']} | {r['n_runs']} | {r['note']} |")
        sets = {r["tasks"] for r in agg if r["statistic"] == "iqm"}
        if len(sets) > 1:
            L += ["", "Not every algorithm covers the same tasks: compare IQMs with that in mind."]
        L.append("")
    poi = [r for r in agg if r["statistic"] == "prob_improvement"]
    if poi:
        L += [f"Probability of improvement P({TREATMENT} > baseline): per task the Mann-Whitney U / (n m), "
              "averaged over the tasks both ran with >= 2 seeds (needs no normalisation); "
              "0.5 = no difference; stratified-bootstrap 95% CI.", "",
              "| baseline | metric | P(QVPO > baseline) [95% CI] | tasks | note |", "|---|---|---|---|---|"]
        for r in poi:
            v = stats.NO_TEST if math.isnan(r["value"]) else \
                f"{_f(r['value'], 3)} [{_f(r['ci_low'], 3)}, {_f(r['ci_high'], 3)}]"
            L.append(f"| {r['versus']} | {r['metric']} | {v} | {r['tasks']} | {r['note']} |")
        L.append("")

    L += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if notes:
        L += ["## Runs left out", ""] + [f"- {n}" for n in notes] + [""]
    mixed = [c for c in cells if len(c["config_hashes"].split()) > 1]
    if mixed:
        L += ["## Warning: cells mixing configurations", ""] + \
             [f"- {c['algo']} / {c['env_id']}: config hashes {c['config_hashes']}" for c in mixed] + [""]
    path.write_text("\n".join(L))


def _log(client, experiment_id: str, report_dir: Path, runs: list[Run], agg: list[dict]) -> str:
    """The report as a run of the same experiment: tags, headline metrics, the files."""
    from mlflow.entities import Metric

    ids = ",".join(r.run_id for r in runs)
    if len(ids) > MAX_TAG_CHARS:
        kept = ids[:MAX_TAG_CHARS].rsplit(",", 1)[0]
        ids = f"{kept},...(+{len(runs) - kept.count(',') - 1} more; all in run_ids.txt)"
    run = client.create_run(experiment_id, run_name="report",
                            tags={REPORT_TAG: "1", "report.run_ids": ids, "report.n_runs": str(len(runs))})
    rid = run.info.run_id
    try:
        ts = int(time.time() * 1000)
        metrics = [Metric("report/n_runs", len(runs), ts, 0)]
        for r in agg:
            if r["metric"] != PAPER_METRIC or math.isnan(r["value"]):
                continue
            if r["statistic"] == "iqm":
                metrics.append(Metric(f"report/iqm_{r['algo']}", r["value"], ts, 0))
            elif r["statistic"] == "prob_improvement":
                metrics.append(Metric(f"report/poi_{r['algo']}_vs_{r['versus']}", r["value"], ts, 0))
        client.log_batch(rid, metrics=metrics)
        client.log_artifacts(rid, str(report_dir))
    except Exception:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid


def build_report(experiment: str, tracking_uri: str, paper_csv: Path | None, out_dir: Path,
                 log_to_mlflow: bool = True) -> Path:
    """Build the report of one experiment into out_dir/<experiment>/ and return that directory.

    Reads the experiment's FINISHED training runs (report runs are skipped), groups them by the
    `algo` and `env_id` tags, and writes table.md, runs.csv, cells.csv, comparisons.csv,
    aggregate.csv, run_ids.txt and the figures. paper_csv (env,algo,mean,std, the paper's Table 1)
    gives the paper's column and the normalisation's 1; without it, or without `Random` runs of a
    task, the normalised aggregates skip that task and say why. log_to_mlflow: also log the report
    as a run named `report` (tag qvpo.report = 1) with the files as artifacts. Runs that logged
    the gradient-variance diagnostic (`gradvar/*`) add gradvar.csv, gradvar_runs.csv, gradvar.png
    and a section of table.md (gradvar_report).
    Raises ConfigError when the experiment does not exist or has no usable runs.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {tracking_uri!r}")
    runs, notes = load_runs(client, exp.experiment_id)
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no FINISHED training runs tagged algo and env_id")
    paper = read_paper(paper_csv)

    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.algo, r.env_id)].append(r)
    groups = dict(groups)
    tasks = {task_name(e) for _, e in groups}
    random_scores = {task_name(e): _random_score(rs) for (a, e), rs in groups.items() if a == RANDOM}
    reference = {}
    for (t, _), (m, _) in paper.items():
        if not math.isnan(m):
            reference[t] = max(reference.get(t, -math.inf), m)
    normalisers = {t: (random_scores[t], reference[t]) for t in tasks
                   if not math.isnan(random_scores.get(t, math.nan)) and t in reference}
    reasons = []
    if paper_csv is None:
        reasons.append("no paper table given (--paper), so there is no reference score (the 1)")
    if not random_scores:
        reasons.append(f"no `{RANDOM}` runs in the experiment, so there is no random score (the 0)")
    missing = sorted(tasks - set(normalisers))
    if missing and paper_csv is not None and random_scores:
        reasons.append(f"no {RANDOM} runs or paper entry for {', '.join(missing)}")
    aggregate_reason = "; ".join(reasons)

    for t in tasks:  # every run of a task is cut at the same step for its area
        ends = [r.eval_steps[-1] for (a, e), rs in groups.items() if task_name(e) == t and a != RANDOM
                for r in rs if len(r.eval_steps)]
        end = min(ends) if ends else None
        rnd, ref = normalisers.get(t, (math.nan, math.nan))
        for (a, e), rs in groups.items():
            if task_name(e) == t:
                for r in rs:
                    r.metrics = run_metrics(r, end, rnd, ref)

    report_dir = Path(out_dir) / experiment
    report_dir.mkdir(parents=True, exist_ok=True)
    order = {a: i for i, a in enumerate(_order({a for a, _ in groups}))}
    task_order = _task_order(tasks, paper)
    task_rank = {t: i for i, t in enumerate(task_order)}
    groups = dict(sorted(groups.items(), key=lambda kv: (task_rank[task_name(kv[0][1])], order[kv[0][0]])))

    cells = cell_rows(groups, paper)
    comps = comparison_rows(groups)
    agg, scores = aggregate_rows(groups, normalisers, task_order)

    _write_csv(report_dir / "runs.csv",
               [{"run_id": r.run_id, "algo": r.algo, "env_id": r.env_id, "seed": r.seed,
                 "config_hash": r.config_hash, **r.metrics} for r in runs])
    _write_csv(report_dir / "cells.csv", cells)
    _write_csv(report_dir / "comparisons.csv", comps, None if comps else
               ["task", "env_id", "metric", "algo", "baseline", "note"])
    _write_csv(report_dir / "aggregate.csv", agg, None if agg else
               ["statistic", "metric", "algo", "versus", "value", "ci_low", "ci_high", "n_tasks", "n_runs",
                "tasks", "note"])
    (report_dir / "run_ids.txt").write_text("\n".join(r.run_id for r in runs) + "\n")

    figures = []
    for t in task_order:
        name = f"curves_{t}.png"
        plot_learning_curves(groups, random_scores, report_dir / name, t)
        figures.append(name)
    if scores:
        plot_aggregate(agg, report_dir / "aggregate_iqm.png")
        plot_profiles(scores, report_dir / "performance_profile.png")
        figures += ["aggregate_iqm.png", "performance_profile.png"]
    write_markdown(report_dir / "table.md", experiment, tracking_uri, runs, notes, cells, comps, agg,
                   normalisers, aggregate_reason, paper, figures)
    compute = compute_rows(client, groups)
    _write_csv(report_dir / "compute.csv", compute)
    with open(report_dir / "table.md", "a") as f:
        f.write(compute_markdown(compute))
    gradvar_report(client, runs, report_dir)  # only when runs logged gradvar/* (open_weight_variance)
    if log_to_mlflow:
        _log(client, exp.experiment_id, report_dir, runs, agg)
    return report_dir

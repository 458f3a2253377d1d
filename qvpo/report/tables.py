"""The report's tables: per-run metrics, cells, comparisons, aggregates, compute and provenance
rows, and their CSV files. The statistics themselves are qvpo.stats'; the column order and the
treatment come from the report's Layout (qvpo.report.layout)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvpo import stats
from qvpo.report.layout import RANDOM, Layout
from qvpo.report.layout import default as default_layout
from qvpo.report.load import EVAL_KEY, Run, history, task_name

EFFICIENCY_STEPS = (100_000, 200_000, 300_000)  # env steps
LAST_EPISODES = 10  # training episodes averaged for "return at the end"
SMOOTH_EPISODES = 10  # moving-average window of the training-return curve

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
PAPER_METRIC = "best_eval"  # the metric the paper's numbers are set beside (qvpo.report's docstring)
AGGREGATE_METRICS = ("best_eval", "final_eval")
PHASES = ("sampling", "critic", "actor", "env", "eval")


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


def random_score(runs: list[Run]) -> float:
    """The return of the uniformly random policy on a task: the mean over its Random runs of each
    run's mean evaluation return (every evaluation of a fixed policy samples the same
    distribution, so all of them are averaged); a run without evaluations gives its training
    episodes' mean instead."""
    per_run = [r.eval_values.mean() if len(r.eval_values) else r.train_values.mean()
               for r in runs if len(r.eval_values) or len(r.train_values)]
    return float(np.mean(per_run)) if per_run else math.nan


@dataclass
class Normalisation:
    """What the normalised scores of each task rest on.

    random_scores: {task: the random policy's return} (the 0) for tasks with Random runs;
    normalisers: {task: (0, 1)} for the tasks that have both ends; unnormalised: {task: why not}
    for the others; reason: why normalised scores are skipped, in whole or in part ("" if not)."""

    random_scores: dict[str, float]
    normalisers: dict[str, tuple[float, float]]
    unnormalised: dict[str, str]
    reason: str


def normalisation(groups: dict[tuple[str, str], list[Run]], paper, paper_given: bool) -> Normalisation:
    """0 = the random policy's return on the task (its `Random` runs), 1 = the paper's best mean
    on the task; a task without either is not normalised, and says why."""
    tasks = {task_name(e) for _, e in groups}
    random_scores = {task_name(e): random_score(rs) for (a, e), rs in groups.items() if a == RANDOM}
    reference = {}
    for (t, _), (m, _) in paper.items():
        if not math.isnan(m):
            reference[t] = max(reference.get(t, -math.inf), m)
    normalisers = {t: (random_scores[t], reference[t]) for t in tasks
                   if not math.isnan(random_scores.get(t, math.nan)) and t in reference}
    reasons = []
    if not paper_given:
        reasons.append("no paper table given (--paper), so there is no reference score (the 1)")
    if not random_scores:
        reasons.append(f"no `{RANDOM}` runs in the experiment, so there is no random score (the 0)")
    unnormalised = {}  # task -> why it has no normalised scores
    for t in sorted(tasks - set(normalisers)):
        why = []
        if t not in reference:
            why.append("no paper entry (no 1)" if paper_given else "no paper table (no 1)")
        if t not in random_scores:
            why.append(f"no `{RANDOM}` runs (no 0)")
        elif math.isnan(random_scores[t]):
            why.append(f"its `{RANDOM}` runs have no usable return (no 0)")
        unnormalised[t] = "not normalised: " + ", ".join(why)
    missing = sorted(unnormalised)
    if missing and paper_given and random_scores:
        reasons.append("; ".join(f"{t} {unnormalised[t]}" for t in missing))
    return Normalisation(random_scores, normalisers, unnormalised, "; ".join(reasons))


def score_runs(groups: dict[tuple[str, str], list[Run]], normalisers: dict[str, tuple[float, float]]) -> None:
    """Set every run's metrics (run_metrics); the runs of a task are cut at the same step for
    their area under the curve: the end of its shortest evaluated run, the random policy aside."""
    for t in {task_name(e) for _, e in groups}:
        ends = [r.eval_steps[-1] for (a, e), rs in groups.items() if task_name(e) == t and a != RANDOM
                for r in rs if len(r.eval_steps)]
        end = min(ends) if ends else None
        rnd, ref = normalisers.get(t, (math.nan, math.nan))
        for (a, e), rs in groups.items():
            if task_name(e) == t:
                for r in rs:
                    r.metrics = run_metrics(r, end, rnd, ref)


# ----------------------------------------------------------------------------- per cell
def task_order(tasks, paper) -> list[str]:
    """The paper's tasks in its order, then the others alphabetically."""
    paper_tasks = list(dict.fromkeys(t for t, _ in paper))
    return sorted(tasks, key=lambda t: (paper_tasks.index(t) if t in paper_tasks else len(paper_tasks), t))


def cell_rows(groups: dict[tuple[str, str], list[Run]], paper) -> list[dict]:
    """One row per (algo, env_id): n, and n / mean / sd / 95 % t-interval of every metric,
    the paper's mean and sd beside PAPER_METRIC. `<metric>_n` counts the runs with a value: a cell
    whose runs all lack PAPER_METRIC (no evaluation logged, or only NaN) says so in its note."""
    rows = []
    for (algo, env_id), runs in groups.items():
        task = task_name(env_id)
        row = {"algo": algo, "env_id": env_id, "task": task, "n": len(runs),
               "seeds": " ".join(r.seed for r in runs),
               "results_version": " ".join(sorted({str(r.results_version) for r in runs})),
               "cell_identity": " ".join(sorted({r.cell_identity for r in runs})),
               "config_hashes": " ".join(sorted({r.config_hash for r in runs if r.config_hash}))}
        for m in METRICS:
            s = stats.summarize([r.metrics[m] for r in runs])
            row.update({f"{m}_n": s.n, f"{m}_mean": s.mean, f"{m}_std": s.std,
                        f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high})
        pm, ps = paper.get((task, algo), (math.nan, math.nan))
        usable = row[f"{PAPER_METRIC}_n"]
        note = (_no_usable(len(runs)) if usable == 0 else
                stats.NO_TEST if usable < stats.MIN_N else "")
        row.update({"paper_metric": PAPER_METRIC, "paper_mean": pm, "paper_std": ps, "note": note})
        rows.append(row)
    return rows


def _no_usable(n_runs: int) -> str:
    return f"no usable value: none of its {n_runs} run(s) has a finite {EVAL_KEY}"


def comparison_rows(groups: dict[tuple[str, str], list[Run]], treatment: str,
                    metric: str = PAPER_METRIC) -> list[dict]:
    """The treatment against each other column on each task: Welch t, Mann-Whitney U (exact or
    exhaustive-permutation p at small n: stats.mann_whitney_u), both Holm-adjusted over all
    comparisons of the table, Hedges' g and Welch's t-interval of the difference of means (its
    coverage at 3-5 seeds is checked in tests/test_stats.py; the percentile bootstrap's is not
    near 95 %). The random policy is no baseline."""
    rows = []
    for (algo, env_id), runs in groups.items():
        if algo in (treatment, RANDOM) or (treatment, env_id) not in groups:
            continue
        x = np.array([r.metrics[metric] for r in groups[(treatment, env_id)]])
        y = np.array([r.metrics[metric] for r in runs])
        welch, mwu = stats.welch_t(x, y), stats.mann_whitney_u(x, y)
        diff = stats.welch_mean_difference(x, y)
        nx, ny = stats.summarize(x).n, stats.summarize(y).n
        if stats.enough(x, y):
            note = ""
        elif min(nx, ny) == 0:
            note = f"no usable values ({treatment} {nx}, {algo} {ny}): no test"
        else:
            note = stats.NO_TEST
        rows.append({"task": task_name(env_id), "env_id": env_id, "metric": metric, "algo": treatment,
                     "baseline": algo, "n_algo": nx, "n_baseline": ny,
                     "mean_algo": np.nanmean(x) if nx else math.nan,
                     "mean_baseline": np.nanmean(y) if ny else math.nan,
                     "diff": diff.estimate, "diff_ci_low": diff.low, "diff_ci_high": diff.high,
                     "diff_ci_method": "welch_t" if not note else "",
                     "welch_t": welch.statistic, "welch_p": welch.pvalue,
                     "mwu_u": mwu.statistic, "mwu_p": mwu.pvalue,
                     "mwu_method": stats.mwu_method(x, y) if not note else "", "hedges_g": stats.hedges_g(x, y),
                     "mwu_min_p": stats.min_mwu_pvalue(nx, ny), "note": note})
    for test in ("welch", "mwu"):  # one family per test: the table's comparisons together
        adjusted = stats.holm_bonferroni([r[f"{test}_p"] for r in rows])
        for r, p in zip(rows, adjusted):
            r[f"{test}_p_holm"] = p
    return rows


def aggregate_rows(groups, normalisers: dict[str, tuple[float, float]], task_order: list[str],
                   unnormalised: dict[str, str] | None = None,
                   layout: Layout | None = None) -> tuple[list[dict], dict]:
    """Across tasks: IQM and mean of normalised scores per column (stratified bootstrap
    intervals, in the layout's order), and the treatment's probability of improvement over each
    other column. Returns the rows and the normalised scores {(metric, algo): {task: array}} of
    the covered tasks (profiles). layout: the report's (default: the layout of untagged experiments).

    Every row says which tasks it covers (`tasks`, `n_tasks`) and which of task_order it left out
    and why (`left_out`: no runs of the algorithm, no normalisation for the task (the reason from
    `unnormalised`), or no usable value: every run's metric missing or NaN). The IQM pools the
    runs of the covered tasks (rliable: a task weighs as its number of runs); the mean is the
    mean of per-task means (every covered task weighs the same)."""
    layout = layout or default_layout()
    treatment = layout.treatment
    rows, scores = [], defaultdict(dict)
    unnormalised = unnormalised or {}
    algos = layout.order({a for a, _ in groups})
    envs = defaultdict(dict)  # algo -> task -> env_id
    for a, e in groups:
        envs[a][task_name(e)] = e
    for metric in AGGREGATE_METRICS:
        for algo in algos:
            if algo == RANDOM:
                continue
            covered, left, partial = [], [], []
            for task in task_order:
                if task not in envs[algo]:
                    left.append(f"{task}: no {algo} runs")
                    continue
                if task not in normalisers:
                    left.append(f"{task}: {unnormalised.get(task, 'no normalisation')}")
                    continue
                runs = groups[(algo, envs[algo][task])]
                rnd, ref = normalisers[task]
                sc = np.asarray(stats.normalized_score([r.metrics[metric] for r in runs], rnd, ref), dtype=float)
                usable = int(np.isfinite(sc).sum())
                if usable == 0:
                    left.append(f"{task}: no usable {metric} (all {len(runs)} run(s) missing or NaN)")
                    continue
                if usable < len(runs):
                    partial.append(f"{task}: {usable} of {len(runs)} runs have a value")
                covered.append(task)
                scores[(metric, algo)][task] = sc[np.isfinite(sc)]
            if not covered and not any(t in normalisers for t in envs[algo]):
                continue  # nothing of this algorithm could be normalised: the section says why
            samples = [scores[(metric, algo)][t] for t in covered]
            n_runs = sum(len(x) for x in samples)
            small = [t for t in covered if not stats.enough(scores[(metric, algo)][t])]
            note = "; ".join(([f"{stats.NO_TEST} on {', '.join(small)}: no interval"] if small else []) + partial)
            nan = stats.Interval(math.nan, math.nan, math.nan)
            for name, value, weighting in (
                    ("iqm", stats.iqm_stratified(samples) if samples else nan,
                     "runs pooled (a task weighs as its number of runs)"),
                    ("mean", stats.mean_stratified(samples) if samples else nan,
                     "mean of per-task means (tasks weigh equally)")):
                rows.append({"statistic": name, "metric": metric, "algo": algo, "versus": "",
                             "value": value.estimate, "ci_low": value.low, "ci_high": value.high,
                             "n_tasks": len(covered), "n_runs": n_runs, "tasks": " ".join(covered),
                             "left_out": "; ".join(left), "note": note, "weighting": weighting})
    # P(treatment > baseline) needs no normalisation (U / nm is per task and scale-free): every
    # task both ran with at least 2 usable values
    for metric in AGGREGATE_METRICS:
        for algo in algos:
            if algo in (treatment, RANDOM):
                continue
            common = [t for t in task_order if t in envs[algo] and t in envs[treatment]]
            if not common:
                continue
            x = {t: np.array([r.metrics[metric] for r in groups[(treatment, envs[treatment][t])]]) for t in common}
            y = {t: np.array([r.metrics[metric] for r in groups[(algo, envs[algo][t])]]) for t in common}
            usable = [t for t in common if stats.enough(x[t], y[t])]
            left = []
            for t in task_order:
                if t not in envs[treatment] or t not in envs[algo]:
                    who = " and ".join(a for a in (treatment, algo) if t not in envs[a])
                    left.append(f"{t}: no {who} runs")
                elif t not in usable:
                    nx, ny = stats.summarize(x[t]).n, stats.summarize(y[t]).n
                    left.append(f"{t}: fewer than {stats.MIN_N} usable {metric} values ({treatment} {nx}, {algo} {ny})")
            poi = stats.probability_of_improvement([x[t] for t in usable], [y[t] for t in usable]) \
                if usable else stats.Interval(math.nan, math.nan, math.nan)
            rows.append({"statistic": "prob_improvement", "metric": metric, "algo": treatment, "versus": algo,
                         "value": poi.estimate, "ci_low": poi.low, "ci_high": poi.high,
                         "n_tasks": len(usable), "n_runs": sum(stats.summarize(x[t]).n + stats.summarize(y[t]).n
                                                               for t in usable),
                         "tasks": " ".join(usable), "left_out": "; ".join(left), "note": "",
                         "weighting": "mean of per-task values (tasks weigh equally)"})
    return rows, scores


# ----------------------------------------------------------------------------- compute
def learning_windows(steps, warmup_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The logging windows of a `perf/steps_per_s` history: (env steps in each window, whether
    it counts as learning). Window i runs from the previous logged step (0 for the first) to
    steps[i]: the trainer logs the rate over exactly that span. A window ending at or before the
    warm-up is left out; one straddling the warm-up's end is kept whole (its logged rate cannot be
    split; with log_every dividing warmup_steps, as in every shipped config, none straddles)."""
    steps = np.asarray(steps, dtype=float)
    lengths = np.diff(steps, prepend=0.0)
    return lengths, (steps > warmup_steps) & (lengths > 0)


def learning_time(steps, rates, warmup_steps: int, phase_ms: dict | None = None) -> dict[str, float]:
    """Env steps and wall seconds of a run's learning phase, from its `perf/steps_per_s` history
    (steps, rates): each window's seconds = its env steps / its rate (learning_windows says which
    windows count). phase_ms {phase: (steps, ms_per_step)}: each phase's seconds over the same
    windows, ms_per_step x the window's steps; a window without the phase's metric had none of it
    (the trainer logs only the phases that ran); a phase the run never logged gets no entry.
    Windows with a non-positive or NaN rate are left out.
    Returns {"steps", "seconds", "windows", "<phase>_seconds"}."""
    steps, rates = np.asarray(steps, dtype=float), np.asarray(rates, dtype=float)
    lengths, keep = learning_windows(steps, warmup_steps)
    keep &= np.isfinite(rates) & (rates > 0)
    out = {"steps": float(lengths[keep].sum()), "windows": int(keep.sum()),
           "seconds": float((lengths[keep] / rates[keep]).sum())}
    for phase, (ps, pv) in (phase_ms or {}).items():
        if not len(ps):
            continue
        at = dict(zip(np.asarray(ps, dtype=float), np.asarray(pv, dtype=float)))
        ms = np.array([at.get(s, 0.0) for s in steps])
        ms = np.where(np.isfinite(ms), ms, 0.0)
        out[f"{phase}_seconds"] = float((ms[keep] * lengths[keep]).sum() / 1e3)
    return out


def compute_rows(client, groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    """Per (algorithm, task): env steps per second and wall time per env step by phase over the
    learning phase, time-weighted: total env steps after the warm-up / total wall time after the
    warm-up, summed over the cell's runs (learning_time on each run's `perf/steps_per_s` and
    `time/<phase>_ms_per_step` histories; the warm-up of a run is Run.warmup_steps). A plain mean
    of the window rates would weigh a fast random warm-up window like a slow learning one.
    The phases are the trainer's: sampling (acting and the policy's candidate draws), critic,
    actor (policy update), env (stepping and resets), eval; wall_ms_per_step = 1000 / steps_per_s
    is all of it (the phases plus what no phase times)."""
    rows = []
    for (algo, env_id), runs in groups.items():
        per_run = []
        for r in runs:
            steps, rates = history(client, r.run_id, "perf/steps_per_s")
            if not len(steps):
                continue
            phases = {p: history(client, r.run_id, f"time/{p}_ms_per_step") for p in PHASES}
            per_run.append(learning_time(steps, rates, r.warmup_steps, phases))
        total_steps = sum(t["steps"] for t in per_run)
        total_s = sum(t["seconds"] for t in per_run)
        row = {"algo": algo, "env_id": env_id, "n": len(runs), "n_timed": len(per_run),
               "warmup_steps": " ".join(sorted({str(r.warmup_steps) for r in runs})),
               "learning_steps": total_steps, "learning_seconds": total_s}
        for phase in PHASES:  # a run that never logged a phase had none of it; no run: unknown
            logged = [t for t in per_run if f"{phase}_seconds" in t]
            row[f"{phase}_ms_per_step"] = (1e3 * sum(t[f"{phase}_seconds"] for t in logged) / total_steps
                                           if total_steps and logged else math.nan)
        phase_ms = [row[f"{p}_ms_per_step"] for p in PHASES if not math.isnan(row[f"{p}_ms_per_step"])]
        row["total_ms_per_step"] = float(sum(phase_ms)) if phase_ms else math.nan
        row["steps_per_s"] = total_steps / total_s if total_s else math.nan
        row["wall_ms_per_step"] = 1e3 * total_s / total_steps if total_steps else math.nan
        rows.append(row)
    return rows


def provenance_rows(client, runs: list[Run]) -> list[dict]:
    """Where and with what each run was made: commit, results version, host, device, torch, and
    its wall time (MLflow's start to end; a resumed run's includes the time it was stopped)."""
    rows = []
    for r in runs:
        info = client.get_run(r.run_id)
        t = info.data.tags
        start, end = info.info.start_time, info.info.end_time
        rows.append({"run_id": r.run_id, "algo": r.algo, "env_id": r.env_id, "seed": r.seed,
                     "git_commit": t.get("git_commit", ""), "results_version": r.results_version,
                     "host": t.get("host", ""), "device": t.get("device", ""), "torch": t.get("version.torch", ""),
                     "resumed_at_step": t.get("qvpo.resumed_at_step", ""),
                     "wall_s": round((end - start) / 1000, 1) if start and end else math.nan})
    return rows


# ----------------------------------------------------------------------------- files
def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows as a CSV file (columns: the first row's keys unless given); NaN is an empty field."""
    columns = columns or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})

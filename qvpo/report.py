"""The paper's Table 1 rebuilt from MLflow runs, with the statistics to read it by.

`build_report` reads the FINISHED training runs of one experiment, one run per
(algorithm, task, seed) tagged `algo`, `env_id`, `seed`; computes every candidate for the
paper's unstated metric per run, summarises cells, tests QVPO against each baseline per task,
aggregates across tasks on normalised scores (rliable style), draws the figures and writes
table.md, runs.csv, cells.csv, comparisons.csv, aggregate.csv, dropped.csv and PNGs into
out_dir/<experiment>/; optionally the lot is logged back as a `report` run (tag qvpo.report = 1)
that later reports skip. The maths lives in qvpo.stats; this module is I/O, tables and plots.

What is pooled (select_runs): a cell is (algorithm or variant label, env_id). Its runs are pooled
only when they computed the same thing: same results version (tag qvpo.results_version) and
same configuration up to the seed (tag qvpo.cell_identity; the run identity qvpo.run_identity
includes the seed, so it cannot be compared across seeds). Runs of another results version are
dropped; of the current version's configurations the one with the most seeds is kept (tie: the
newest); every dropped run is named in table.md and dropped.csv. Runs without these tags (older
than run identities) count as results version 1, cell identity "unknown".

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

from qvpo import identity, stats
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
# the hash of a run's config without its seed: what runs of one cell must share to be pooled
CELL_IDENTITY_TAG = getattr(identity, "CELL_TAG", "qvpo.cell_identity")  # identity.CELL_TAG
UNKNOWN_IDENTITY = "unknown"  # runs older than the identity tags
OLD_VERSION = 1  # the results version of a run without the tag (identity.RESULTS_VERSION's history)
WARMUP_TAG = "qvpo.warmup_steps"  # env steps of random warm-up the run took (compute_rows)
DROPPED_COLUMNS = ["run_id", "label", "env_id", "seed", "results_version", "cell_identity", "reason"]

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
    warmup_steps: int = 0  # env steps of random actions before learning (see _warmup_steps)
    results_version: int = OLD_VERSION
    cell_identity: str = UNKNOWN_IDENTITY
    run_identity: str = ""


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


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The points of a history with a finite value, and how many were not (a NaN return is a
    missing number, not a score: it must not turn a run's maximum into NaN)."""
    ok = np.isfinite(values)
    return steps[ok], values[ok], int((~ok).sum())


def _int_or_none(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _warmup_steps(tags: dict, params: dict) -> int:
    """The run's random warm-up in env steps: tag qvpo.warmup_steps if present, else the param
    Trainer.warmup_steps, else (that param unset, None: the agent's own) the one
    `<Agent>.warmup_steps` param the run logged, else 0."""
    for value in (tags.get(WARMUP_TAG), params.get("Trainer.warmup_steps")):
        n = _int_or_none(value)
        if n is not None:
            return n
    agent = {_int_or_none(v) for k, v in params.items() if k.endswith(".warmup_steps") and "/" not in k}
    agent.discard(None)
    return agent.pop() if len(agent) == 1 else 0


def _version(tags: dict) -> int | None:
    """The run's results version; OLD_VERSION without the tag, None when the tag is unreadable."""
    return _int_or_none(tags[identity.VERSION_TAG]) if identity.VERSION_TAG in tags else OLD_VERSION


def _dropped(r, reason: str) -> dict:
    t = r.data.tags
    return {"run_id": r.info.run_id, "label": _label(t) if "algo" in t else t.get("variant", ""),
            "env_id": t.get("env_id", ""), "seed": t.get("seed", ""),
            "results_version": t.get(identity.VERSION_TAG, ""),
            "cell_identity": t.get(CELL_IDENTITY_TAG, ""), "reason": reason}


def select_runs(mlflow_runs) -> tuple[list, list[dict], list[str]]:
    """Which of an experiment's runs (MLflow Run objects) the report pools, cell by cell.

    Returns (kept runs, dropped rows {run_id, label, env_id, seed, results_version, cell_identity,
    reason}, notes on whole cells). In each cell (label, env_id): runs whose results version is
    not identity.RESULTS_VERSION are dropped (a cell with no current-version run is left out
    entirely, with a note); the current-version runs are grouped by cell identity (tag
    qvpo.cell_identity, "unknown" without it) and only the group with the most seeds is kept
    (tie: the group with the newest start time): runs of different configurations are never
    pooled. Within it, of two runs of the same seed the most recently started is kept (a re-run)."""
    kept, dropped, notes = [], [], []
    cells = defaultdict(list)
    for r in mlflow_runs:
        tags = r.data.tags
        if tags.get(REPORT_TAG):
            continue
        if "algo" not in tags or "env_id" not in tags:
            dropped.append(_dropped(r, "no algo/env_id tag"))
            continue
        cells[(_label(tags), tags["env_id"])].append(r)
    current = identity.RESULTS_VERSION
    for (label, env_id), rs in cells.items():
        same_version = []
        for r in rs:
            v = _version(r.data.tags)
            if v == current:
                same_version.append(r)
            elif v is None:
                dropped.append(_dropped(r, f"unreadable results version tag "
                                           f"{r.data.tags[identity.VERSION_TAG]!r}"))
            else:
                dropped.append(_dropped(r, f"results version {v}, not the current {current}: runs of "
                                           "different versions are never pooled"))
        if not same_version:
            versions = sorted({str(_version(r.data.tags)) for r in rs})
            notes.append(f"{label} / {env_id}: no run of the current results version {current} "
                         f"({len(rs)} run(s) of version {', '.join(versions)}, all dropped): the cell is "
                         "left out")
            continue
        by_identity = defaultdict(list)
        for r in same_version:
            by_identity[r.data.tags.get(CELL_IDENTITY_TAG) or UNKNOWN_IDENTITY].append(r)

        def seeds(group):  # a re-run of a seed is not one more run
            return len({_seed(r) for r in group})

        best = max(by_identity, key=lambda k: (seeds(by_identity[k]),
                                               max(r.info.start_time or 0 for r in by_identity[k])))
        for ident, group in by_identity.items():
            if ident != best:
                dropped += [_dropped(r, f"cell identity {ident} ({seeds(group)} seed(s)) differs from the kept "
                                        f"{best} ({seeds(by_identity[best])} seed(s)): different configurations "
                                        "are never pooled") for r in group]
        latest = {}
        for r in sorted(by_identity[best], key=lambda x: x.info.start_time or 0):
            seed = _seed(r)
            if seed in latest:
                dropped.append(_dropped(latest[seed], f"same seed {seed} as the newer run {r.info.run_id}: "
                                                      "superseded"))
            latest[seed] = r
        kept += latest.values()
    return kept, dropped, notes


def _seed(r) -> str:
    return r.data.tags.get("seed", r.info.run_id)


def _load(client, experiment_id: str) -> tuple[list[Run], list[dict], list[str]]:
    """The runs select_runs keeps, read into Run objects; the dropped rows; notes."""
    found = search_all(client, experiment_id, "attributes.status = 'FINISHED'")
    chosen, dropped, notes = select_runs(found)
    runs = []
    for r in chosen:
        t = r.data.tags
        es, ev, bad_e = _finite(*_history(client, r.info.run_id, EVAL_KEY))
        ts, tv, bad_t = _finite(*_history(client, r.info.run_id, TRAIN_KEY))
        if bad_e or bad_t:
            what = " and ".join(f"{k} non-finite {key} value(s)" for k, key in ((bad_e, EVAL_KEY), (bad_t, TRAIN_KEY))
                                if k)
            notes.append(f"run {r.info.run_id} ({_label(t)} / {t['env_id']} / seed {t.get('seed', '')}): "
                         f"{what}, treated as missing")
        runs.append(Run(r.info.run_id, _label(t), t["env_id"], t.get("seed", ""), r.info.start_time or 0,
                        t.get("config_hash", ""), es, ev, ts, tv, metric_keys=frozenset(r.data.metrics),
                        warmup_steps=_warmup_steps(t, r.data.params), results_version=_version(t),
                        cell_identity=t.get(CELL_IDENTITY_TAG) or UNKNOWN_IDENTITY,
                        run_identity=t.get(identity.IDENTITY_TAG, "")))
    runs.sort(key=lambda r: (r.env_id, r.algo, _seed_key(r.seed)))
    dropped.sort(key=lambda d: (d["env_id"], d["label"], _seed_key(d["seed"]), d["run_id"]))
    return runs, dropped, notes


def load_runs(client, experiment_id: str) -> tuple[list[Run], list[str]]:
    """The experiment's FINISHED training runs that select_runs pools, and notes on what was left
    out (one line per dropped run, with its reason, then notes on whole cells)."""
    runs, dropped, notes = _load(client, experiment_id)
    return runs, [_dropped_line(d) for d in dropped] + notes


def _dropped_line(d: dict) -> str:
    who = f"{d['label'] or '?'} / {d['env_id'] or '?'} / seed {d['seed'] or '?'}"
    return f"run {d['run_id']} ({who}): {d['reason']}"


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


def comparison_rows(groups: dict[tuple[str, str], list[Run]], metric: str = PAPER_METRIC) -> list[dict]:
    """QVPO against each baseline on each task: Welch t, Mann-Whitney U (exact or exhaustive-
    permutation p at small n: stats.mann_whitney_u), both Holm-adjusted over all comparisons of
    the table, Hedges' g and Welch's t-interval of the difference of means (its coverage at 3-5
    seeds is checked in tests/test_stats.py; the percentile bootstrap's is not near 95 %)."""
    rows = []
    for (algo, env_id), runs in groups.items():
        if algo in (TREATMENT, RANDOM) or (TREATMENT, env_id) not in groups:
            continue
        x = np.array([r.metrics[metric] for r in groups[(TREATMENT, env_id)]])
        y = np.array([r.metrics[metric] for r in runs])
        welch, mwu = stats.welch_t(x, y), stats.mann_whitney_u(x, y)
        diff = stats.welch_mean_difference(x, y)
        nx, ny = stats.summarize(x).n, stats.summarize(y).n
        if stats.enough(x, y):
            note = ""
        elif min(nx, ny) == 0:
            note = f"no usable values ({TREATMENT} {nx}, {algo} {ny}): no test"
        else:
            note = stats.NO_TEST
        rows.append({"task": task_name(env_id), "env_id": env_id, "metric": metric, "algo": TREATMENT,
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
                   unnormalised: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Across tasks: IQM and mean of normalised scores per algorithm (stratified bootstrap
    intervals), and QVPO's probability of improvement over each baseline. Returns the rows and
    the normalised scores {(metric, algo): {task: array}} of the covered tasks (profiles).

    Every row says which tasks it covers (`tasks`, `n_tasks`) and which of task_order it left out
    and why (`left_out`: no runs of the algorithm, no normalisation for the task (the reason from
    `unnormalised`), or no usable value: every run's metric missing or NaN). The IQM pools the
    runs of the covered tasks (rliable: a task weighs as its number of runs); the mean is the
    mean of per-task means (every covered task weighs the same)."""
    rows, scores = [], defaultdict(dict)
    unnormalised = unnormalised or {}
    algos = _order({a for a, _ in groups})
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
    # P(QVPO > baseline) needs no normalisation (U / nm is per task and scale-free): every task
    # both ran with at least 2 usable values
    for metric in AGGREGATE_METRICS:
        for algo in algos:
            if algo in (TREATMENT, RANDOM):
                continue
            common = [t for t in task_order if t in envs[algo] and t in envs[TREATMENT]]
            if not common:
                continue
            x = {t: np.array([r.metrics[metric] for r in groups[(TREATMENT, envs[TREATMENT][t])]]) for t in common}
            y = {t: np.array([r.metrics[metric] for r in groups[(algo, envs[algo][t])]]) for t in common}
            usable = [t for t in common if stats.enough(x[t], y[t])]
            left = []
            for t in task_order:
                if t not in envs[TREATMENT] or t not in envs[algo]:
                    who = " and ".join(a for a in (TREATMENT, algo) if t not in envs[a])
                    left.append(f"{t}: no {who} runs")
                elif t not in usable:
                    nx, ny = stats.summarize(x[t]).n, stats.summarize(y[t]).n
                    left.append(f"{t}: fewer than {stats.MIN_N} usable {metric} values ({TREATMENT} {nx}, {algo} {ny})")
            poi = stats.probability_of_improvement([x[t] for t in usable], [y[t] for t in usable]) \
                if usable else stats.Interval(math.nan, math.nan, math.nan)
            rows.append({"statistic": "prob_improvement", "metric": metric, "algo": TREATMENT, "versus": algo,
                         "value": poi.estimate, "ci_low": poi.low, "ci_high": poi.high,
                         "n_tasks": len(usable), "n_runs": sum(stats.summarize(x[t]).n + stats.summarize(y[t]).n
                                                               for t in usable),
                         "tasks": " ".join(usable), "left_out": "; ".join(left), "note": "",
                         "weighting": "mean of per-task values (tasks weigh equally)"})
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
            steps, rates = _history(client, r.run_id, "perf/steps_per_s")
            if not len(steps):
                continue
            phases = {p: _history(client, r.run_id, f"time/{p}_ms_per_step") for p in PHASES}
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


def compute_markdown(rows: list[dict]) -> str:
    L = ["", "## Compute: wall time per env step by phase, learning phase only", "",
         "From the runs' own `perf/steps_per_s` and `time/<phase>_ms_per_step` metrics (on whatever machine "
         "each run ran: see the runs' `host` and `device` tags). Time-weighted over the learning phase: each "
         "logging window's wall time is its env steps / its logged rate; env steps/s = all env steps after "
         "the warm-up / all wall time after the warm-up, summed over the cell's runs, and a phase's ms per "
         "step = its total time over the same windows / their env steps. Windows ending at or before a run's "
         f"warm-up (tag `{WARMUP_TAG}`, else param `Trainer.warmup_steps`) are left out; a window straddling "
         "its end is kept whole. Wall ms = 1000 / (env steps/s): the phases plus untimed work.", "",
         "| algorithm | task | n | warm-up | " + " | ".join(f"{p} ms" for p in PHASES) +
         " | total ms (phases) | wall ms | env steps/s |",
         "|---|---|---|---|" + "---|" * (len(PHASES) + 3)]
    for r in rows:
        cells = " | ".join(_f(r[f"{p}_ms_per_step"], 3) for p in PHASES)
        n = str(r["n"]) if r["n_timed"] == r["n"] else f"{r['n']} ({r['n_timed']} timed)"
        L.append(f"| {r['algo']} | {task_name(r['env_id'])} | {n} | {r['warmup_steps']} | {cells} | "
                 f"{_f(r['total_ms_per_step'], 3)} | {_f(r['wall_ms_per_step'], 3)} | {_f(r['steps_per_s'], 1)} |")
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


def _interval(est: float, low: float, high: float, digits: int = 1, why: str = "no spread") -> str:
    """'est [low, high]'; a zero-width interval is a point, said so, not a confidence interval."""
    if math.isnan(low) or math.isnan(high):
        return f"{_f(est, digits)} [no interval]"
    text = f"{_f(est, digits)} [{_f(low, digits)}, {_f(high, digits)}]"
    return text + f" (zero width: {why})" if low == high else text


SAME_RESAMPLES = "every resample gave this value"  # a bootstrap interval of zero width


def _coverage(stat: str) -> str:
    c = stats.STRATIFIED_COVERAGE
    return f"{c[(stat, 3)]:.0%} at 3 runs per task and {c[(stat, 5)]:.0%} at 5"


def write_markdown(path: Path, experiment: str, uri: str, runs: list[Run], notes: list[str], cells, comps,
                   agg, normalisers, aggregate_reason: str, paper, figures: list[str],
                   dropped: list[dict] | None = None) -> None:
    tasks = _task_order({c["task"] for c in cells}, paper)
    algos = _order({c["algo"] for c in cells})
    by = {(c["algo"], c["task"]): c for c in cells}
    listed = {k for k in paper}
    dropped = dropped or []
    L = [f"# {experiment}: the paper's Table 1 from MLflow runs", "",
         f"{len(runs)} FINISHED training runs of experiment `{experiment}` ({uri}), "
         f"{time.strftime('%Y-%m-%d %H:%M')}, of results version {identity.RESULTS_VERSION}; "
         f"{len(dropped)} other run(s) left out (listed at the end and in dropped.csv: another results version, "
         "another configuration of the same cell, or a superseded duplicate). Cells are mean (sd over seeds); "
         "n = seeds. Tasks are Gymnasium -v5 (the paper ran Gym -v3 on mujoco-py).", "",
         "## Which return the paper reports", "", METRIC_ARGUMENT, ""]

    def paper_cell(algo, task):
        if (task, algo) not in listed:
            return "—"
        m, s = paper[(task, algo)]
        return "N/A" if math.isnan(m) else f"{_f(m)} ({_f(s)})"

    def ours(c):
        if not c:
            return "—"
        k = c[f"{PAPER_METRIC}_n"]
        if k == 0:
            return f"no usable value ({c['n']} run(s))"
        return f"{_ms(c, PAPER_METRIC)} n={k}" + (f" of {c['n']} runs" if k < c["n"] else "")

    L += ["## Table 1: best evaluation return, ours / paper", "",
          "| algorithm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for algo in algos:
        L.append(f"| {algo} | " + " | ".join(f"{ours(by.get((algo, t)))} / {paper_cell(algo, t)}" for t in tasks)
                 + " |")
    L += ["", "Paper: mean (sd) over 5 seeds at 1M steps; N/A = the paper's \"does not work\"; "
          "— = no runs (ours) or no entry (paper); \"no usable value\" = runs exist but none has a finite "
          f"`{EVAL_KEY}` (never evaluated, or NaN): that cell is in no test and no aggregate.", ""]
    empty = [c for c in cells if c[f"{PAPER_METRIC}_n"] == 0]
    if empty:
        dead = [t for t in tasks if all(by[(a, t)][f"{PAPER_METRIC}_n"] == 0 for a in algos
                                        if (a, t) in by and a != RANDOM)]
        L += [f"**No usable numbers** ({METRICS[PAPER_METRIC]}):", ""] + \
             [f"- {c['algo']} on {c['task']} ({c['env_id']}): {c['note']}" for c in empty] + \
             ([f"- tasks where no algorithm (the random policy aside) has a usable value: {', '.join(dead)}"]
              if dead else []) + [""]

    L += ["## Per task: every candidate metric and sample efficiency", "",
          "Evaluation at 100k/200k/300k = the last evaluation at or before that step (— when the run "
          "is shorter). AUC = trapezoid area under the evaluation curve divided by its span, cut at "
          "the shortest run of the task; normalised like the scores below. — = no run with a value.", ""]
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
            k = c[f"{PAPER_METRIC}_n"]
            n = str(c["n"]) if k == c["n"] else f"{c['n']} ({k} with an evaluation)"
            if 0 < k < stats.MIN_N:
                n += f" ({stats.NO_TEST})"
            L.append(f"| {algo} | {n} | " + " | ".join(vals) + " |")
        L.append("")

    L += [f"## {TREATMENT} against each baseline, per task: best evaluation return", ""]
    if not comps:
        L += [f"No comparisons: no task has both {TREATMENT} runs and baseline runs.", ""]
    else:
        m = sum(1 for c in comps if not math.isnan(c["welch_p"]))
        L += [f"Welch's t-test and the Mann-Whitney U test, two-sided; Holm-adjusted p over all {m} "
              "comparisons of the table (one family per test); Hedges' g (bias-corrected pooled-sd "
              "effect size). Mann-Whitney p is exact up to 8 seeds a side (C(n+m, n) <= "
              f"{stats.MWU_EXACT_MAX:,} splits): scipy's exact null distribution without ties, the exhaustive "
              "permutation distribution (all splits of the pooled runs) with ties; beyond, the tie-corrected "
              "normal approximation (column mwu_method of comparisons.csv). Difference of means with its "
              f"{stats.WELCH_COVERAGE_NOTE}; the percentile bootstrap this table used before covers only "
              "about 77% (3 vs 3) to 84% (5 vs 5) in the same simulation, so it is not used. An interval of "
              "zero width (both samples constant) is a point, not a CI; with no spread at all there is no "
              "t distribution either, so no Welch p.", "",
              f"| task | baseline | n ({TREATMENT}, baseline) | difference [95% CI] | Welch t | p | Holm p "
              "| MWU U | p | Holm p | Hedges g |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in comps:
            n = f"{c['n_algo']}, {c['n_baseline']}"
            if c["note"]:
                L.append(f"| {c['task']} | {c['baseline']} | {n} | {c['note']} |" + " |" * 7)
                continue
            L.append(f"| {c['task']} | {c['baseline']} | {n} | "
                     f"{_interval(c['diff'], c['diff_ci_low'], c['diff_ci_high'])} | {_f(c['welch_t'], 2)} | "
                     f"{_p(c['welch_p'])} | {_p(c['welch_p_holm'])} | {_f(c['mwu_u'], 1)} | {_p(c['mwu_p'])} | "
                     f"{_p(c['mwu_p_holm'])} | {_f(c['hedges_g'], 2)} |")
        floor = [c["mwu_min_p"] for c in comps if not c["note"] and c["mwu_method"] in ("exact", "permutation")]
        if m and floor and min(floor) > 0.05 / m:
            L += ["", f"Note: with these seed counts the exact Mann-Whitney test cannot give p below "
                  f"{min(floor):.2g} (2 / C(n+m, n); ties only raise it), while Holm's first threshold is "
                  f"0.05 / {m} = {0.05 / m:.2g}: no Mann-Whitney comparison can be significant after "
                  "correction, whatever the data. Read the effect sizes and intervals instead."]
        L.append("")

    L += ["## Across tasks (normalised scores, Agarwal et al. 2021, arXiv:2108.13264)", ""]
    if aggregate_reason:
        L += [f"Normalised scores skipped: {aggregate_reason}", ""]
    if normalisers:
        L += ["Normalised score = (return - random) / (reference - random). 0 = the uniformly random policy's "
              f"mean return on the task, measured by this sweep's `{RANDOM}` runs (the mean over those runs of "
              "each run's mean evaluation return). 1 = the paper's best reported return on -v3: the maximum "
              "over algorithms of the paper's Table 1 mean for that task; the paper ran MuJoCo -v3 tasks, we "
              "run -v5 (Hopper-v5 is set against the paper's Hopper, etc.), so 1 is a -v3 figure, not a return "
              "anyone measured on the task we run.", "",
              "**IQM** = mean of the middle 50% of all runs of the covered tasks pooled (25% cut at each end), "
              "as rliable computes it: pooled, so a task weighs in proportion to its number of runs. "
              "**Mean** = the mean over the covered tasks of each task's mean score: every task weighs the "
              "same, whatever its number of runs. Intervals: stratified percentile bootstrap (runs resampled "
              f"within each task, {stats.N_RESAMPLES:,} resamples, seeded), as rliable. They are rough ranges, "
              "not 95% intervals: with 3-5 runs per task their coverage is below the nominal 95% (measured in "
              f"a simulation of 3 tasks with normal scores, tests/test_stats.py: mean {_coverage('mean')}; "
              f"IQM {_coverage('iqm')}).", "",
              "| task | random | reference (paper's best, -v3) |", "|---|---|---|"]
        for t in tasks:
            if t in normalisers:
                L.append(f"| {t} | {_f(normalisers[t][0])} | {_f(normalisers[t][1])} |")
        L += ["", "| algorithm | metric | IQM [95% nominal] | mean [95% nominal] | tasks covered | runs | "
              "left out (why) | note |", "|---|---|---|---|---|---|---|---|"]
        for r in [r for r in agg if r["statistic"] == "iqm"]:
            mean = next(x for x in agg if x["statistic"] == "mean" and x["algo"] == r["algo"]
                        and x["metric"] == r["metric"])
            iqm_ci = _interval(r["value"], r["ci_low"], r["ci_high"], 3, SAME_RESAMPLES)
            mean_ci = _interval(mean["value"], mean["ci_low"], mean["ci_high"], 3, SAME_RESAMPLES)
            L.append(f"| {r['algo']} | {r['metric']} | {iqm_ci} | {mean_ci} | {r['tasks'] or 'none'} | "
                     f"{r['n_runs']} | {r['left_out'] or 'none'} | {r['note']} |")
        sets = {r["tasks"] for r in agg if r["statistic"] == "iqm"}
        if len(sets) > 1:
            L += ["", "Not every algorithm covers the same tasks: compare the aggregates with that in mind."]
        L.append("")
    poi = [r for r in agg if r["statistic"] == "prob_improvement"]
    if poi:
        L += [f"Probability of improvement P({TREATMENT} > baseline): per task the Mann-Whitney U / (n m), "
              "averaged over the tasks both ran with >= 2 usable values, every task weighing the same (needs no "
              "normalisation); 0.5 = no difference; stratified percentile bootstrap interval, 95% nominal, "
              "below nominal at 3-5 runs per task like the intervals above.", "",
              f"| baseline | metric | P({TREATMENT} > baseline) [95% nominal] | tasks covered | left out (why) |",
              "|---|---|---|---|---|"]
        for r in poi:
            v = stats.NO_TEST if math.isnan(r["value"]) else \
                _interval(r["value"], r["ci_low"], r["ci_high"], 3, SAME_RESAMPLES)
            L.append(f"| {r['versus']} | {r['metric']} | {v} | {r['tasks'] or 'none'} | {r['left_out'] or 'none'} |")
        L.append("")

    L += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if dropped or notes:
        L += ["## Runs left out", ""]
        if dropped:
            L += [f"Every FINISHED run not pooled above (also in dropped.csv). Runs are pooled in a cell "
                  f"(label, task) only when of the current results version ({identity.RESULTS_VERSION}) and the "
                  "same configuration up to the seed (tag "
                  f"`{CELL_IDENTITY_TAG}`; runs without it count as version {OLD_VERSION}, identity "
                  f"\"{UNKNOWN_IDENTITY}\"); of several configurations the one with the most seeds is kept (tie: the "
                  "newest).", "",
                  "| run id | label | env | seed | reason |", "|---|---|---|---|---|"]
            L += [f"| {d['run_id']} | {d['label'] or '—'} | {d['env_id'] or '—'} | {d['seed'] or '—'} | "
                  f"{d['reason']} |" for d in dropped]
            L.append("")
        L += [f"- {n}" for n in notes] + ([""] if notes else [])
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


def provenance_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    commits = sorted({r["git_commit"] for r in rows})
    L = ["", "## Provenance", "",
         f"Commit(s): {', '.join(f'`{c}`' for c in commits)}; results version(s): "
         f"{', '.join(sorted({str(r['results_version']) for r in rows}))}; host(s): "
         f"{', '.join(sorted({r['host'] for r in rows}))}; device(s): {', '.join(sorted({r['device'] for r in rows}))}; "
         f"torch {', '.join(sorted({r['torch'] for r in rows}))}. Every run's package list is its artifact "
         "`environment/packages.txt`; its operative config, `config.gin`. Wall time per run (MLflow start to end):", "",
         "| algorithm | task | seed | wall min | resumed at step |", "|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['algo']} | {task_name(r['env_id'])} | {r['seed']} | {_f(r['wall_s'] / 60)} | "
                 f"{r['resumed_at_step'] or '-'} |")
    return "\n".join(L) + "\n"


def build_report(experiment: str, tracking_uri: str, paper_csv: Path | None, out_dir: Path,
                 log_to_mlflow: bool = True) -> Path:
    """Build the report of one experiment into out_dir/<experiment>/ and return that directory.

    Reads the experiment's FINISHED training runs (report runs are skipped), groups them by the
    `algo` (or `variant`) and `env_id` tags, pools in each cell only runs of the current results
    version and one configuration (select_runs), and writes table.md, runs.csv, cells.csv,
    comparisons.csv, aggregate.csv, dropped.csv (every run left out, and why), compute.csv,
    run_ids.txt and the figures. paper_csv (env,algo,mean,std, the paper's Table 1)
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
    runs, dropped, notes = _load(client, exp.experiment_id)
    if not runs:
        why = f" ({len(dropped)} left out: {'; '.join(sorted({d['reason'] for d in dropped}))})" if dropped else ""
        raise ConfigError(f"experiment {experiment!r} has no usable FINISHED training runs tagged algo and "
                          f"env_id{why}")
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
    unnormalised = {}  # task -> why it has no normalised scores
    for t in sorted(tasks - set(normalisers)):
        why = []
        if t not in reference:
            why.append("no paper entry (no 1)" if paper_csv is not None else "no paper table (no 1)")
        if t not in random_scores:
            why.append(f"no `{RANDOM}` runs (no 0)")
        elif math.isnan(random_scores[t]):
            why.append(f"its `{RANDOM}` runs have no usable return (no 0)")
        unnormalised[t] = "not normalised: " + ", ".join(why)
    missing = sorted(unnormalised)
    if missing and paper_csv is not None and random_scores:
        reasons.append("; ".join(f"{t} {unnormalised[t]}" for t in missing))
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
    agg, scores = aggregate_rows(groups, normalisers, task_order, unnormalised)

    _write_csv(report_dir / "runs.csv",
               [{"run_id": r.run_id, "algo": r.algo, "env_id": r.env_id, "seed": r.seed,
                 "results_version": r.results_version, "cell_identity": r.cell_identity,
                 "run_identity": r.run_identity, "warmup_steps": r.warmup_steps,
                 "config_hash": r.config_hash, **r.metrics} for r in runs])
    _write_csv(report_dir / "dropped.csv", dropped, DROPPED_COLUMNS)
    _write_csv(report_dir / "cells.csv", cells)
    _write_csv(report_dir / "comparisons.csv", comps, None if comps else
               ["task", "env_id", "metric", "algo", "baseline", "note"])
    _write_csv(report_dir / "aggregate.csv", agg, None if agg else
               ["statistic", "metric", "algo", "versus", "value", "ci_low", "ci_high", "n_tasks", "n_runs",
                "tasks", "left_out", "note", "weighting"])
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
                   normalisers, aggregate_reason, paper, figures, dropped)
    compute = compute_rows(client, groups)
    _write_csv(report_dir / "compute.csv", compute)
    with open(report_dir / "table.md", "a") as f:
        f.write(compute_markdown(compute))
    gradvar_report(client, runs, report_dir)  # only when runs logged gradvar/* (open_weight_variance)
    provenance = provenance_rows(client, runs)
    _write_csv(report_dir / "provenance.csv", provenance)
    with open(report_dir / "table.md", "a") as f:
        f.write(provenance_markdown(provenance))
    if log_to_mlflow:
        _log(client, exp.experiment_id, report_dir, runs, agg)
    return report_dir

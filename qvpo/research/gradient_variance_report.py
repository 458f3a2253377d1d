"""The report's section on the gradient-variance diagnostic (reproduce/open_weight_variance).

The diagnostic (qvpo.research.gradient_variance) logs gradvar/<weighting>/<metric> in the runs
it is switched on in; this section reads those metrics back from MLflow: per run the mean over its
diagnostics, and per task and over all runs a paired test of each weighting against qadv. It is
found by the report through qvpo.report.sections (SECTION below) and applies only to runs that
logged the metrics. It reads the metrics only: nothing of the agent's code is imported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from qvpo import stats
from qvpo.report.load import Run, history, task_name
from qvpo.report.markdown import fmt, fmt_p
from qvpo.report.plots import plt
from qvpo.report.sections import Section
from qvpo.report.tables import write_csv

PREFIX = "gradvar/"  # the diagnostic's metrics: gradvar/<weighting>/<metric>
METRICS = ("scale_free_var", "loss_var", "ess")
REFERENCE = "qadv"  # the advantage weighting every other weighting is tested against
FILES = ("gradvar_runs.csv", "gradvar.csv", "gradvar.png")


def weightings(run: Run) -> list[str]:
    """The weightings a run logged the diagnostic of."""
    return sorted({k.split("/")[1] for k in run.metric_keys if k.startswith(PREFIX) and k.count("/") == 2})


def run_rows(client, runs: list[Run]) -> list[dict]:
    """One row per (run, weighting) for runs that logged the gradient-variance diagnostic: each
    `gradvar/<weighting>/<metric>` as the run's mean over its logged steps."""
    rows = []
    for r in runs:
        for name in weightings(r):
            row = {"run_id": r.run_id, "algo": r.algo, "env_id": r.env_id, "seed": r.seed, "weighting": name}
            for m in METRICS:
                v = history(client, r.run_id, f"{PREFIX}{name}/{m}")[1]
                row[m] = float(v.mean()) if len(v) else math.nan
                row[f"{m}_n_logged"] = len(v)
            rows.append(row)
    return rows


def order(names) -> list[str]:
    """qadv first, then the other weightings alphabetically."""
    rest = sorted(set(names) - {REFERENCE})
    return ([REFERENCE] if REFERENCE in names else []) + rest


def wilcoxon_rows(runs_rows: list[dict]) -> list[dict]:
    """qadv against each other weighting, paired by run: Wilcoxon signed-rank (two-sided, scipy)
    on log(scale_free_var of the other) - log(that of qadv), per task and over all runs, Holm
    corrected over every test of the section. Logs, because the ratio spans orders of magnitude
    and is positive: a difference of logs is a ratio, comparable across tasks."""
    from scipy import stats as sps

    per_run = defaultdict(dict)
    for r in runs_rows:
        per_run[r["run_id"]][r["weighting"]] = r
    names = order({r["weighting"] for r in runs_rows})
    scopes = sorted({r["env_id"] for r in runs_rows}) + ["all"]
    rows = []
    for scope in scopes:
        for other in names:
            if other == REFERENCE:
                continue
            pairs = [(w[REFERENCE]["scale_free_var"], w[other]["scale_free_var"]) for w in per_run.values()
                     if REFERENCE in w and other in w and (scope == "all" or w[other]["env_id"] == scope)]
            pairs = [(a, b) for a, b in pairs if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)]
            ref = np.array([a for a, _ in pairs])
            oth = np.array([b for _, b in pairs])
            row = {"scope": scope, "reference": REFERENCE, "weighting": other, "n": len(pairs),
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


def plot(runs_rows: list[dict], path: Path) -> None:
    """Box plot of the per-run scale-free gradient variance per weighting (log scale), runs as points."""
    pyplot = plt()
    names = order({r["weighting"] for r in runs_rows})
    envs = sorted({r["env_id"] for r in runs_rows})
    data = [[r["scale_free_var"] for r in runs_rows if r["weighting"] == n and r["scale_free_var"] > 0] for n in names]
    fig, ax = pyplot.subplots(figsize=(1.4 * len(names) + 2, 4))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    for j, env in enumerate(envs):
        for i, n in enumerate(names):
            ys = [r["scale_free_var"] for r in runs_rows if r["weighting"] == n and r["env_id"] == env
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
    pyplot.close(fig)


def markdown(runs_rows: list[dict], tests: list[dict], figure: str) -> str:
    names = order({r["weighting"] for r in runs_rows})
    L = ["", "## Gradient variance by Q-weighting (reproduce/open_weight_variance)", "",
         "From the runs' `gradvar/<weighting>/*` metrics (qvpo.research.gradient_variance): at the same parameters, K "
         "paired minibatch + candidate draws per diagnostic; each run's mean over its diagnostics. "
         "Scale-free variance = tr Cov[g] / |E g|^2 of the policy gradient; ESS = (sum w)^2 / (B sum w^2).", "",
         "| weighting | runs | median scale-free var | median loss var | median ESS |", "|---|---|---|---|---|"]
    for n in names:
        sel = [r for r in runs_rows if r["weighting"] == n]
        med = {m: float(np.nanmedian([r[m] for r in sel])) if sel else math.nan for m in METRICS}
        L.append(f"| {n} | {len(sel)} | {med['scale_free_var']:.4g} | {med['loss_var']:.4g} | {med['ess']:.3f} |")
    L += ["", f"Paired by run: Wilcoxon signed-rank (two-sided) on log(scale-free var) of each weighting minus "
              f"that of `{REFERENCE}`, per task and over all runs; p Holm-corrected over the tests below. "
              "Ratio > 1: the weighting's gradient is noisier than the advantage's.", "",
          "| scope | weighting | n | median ratio vs qadv | frac higher | W | p | p (Holm) | note |",
          "|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        L.append(f"| {task_name(t['scope'])} | {t['weighting']} | {t['n']} | {fmt(t['median_ratio'], 3)} | "
                 f"{fmt(t['frac_weighting_higher'], 2)} | {fmt(t['wilcoxon_w'], 1)} | {fmt_p(t['wilcoxon_p'])} | "
                 f"{fmt_p(t['wilcoxon_p_holm'])} | {t['note']} |")
    L += ["", f"![{figure}]({figure})"]
    return "\n".join(L) + "\n"


class GradientVarianceSection:
    """The report section of runs that logged the gradient-variance diagnostic."""

    name = "gradient variance by Q-weighting"

    def applies(self, runs: list[Run]) -> bool:
        return any(weightings(r) for r in runs)

    def build(self, client, runs: list[Run], report_dir: Path) -> Section:
        """gradvar_runs.csv, gradvar.csv and gradvar.png in report_dir, and the section's markdown."""
        rows = run_rows(client, runs)
        tests = wilcoxon_rows(rows)
        write_csv(report_dir / "gradvar_runs.csv", rows)
        write_csv(report_dir / "gradvar.csv", tests)
        plot(rows, report_dir / "gradvar.png")
        return Section(markdown(rows, tests, "gradvar.png"), list(FILES))


SECTION = GradientVarianceSection()

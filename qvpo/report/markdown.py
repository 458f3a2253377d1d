"""The report's markdown (table.md): the paper's table beside ours, per-task candidates, the
treatment's comparisons, the aggregates, the runs left out, compute and provenance; and the
number formats every section shares (fmt, fmt_p, interval)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from qvpo import identity, stats
from qvpo.report.layout import RANDOM, Layout
from qvpo.report.layout import default as default_layout
from qvpo.report.load import CELL_IDENTITY_TAG, EVAL_KEY, OLD_VERSION, UNKNOWN_IDENTITY, WARMUP_TAG, Run, task_name
from qvpo.report.tables import EFFICIENCY_STEPS, METRICS, PAPER_METRIC, PHASES, task_order

def fmt(x, digits: int = 1) -> str:
    """A number with `digits` decimals; None or NaN: an em dash."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_p(p) -> str:
    """A p-value: 2 significant digits, scientific below 0.001; NaN: an em dash."""
    return "—" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _ms(row, m) -> str:
    """'mean (sd)' of a metric in a cell; one seed: 'mean (n < 2)'."""
    if row[f"{m}_n"] == 0:
        return "—"
    if row[f"{m}_n"] < stats.MIN_N:
        return f"{fmt(row[f'{m}_mean'])} (n < 2)"
    return f"{fmt(row[f'{m}_mean'])} ({fmt(row[f'{m}_std'])})"


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




def _interval(est: float, low: float, high: float, digits: int = 1, why: str = "no spread") -> str:
    """'est [low, high]'; a zero-width interval is a point, said so, not a confidence interval."""
    if math.isnan(low) or math.isnan(high):
        return f"{fmt(est, digits)} [no interval]"
    text = f"{fmt(est, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"
    return text + f" (zero width: {why})" if low == high else text


SAME_RESAMPLES = "every resample gave this value"  # a bootstrap interval of zero width


def _coverage(stat: str) -> str:
    c = stats.STRATIFIED_COVERAGE
    return f"{c[(stat, 3)]:.0%} at 3 runs per task and {c[(stat, 5)]:.0%} at 5"


def layout_lines(layout: Layout, labels) -> list[str]:
    """The paragraph that names the columns in their order, the treatment, and where both came from."""
    text = (f"Columns: {', '.join(layout.order(labels))}; the treatment, compared with every other column (the "
            f"random policy aside): **{layout.treatment}**. Order and treatment {layout.source}.")
    unplaced = layout.unplaced(labels) if layout.recorded else []
    if unplaced:
        text += f" Labels that order does not name, after it alphabetically: {', '.join(unplaced)}."
    if layout.treatment not in set(labels):
        text += f" No run is labelled {layout.treatment}: nothing is compared."
    return [text, ""]


def write_markdown(path: Path, experiment: str, uri: str, runs: list[Run], notes: list[str], cells, comps,
                   agg, normalisers, aggregate_reason: str, paper, figures: list[str],
                   dropped: list[dict] | None = None, layout: Layout | None = None) -> None:
    """table.md up to its figures and the runs left out; the other sections are appended after it.
    layout: the report's columns and treatment (default: the layout of untagged experiments)."""
    layout = layout or default_layout()
    treatment = layout.treatment
    tasks = task_order({c["task"] for c in cells}, paper)
    algos = layout.order({c["algo"] for c in cells})
    by = {(c["algo"], c["task"]): c for c in cells}
    listed = {k for k in paper}
    dropped = dropped or []
    L = [f"# {experiment}: the paper's Table 1 from MLflow runs", "",
         f"{len(runs)} FINISHED training runs of experiment `{experiment}` ({uri}), "
         f"{time.strftime('%Y-%m-%d %H:%M')}, of results version {identity.RESULTS_VERSION}; "
         f"{len(dropped)} other run(s) left out (listed at the end and in dropped.csv: another results version, "
         "another configuration of the same cell, or a superseded duplicate). Cells are mean (sd over seeds); "
         "n = seeds. Tasks are Gymnasium -v5 (the paper ran Gym -v3 on mujoco-py).", "",
         *layout_lines(layout, {c["algo"] for c in cells}),
         "## Which return the paper reports", "", METRIC_ARGUMENT, ""]

    def paper_cell(algo, task):
        if (task, algo) not in listed:
            return "—"
        m, s = paper[(task, algo)]
        return "N/A" if math.isnan(m) else f"{fmt(m)} ({fmt(s)})"

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
                    (fmt(c[f"{m}_mean"], 2) + (f" ({fmt(c[f'{m}_std'], 2)})" if c[f"{m}_n"] >= 2 else ""))
                    for m in cols]
            vals.insert(1, paper_cell(algo, t))
            k = c[f"{PAPER_METRIC}_n"]
            n = str(c["n"]) if k == c["n"] else f"{c['n']} ({k} with an evaluation)"
            if 0 < k < stats.MIN_N:
                n += f" ({stats.NO_TEST})"
            L.append(f"| {algo} | {n} | " + " | ".join(vals) + " |")
        L.append("")

    L += [f"## {treatment} against each baseline, per task: best evaluation return", ""]
    if not comps:
        L += [f"No comparisons: no task has both {treatment} runs and baseline runs.", ""]
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
              f"| task | baseline | n ({treatment}, baseline) | difference [95% CI] | Welch t | p | Holm p "
              "| MWU U | p | Holm p | Hedges g |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in comps:
            n = f"{c['n_algo']}, {c['n_baseline']}"
            if c["note"]:
                L.append(f"| {c['task']} | {c['baseline']} | {n} | {c['note']} |" + " |" * 7)
                continue
            L.append(f"| {c['task']} | {c['baseline']} | {n} | "
                     f"{_interval(c['diff'], c['diff_ci_low'], c['diff_ci_high'])} | {fmt(c['welch_t'], 2)} | "
                     f"{fmt_p(c['welch_p'])} | {fmt_p(c['welch_p_holm'])} | {fmt(c['mwu_u'], 1)} | {fmt_p(c['mwu_p'])} | "
                     f"{fmt_p(c['mwu_p_holm'])} | {fmt(c['hedges_g'], 2)} |")
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
                L.append(f"| {t} | {fmt(normalisers[t][0])} | {fmt(normalisers[t][1])} |")
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
        L += [f"Probability of improvement P({treatment} > baseline): per task the Mann-Whitney U / (n m), "
              "averaged over the tasks both ran with >= 2 usable values, every task weighing the same (needs no "
              "normalisation); 0.5 = no difference; stratified percentile bootstrap interval, 95% nominal, "
              "below nominal at 3-5 runs per task like the intervals above.", "",
              f"| baseline | metric | P({treatment} > baseline) [95% nominal] | tasks covered | left out (why) |",
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
        cells = " | ".join(fmt(r[f"{p}_ms_per_step"], 3) for p in PHASES)
        n = str(r["n"]) if r["n_timed"] == r["n"] else f"{r['n']} ({r['n_timed']} timed)"
        L.append(f"| {r['algo']} | {task_name(r['env_id'])} | {n} | {r['warmup_steps']} | {cells} | "
                 f"{fmt(r['total_ms_per_step'], 3)} | {fmt(r['wall_ms_per_step'], 3)} | {fmt(r['steps_per_s'], 1)} |")
    return "\n".join(L) + "\n"


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
        L.append(f"| {r['algo']} | {task_name(r['env_id'])} | {r['seed']} | {fmt(r['wall_s'] / 60)} | "
                 f"{r['resumed_at_step'] or '-'} |")
    return "\n".join(L) + "\n"

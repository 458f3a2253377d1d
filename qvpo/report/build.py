"""build_report: one experiment's runs -> the report's files (and, optionally, a report run)."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

from qvpo.errors import ConfigError
from qvpo.report import layout as layouts
from qvpo.report.load import DROPPED_COLUMNS, REPORT_TAG, Run, load, read_paper, task_name
from qvpo.report.markdown import compute_markdown, provenance_markdown, write_markdown
from qvpo.report.plots import plot_aggregate, plot_learning_curves, plot_profiles
from qvpo.report.sections import build_sections
from qvpo.report.tables import (PAPER_METRIC, aggregate_rows, cell_rows, comparison_rows, compute_rows,
                                normalisation, provenance_rows, score_runs, task_order, write_csv)

MAX_TAG_CHARS = 5000  # MLflow caps a tag value at 8000 characters


def build_report(experiment: str, tracking_uri: str, paper_csv: Path | None, out_dir: Path,
                 log_to_mlflow: bool = True, spec: str | None = None) -> Path:
    """Build the report of one experiment into out_dir/<experiment>/ and return that directory.

    Reads the experiment's FINISHED training runs (report runs are skipped), groups them by the
    `algo` (or `variant`) and `env_id` tags, pools in each cell only runs of the current results
    version and one configuration (select_runs), and writes table.md, runs.csv, cells.csv,
    comparisons.csv, aggregate.csv, dropped.csv (every run left out, and why), compute.csv,
    run_ids.txt and the figures. paper_csv (env,algo,mean,std, the paper's Table 1)
    gives the paper's column and the normalisation's 1; without it, or without `Random` runs of a
    task, the normalised aggregates skip that task and say why. log_to_mlflow: also log the report
    as a run named `report` (tag qvpo.report = 1) with the files as artifacts.

    The columns' order and the treatment every other column is compared with come from `spec`
    (a sweep spec: path or shipped name) if given, else from the experiment's tags that its sweep
    recorded, else the defaults (qvpo.report.layout); table.md says which. Sections of open
    questions (qvpo.report.sections) add their files and a section of table.md when the runs
    logged their metrics (e.g. the gradient-variance diagnostic's `gradvar/*`: gradvar.csv,
    gradvar_runs.csv, gradvar.png).
    Raises ConfigError when the experiment does not exist or has no usable runs, or the spec is bad.
    """
    from mlflow.tracking import MlflowClient

    spec_layout = layouts.from_spec(spec, experiment) if spec else None  # bad input stops here, first
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {tracking_uri!r}")
    layout = layouts.resolve(exp.tags, spec_layout)
    runs, dropped, notes = load(client, exp.experiment_id)
    if not runs:
        why = f" ({len(dropped)} left out: {'; '.join(sorted({d['reason'] for d in dropped}))})" if dropped else ""
        raise ConfigError(f"experiment {experiment!r} has no usable FINISHED training runs tagged algo and "
                          f"env_id{why}")
    paper = read_paper(paper_csv)

    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.algo, r.env_id)].append(r)
    groups = dict(groups)
    norm = normalisation(groups, paper, paper_csv is not None)
    score_runs(groups, norm.normalisers)

    report_dir = Path(out_dir) / experiment
    report_dir.mkdir(parents=True, exist_ok=True)
    order = {a: i for i, a in enumerate(layout.order({a for a, _ in groups}))}
    tasks = task_order({task_name(e) for _, e in groups}, paper)
    task_rank = {t: i for i, t in enumerate(tasks)}
    groups = dict(sorted(groups.items(), key=lambda kv: (task_rank[task_name(kv[0][1])], order[kv[0][0]])))

    cells = cell_rows(groups, paper)
    comps = comparison_rows(groups, layout.treatment)
    agg, scores = aggregate_rows(groups, norm.normalisers, tasks, norm.unnormalised, layout)

    write_csv(report_dir / "runs.csv",
              [{"run_id": r.run_id, "algo": r.algo, "env_id": r.env_id, "seed": r.seed,
                "results_version": r.results_version, "cell_identity": r.cell_identity,
                "run_identity": r.run_identity, "warmup_steps": r.warmup_steps,
                "config_hash": r.config_hash, **r.metrics} for r in runs])
    write_csv(report_dir / "dropped.csv", dropped, DROPPED_COLUMNS)
    write_csv(report_dir / "cells.csv", cells)
    write_csv(report_dir / "comparisons.csv", comps, None if comps else
              ["task", "env_id", "metric", "algo", "baseline", "note"])
    write_csv(report_dir / "aggregate.csv", agg, None if agg else
              ["statistic", "metric", "algo", "versus", "value", "ci_low", "ci_high", "n_tasks", "n_runs",
               "tasks", "left_out", "note", "weighting"])
    (report_dir / "run_ids.txt").write_text("\n".join(r.run_id for r in runs) + "\n")

    figures = []
    for t in tasks:
        name = f"curves_{t.replace('/', '_')}.png"  # dm_control/<task>: one file, no folder
        plot_learning_curves(groups, norm.random_scores, report_dir / name, t, layout)
        figures.append(name)
    if scores:
        plot_aggregate(agg, report_dir / "aggregate_iqm.png", layout)
        plot_profiles(scores, report_dir / "performance_profile.png", layout)
        figures += ["aggregate_iqm.png", "performance_profile.png"]
    write_markdown(report_dir / "table.md", experiment, tracking_uri, runs, notes, cells, comps, agg,
                   norm.normalisers, norm.reason, paper, figures, dropped, layout)
    compute = compute_rows(client, groups)
    write_csv(report_dir / "compute.csv", compute)
    with open(report_dir / "table.md", "a") as f:
        f.write(compute_markdown(compute))
    for _, section in build_sections(client, runs, report_dir):  # open questions' sections, when they apply
        with open(report_dir / "table.md", "a") as f:
            f.write(section.markdown)
    provenance = provenance_rows(client, runs)
    write_csv(report_dir / "provenance.csv", provenance)
    with open(report_dir / "table.md", "a") as f:
        f.write(provenance_markdown(provenance))
    if log_to_mlflow:
        _log(client, exp.experiment_id, report_dir, runs, agg)
    return report_dir


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

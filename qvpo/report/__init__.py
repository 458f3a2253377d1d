"""The paper's Table 1 rebuilt from MLflow runs, with the statistics to read it by.

`build_report` reads the FINISHED training runs of one experiment, one run per
(algorithm, task, seed) tagged `algo`, `env_id`, `seed`; computes every candidate for the
paper's unstated metric per run, summarises cells, tests the treatment against each other column
per task, aggregates across tasks on normalised scores (rliable style), draws the figures and
writes table.md, runs.csv, cells.csv, comparisons.csv, aggregate.csv, dropped.csv and PNGs into
out_dir/<experiment>/; optionally the lot is logged back as a `report` run (tag qvpo.report = 1)
that later reports skip. The maths lives in qvpo.stats. The modules, one job each:

  layout    the columns' order and the treatment: from the sweep spec (--spec), else the tags its
            sweep recorded in the experiment, else the defaults (QVPO; the paper's order)
  load      reading runs from MLflow: which are pooled (results version, cell identity), which
            are dropped and why; the paper's table
  tables    per-run metrics, cell / comparison / aggregate / compute / provenance rows, CSV files
  markdown  table.md and the number formats
  plots     the figures
  sections  the registry of open questions' sections, kept beside their mechanisms
            (qvpo/research/*_report.py), added when the runs logged their metrics
  build     build_report, which runs the lot, and the report run it logs

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

from qvpo.report.build import build_report
from qvpo.report.layout import (COLUMNS_TAG, DEFAULT_TREATMENT, LAYOUT_SWEEP_TAG, PAPER_ORDER, RANDOM,
                                TREATMENT_TAG, Layout)
from qvpo.report.load import (CELL_IDENTITY_TAG, EVAL_KEY, OLD_VERSION, REPORT_TAG, TRAIN_KEY, UNKNOWN_IDENTITY,
                              WARMUP_TAG, Run, load_runs, read_paper, select_runs, task_name)
from qvpo.report.markdown import compute_markdown, provenance_markdown, write_markdown
from qvpo.report.plots import plot_aggregate, plot_learning_curves, plot_profiles
from qvpo.report.sections import PROVIDERS, Section, register
from qvpo.report.tables import (AGGREGATE_METRICS, METRICS, PAPER_METRIC, PHASES, aggregate_rows, cell_rows,
                                comparison_rows, compute_rows, learning_time, learning_windows,
                                provenance_rows, run_metrics)

__all__ = [
    "build_report", "Layout", "COLUMNS_TAG", "TREATMENT_TAG", "LAYOUT_SWEEP_TAG", "DEFAULT_TREATMENT",
    "PAPER_ORDER", "RANDOM", "CELL_IDENTITY_TAG", "EVAL_KEY", "OLD_VERSION", "REPORT_TAG", "TRAIN_KEY",
    "UNKNOWN_IDENTITY", "WARMUP_TAG", "Run", "load_runs", "read_paper", "select_runs", "task_name",
    "compute_markdown", "provenance_markdown", "write_markdown", "plot_aggregate", "plot_learning_curves",
    "plot_profiles", "PROVIDERS", "Section", "register", "AGGREGATE_METRICS", "METRICS", "PAPER_METRIC",
    "PHASES", "aggregate_rows", "cell_rows", "comparison_rows", "compute_rows", "learning_time",
    "learning_windows", "provenance_rows", "run_metrics",
]

"""The report's section on the best-of-Nd selection's Q gain against the action dimension
(open question 2, reproduce/open_scaling).

QVPO's policy step trains on the best of Nd candidates per state, weighted by qadv: the chosen
candidate's Q minus the mean Q of the state's candidates (docs/paper-notes.md, the weight
transforms: wadx2019/qvpo@40a1974 agent/q_transform.py L43-L50). So with the default weight (`QVPO.q_weight = @QAdv()`, `train_selection = 'best'`)
the logged `qweight/mean` is exactly the selection's gain, mean over states of
max_j Q(s, a_j) - mean_j Q(s, a_j), and `q/candidates_std` is the spread of the candidates' Q
(mean over states of the sd over j). Their ratio is the gain in units of the spread: for
independent normal Q values it is E[max of Nd standard normals] (1.03 for Nd = 4, 1.77 for 16,
2.34 for 64, 2.83 for 256) whatever |A| is, so a ratio well below that says the candidates' Q
values are not independent normal draws. The gain
relative to |Q| (q/mean, the critic's value of replayed actions) says how much the selection
moves the policy's target compared with the values themselves; this is the number that would fall
if best-of-Nd stopped being useful as |A| grows.

Per run: each metric's mean over the second half of its logged updates (after the critic has
had half the run to fit); per (task, column): the mean over seeds with a Student-t 95% interval.
Runs with another weight or selection rule are left out (their qweight/mean is not the gain).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from qvpo import stats
from qvpo.report.load import history, task_name
from qvpo.report.markdown import fmt
from qvpo.report.sections import Section
from qvpo.report.tables import write_csv

GAIN, SPREAD, VALUE = "qweight/mean", "q/candidates_std", "q/mean"
FILE = "selection_gain.csv"


def _second_half_mean(client, run_id: str, key: str) -> float:
    steps, values = history(client, run_id, key)
    values = values[np.isfinite(values)]
    return float(values[len(values) // 2:].mean()) if len(values) else math.nan


def _action_dim(env_id: str) -> int | None:
    """|A| of the task (building it; None where its family's extra is not installed here)."""
    from qvpo.envs import env_dims, make_env

    try:
        env = make_env(env_id, seed=0)
    except Exception:  # a task this machine cannot build leaves its |A| unknown, not the report
        return None
    try:
        return env_dims(env)[1]
    finally:
        env.close()


def run_rows(client, runs) -> list[dict]:
    """One row per run with the default weight and selection: its second-half means."""
    rows = []
    for r in runs:
        if not {GAIN, SPREAD, VALUE} <= r.metric_keys:
            continue
        params = client.get_run(r.run_id).data.params
        if params.get("QVPO.q_weight") != "@QAdv()" or params.get("QVPO.train_selection") != "'best'":
            continue
        gain, spread, value = (_second_half_mean(client, r.run_id, k) for k in (GAIN, SPREAD, VALUE))
        rows.append({"label": r.algo, "env_id": r.env_id, "seed": r.seed, "Nd": params.get("QVPO.train_candidates"),
                     "gain": gain, "spread": spread, "q_mean": value,
                     "gain_per_spread": gain / spread if spread > 0 else math.nan,
                     "gain_per_abs_q": gain / abs(value) if value else math.nan})
    return rows


def _cell(values) -> str:
    s = stats.summarize(values)
    if math.isnan(s.ci_low):
        return f"{fmt(s.mean, 3)} (n = {s.n})"
    return f"{fmt(s.mean, 3)} [{fmt(s.ci_low, 3)}, {fmt(s.ci_high, 3)}]"


class _SelectionGainSection:
    name = "best-of-Nd selection gain"

    def applies(self, runs) -> bool:
        return any({GAIN, SPREAD, VALUE} <= r.metric_keys for r in runs)

    def build(self, client, runs, report_dir) -> Section:
        rows = run_rows(client, runs)
        dims = {env: _action_dim(env) for env in {r["env_id"] for r in rows}}
        for r in rows:
            r["action_dim"] = dims[r["env_id"]]
        write_csv(Path(report_dir) / FILE, rows)
        cells = defaultdict(list)
        for r in rows:
            cells[(r["env_id"], r["label"], r["Nd"])].append(r)
        order = sorted(cells, key=lambda c: (dims[c[0]] if dims[c[0]] is not None else math.inf, c[0], c[1]))
        lines = ["## Best-of-Nd selection gain against the action dimension", "",
                 "QVPO's policy step trains on the best of Nd candidates per state; with the qadv weight the "
                 f"logged `{GAIN}` is that candidate's Q gain over the mean of the state's candidates, and "
                 f"`{SPREAD}` their Q spread (qvpo/research/selection_gain_report.py says why these are the "
                 "numbers). Per run the mean over the second half of its updates; per cell the mean over "
                 "seeds [Student-t 95% CI]. Runs with another weight or selection rule are left out. Every "
                 f"run's numbers: `{FILE}`.", "",
                 "| task | A | column | Nd | gain | gain / spread | gain / abs(Q) | seeds |",
                 "|---|---|---|---|---|---|---|---|"]
        for env, label, nd in order:
            c = cells[(env, label, nd)]
            lines.append(f"| {task_name(env)} | {dims[env] if dims[env] is not None else '?'} | {label} | {nd} | "
                         f"{_cell([r['gain'] for r in c])} | {_cell([r['gain_per_spread'] for r in c])} | "
                         f"{_cell([r['gain_per_abs_q'] for r in c])} | {len(c)} |")
        if not rows:
            lines.append("| (no run with the qadv weight and best-candidate selection) | | | | | | | |")
        return Section("\n".join(lines + [""]), [FILE])


SECTION = _SelectionGainSection()

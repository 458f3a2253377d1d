"""Reading an experiment's runs from MLflow: which runs are pooled, which are dropped and why.

What is pooled (select_runs): a cell is (algorithm or variant label, env_id). Its runs are pooled
only when they computed the same thing: same results version (tag qvpo.results_version) and
same configuration up to the seed (tag qvpo.cell_identity; the run identity qvpo.run_identity
includes the seed, so it cannot be compared across seeds). Runs of another results version are
dropped; of the current version's configurations the one with the most seeds is kept (tie: the
newest); every dropped run is named in table.md and dropped.csv. Runs without these tags (older
than run identities) count as results version 1, cell identity "unknown".
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvpo import identity
from qvpo.errors import ConfigError
from qvpo.tracking import search_all

EVAL_KEY = "eval/return_mean"
TRAIN_KEY = "train/episode_return"
REPORT_TAG = "qvpo.report"
# the hash of a run's config without its seed: what runs of one cell must share to be pooled
CELL_IDENTITY_TAG = getattr(identity, "CELL_TAG", "qvpo.cell_identity")  # identity.CELL_TAG
UNKNOWN_IDENTITY = "unknown"  # runs older than the identity tags
OLD_VERSION = 1  # the results version of a run without the tag (identity.RESULTS_VERSION's history)
WARMUP_TAG = "qvpo.warmup_steps"  # env steps of random warm-up the run took (tables.compute_rows)
DROPPED_COLUMNS = ["run_id", "label", "env_id", "seed", "results_version", "cell_identity", "reason"]


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


def history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
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
    return {"run_id": r.info.run_id, "label": label(t) if "algo" in t else t.get("variant", ""),
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
        cells[(label(tags), tags["env_id"])].append(r)
    current = identity.RESULTS_VERSION
    for (name, env_id), rs in cells.items():
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
            notes.append(f"{name} / {env_id}: no run of the current results version {current} "
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


def load(client, experiment_id: str) -> tuple[list[Run], list[dict], list[str]]:
    """The runs select_runs keeps, read into Run objects; the dropped rows; notes."""
    found = search_all(client, experiment_id, "attributes.status = 'FINISHED'")
    chosen, dropped, notes = select_runs(found)
    runs = []
    for r in chosen:
        t = r.data.tags
        es, ev, bad_e = _finite(*history(client, r.info.run_id, EVAL_KEY))
        ts, tv, bad_t = _finite(*history(client, r.info.run_id, TRAIN_KEY))
        if bad_e or bad_t:
            what = " and ".join(f"{k} non-finite {key} value(s)" for k, key in ((bad_e, EVAL_KEY), (bad_t, TRAIN_KEY))
                                if k)
            notes.append(f"run {r.info.run_id} ({label(t)} / {t['env_id']} / seed {t.get('seed', '')}): "
                         f"{what}, treated as missing")
        runs.append(Run(r.info.run_id, label(t), t["env_id"], t.get("seed", ""), r.info.start_time or 0,
                        t.get("config_hash", ""), es, ev, ts, tv, metric_keys=frozenset(r.data.metrics),
                        warmup_steps=_warmup_steps(t, r.data.params), results_version=_version(t),
                        cell_identity=t.get(CELL_IDENTITY_TAG) or UNKNOWN_IDENTITY,
                        run_identity=t.get(identity.IDENTITY_TAG, "")))
    runs.sort(key=lambda r: (r.env_id, r.algo, seed_key(r.seed)))
    dropped.sort(key=lambda d: (d["env_id"], d["label"], seed_key(d["seed"]), d["run_id"]))
    return runs, dropped, notes


def load_runs(client, experiment_id: str) -> tuple[list[Run], list[str]]:
    """The experiment's FINISHED training runs that select_runs pools, and notes on what was left
    out (one line per dropped run, with its reason, then notes on whole cells)."""
    runs, dropped, notes = load(client, experiment_id)
    return runs, [_dropped_line(d) for d in dropped] + notes


def _dropped_line(d: dict) -> str:
    who = f"{d['label'] or '?'} / {d['env_id'] or '?'} / seed {d['seed'] or '?'}"
    return f"run {d['run_id']} ({who}): {d['reason']}"


def label(tags: dict) -> str:
    """The group a run belongs to: its sweep variant (ablations: e.g. 'Kb1-Kt1'), else its algorithm."""
    return tags.get("variant") or tags["algo"]


def seed_key(seed: str):
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

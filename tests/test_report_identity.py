"""qvpo.report on a fake MLflow store: what it pools (run identities, results versions), what it
says about tasks without numbers, and its time-weighted compute figures."""

import csv
import math

import numpy as np
import pytest

from qvpo.errors import ConfigError
from qvpo.identity import IDENTITY_TAG, RESULTS_VERSION, VERSION_TAG
from qvpo.report import CELL_IDENTITY_TAG, WARMUP_TAG, build_report, learning_time, learning_windows

PAPER = "env,algo,mean,std\nHopper,QVPO,1000.0,10.0\nHopper,SAC,800.0,10.0\nAnt,QVPO,2000.0,10.0\n"
T0 = 1_700_000_000_000  # start times (ms), so that "newest" is known

# perf/steps_per_s and time/<phase>_ms_per_step by step, for two QVPO Hopper runs (see test_compute)
HISTORY = {
    0: {"perf/steps_per_s": {5: 1000.0, 10: 1000.0, 15: 10.0, 20: 5.0, 30: 10.0},  # warm-up 10 (param)
        "time/env_ms_per_step": {5: 1.0, 10: 1.0, 15: 2.0, 20: 2.0, 30: 2.0},
        "time/critic_ms_per_step": {15: 50.0, 20: 100.0, 30: 40.0},
        "time/eval_ms_per_step": {30: 30.0}},
    1: {"perf/steps_per_s": {10: 500.0, 25: 15.0, 30: 2.5},  # warm-up 20 (tag): 10-25 straddles it
        "time/critic_ms_per_step": {25: 60.0, 30: 80.0}},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ident")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("ident", artifact_location=(tmp / "artifacts").as_uri())
    ids, clock = {}, iter(range(T0, T0 + 10**6, 1000))

    def run(name, algo, env, seed, evals=(), version=RESULTS_VERSION, cell="cfg", tags=None, params=None,
            metrics=None):
        t = {"algo": algo, "env_id": env, "seed": str(seed), **(tags or {})}
        if version is not None:
            t[VERSION_TAG] = str(version)
            t[CELL_IDENTITY_TAG] = cell
            t[IDENTITY_TAG] = f"{cell}-{seed}"
        r = client.create_run(exp, start_time=next(clock), tags=t)
        ms = [Metric("eval/return_mean", v, 0, 10 * (i + 1)) for i, v in enumerate(evals)]
        ms += [Metric(k, v, 0, s) for k, h in (metrics or {}).items() for s, v in h.items()]
        ms.append(Metric("train/episode_return", 1.0, 0, 5))
        client.log_batch(r.info.run_id, metrics=ms, params=[Param(k, v) for k, v in (params or {}).items()])
        client.set_terminated(r.info.run_id, "FINISHED")
        ids[name] = r.info.run_id

    # QVPO / Hopper: an older re-run of seed 0 (superseded), the kept configuration "cfg" (3 seeds),
    # a second configuration "other" (1 run) and an old-version run (no tags): both must not be pooled
    run("qvpo-0-old", "QVPO", "Hopper-v5", 0, [5e5])
    run("qvpo-0", "QVPO", "Hopper-v5", 0, [100.0, 110.0], params={"Trainer.warmup_steps": "10"},
        metrics=HISTORY[0])
    run("qvpo-1", "QVPO", "Hopper-v5", 1, [120.0], tags={WARMUP_TAG: "20"},
        params={"Trainer.warmup_steps": "999"}, metrics=HISTORY[1])
    run("qvpo-2", "QVPO", "Hopper-v5", 2, [130.0])
    run("qvpo-other", "QVPO", "Hopper-v5", 3, [1e6], cell="other")
    run("qvpo-v1", "QVPO", "Hopper-v5", 4, [1e6], version=None)
    run("qvpo-v1-tagged", "QVPO", "Hopper-v5", 5, [1e6], version=1)
    # SAC / Hopper: two configurations of 2 runs each: the newer ("y") is kept
    run("sac-x0", "SAC", "Hopper-v5", 0, [1e6], cell="x")
    run("sac-x1", "SAC", "Hopper-v5", 1, [1e6], cell="x")
    run("sac-y0", "SAC", "Hopper-v5", 0, [60.0], cell="y")
    run("sac-y1", "SAC", "Hopper-v5", 1, [70.0], cell="y")
    # TD3 / Hopper: old-version runs only: the cell is left out, and says so
    run("td3-0", "TD3", "Hopper-v5", 0, [50.0], version=None)
    run("td3-1", "TD3", "Hopper-v5", 1, [55.0], version=None)
    # Ant: QVPO's evaluations are NaN, SAC never evaluated: no usable numbers on this task
    run("qvpo-ant-0", "QVPO", "Ant-v5", 0, [math.nan, math.nan])
    run("qvpo-ant-1", "QVPO", "Ant-v5", 1, [math.nan])
    run("sac-ant-0", "SAC", "Ant-v5", 0)
    run("sac-ant-1", "SAC", "Ant-v5", 1)
    for env in ("Hopper-v5", "Ant-v5"):
        run(f"random-{env}", "Random", env, 0, [0.0, 0.0])
    paper = tmp / "paper.csv"
    paper.write_text(PAPER)
    out = build_report("ident", uri, paper, tmp / "reports", log_to_mlflow=False)
    return dict(out=out, ids=ids, uri=uri, tmp=tmp, client=client, exp=exp)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_identities_and_versions_are_never_pooled_and_every_dropped_run_is_named(store):
    ids, out = store["ids"], store["out"]
    cells = {(r["algo"], r["env_id"]): r for r in rows(out / "cells.csv")}
    q = cells[("QVPO", "Hopper-v5")]
    assert int(q["n"]) == 3 and q["seeds"] == "0 1 2" and q["cell_identity"] == "cfg"
    assert float(q["best_eval_mean"]) == pytest.approx(120.0)  # 110, 120, 130: no 1e6 pooled in
    s = cells[("SAC", "Hopper-v5")]
    assert s["cell_identity"] == "y" and float(s["best_eval_mean"]) == pytest.approx(65.0)  # tie: newest
    assert ("TD3", "Hopper-v5") not in cells

    dropped = {r["run_id"]: r for r in rows(out / "dropped.csv")}
    assert list(rows(out / "dropped.csv")[0]) == ["run_id", "label", "env_id", "seed", "results_version",
                                                  "cell_identity", "reason"]
    expect = {"qvpo-0-old": "superseded",
              "qvpo-other": "cell identity other (1 seed(s)) differs from the kept cfg (3 seed(s))",
              "qvpo-v1": "results version 1, not the current", "qvpo-v1-tagged": "results version 1",
              "sac-x0": "cell identity x", "sac-x1": "cell identity x", "td3-0": "results version 1",
              "td3-1": "results version 1"}
    assert set(dropped) == {ids[k] for k in expect}
    for name, reason in expect.items():
        d = dropped[ids[name]]
        assert reason in d["reason"], (name, d)
    other = dropped[ids["qvpo-other"]]
    assert (other["label"], other["env_id"], other["seed"]) == ("QVPO", "Hopper-v5", "3")

    md = (out / "table.md").read_text()
    section = md[md.index("## Runs left out"):]
    for name in expect:
        assert ids[name] in section
    assert f"| {ids['qvpo-other']} | QVPO | Hopper-v5 | 3 | cell identity other" in section
    assert f"TD3 / Hopper-v5: no run of the current results version {RESULTS_VERSION}" in section
    runs = rows(out / "runs.csv")
    assert {r["run_id"] for r in runs}.isdisjoint(dropped)
    assert {r["results_version"] for r in runs} == {str(RESULTS_VERSION)}


def test_a_task_without_usable_numbers_is_named_everywhere(store):
    out = store["out"]
    cells = {(r["algo"], r["env_id"]): r for r in rows(out / "cells.csv")}
    for algo in ("QVPO", "SAC"):
        c = cells[(algo, "Ant-v5")]
        assert int(c["n"]) == 2 and int(c["best_eval_n"]) == 0 and c["note"].startswith("no usable value")
    md = (out / "table.md").read_text()
    assert "no usable value (2 run(s))" in md  # Table 1's Ant cells
    assert "**No usable numbers**" in md
    assert "tasks where no algorithm (the random policy aside) has a usable value: Ant" in md
    assert any("2 non-finite eval/return_mean value(s), treated as missing" in line for line in md.splitlines())

    agg = rows(out / "aggregate.csv")
    for stat in ("iqm", "mean"):
        r = next(r for r in agg if r["statistic"] == stat and r["algo"] == "QVPO" and r["metric"] == "best_eval")
        assert r["tasks"] == "Hopper" and r["n_tasks"] == "1" and r["n_runs"] == "3"
        assert r["left_out"] == "Ant: no usable best_eval (all 2 run(s) missing or NaN)"
    sac = next(r for r in agg if r["statistic"] == "mean" and r["algo"] == "SAC" and r["metric"] == "best_eval")
    assert sac["tasks"] == "Hopper" and sac["left_out"] == "Ant: no usable best_eval (all 2 run(s) missing or NaN)"
    assert float(sac["value"]) == pytest.approx(np.mean([60.0, 70.0]) / 1000.0)  # Hopper only; 1 = paper best
    poi = next(r for r in agg if r["statistic"] == "prob_improvement" and r["metric"] == "best_eval")
    assert poi["tasks"] == "Hopper" and "Ant: fewer than 2 usable best_eval values (QVPO 0, SAC 0)" in poi["left_out"]
    assert "| QVPO | best_eval |" in md and "Ant: no usable best_eval (all 2 run(s) missing or NaN)" in md
    comps = {r["env_id"]: r for r in rows(out / "comparisons.csv")}
    assert comps["Ant-v5"]["note"] == "no usable values (QVPO 0, SAC 0): no test"


def test_learning_windows_by_hand():
    lengths, keep = learning_windows([5, 10, 15, 20, 30], warmup_steps=10)
    assert list(lengths) == [5, 5, 5, 5, 10] and list(keep) == [False, False, True, True, True]
    # 5 / 10 + 5 / 5 + 10 / 10 = 2.5 s for 20 steps; the plain mean of the rates would be 405
    t = learning_time([5, 10, 15, 20, 30], [1000, 1000, 10, 5, 10], 10,
                      {"critic": ([15, 20, 30], [50, 100, 40]), "eval": ([30], [30])})
    assert (t["steps"], t["seconds"], t["windows"]) == (20, pytest.approx(2.5), 3)
    assert t["critic_seconds"] == pytest.approx(0.25 + 0.5 + 0.4) and t["eval_seconds"] == pytest.approx(0.3)
    assert learning_time([10, 25, 30], [500, 15, 2.5], 20)["steps"] == 20  # the straddling window is kept whole
    assert learning_time([10], [500], 0)["seconds"] == pytest.approx(0.02)


def test_compute_is_time_weighted_over_the_learning_phase(store):
    row = {(r["algo"], r["env_id"]): r for r in rows(store["out"] / "compute.csv")}[("QVPO", "Hopper-v5")]
    assert row["n"] == "3" and row["n_timed"] == "2" and row["warmup_steps"] == "0 10 20"
    # run 0 (warm-up 10, from the param): 20 steps in 2.5 s; run 1 (warm-up 20, from the tag, not
    # the param's 999): windows 10-25 (straddling, kept) and 25-30, 15 / 15 + 5 / 2.5 = 3 s for 20 steps
    assert float(row["learning_steps"]) == 40 and float(row["learning_seconds"]) == pytest.approx(5.5)
    assert float(row["steps_per_s"]) == pytest.approx(40 / 5.5)
    assert float(row["wall_ms_per_step"]) == pytest.approx(1e3 * 5.5 / 40)
    critic = (50 * 5 + 100 * 5 + 40 * 10 + 60 * 15 + 80 * 5) / 40  # ms x steps per window / steps
    assert float(row["critic_ms_per_step"]) == pytest.approx(critic)
    assert float(row["env_ms_per_step"]) == pytest.approx((2 * 5 + 2 * 5 + 2 * 10) / 40)  # run 1 logged none
    assert float(row["eval_ms_per_step"]) == pytest.approx(30 * 10 / 40)
    assert row["sampling_ms_per_step"] == ""  # no run logged it: unknown, not 0
    md = (store["out"] / "table.md").read_text()
    assert "learning phase only" in md and f"{40 / 5.5:.1f} |" in md


def test_only_old_runs_is_an_error_that_says_why(store):
    from mlflow.entities import Metric

    client = store["client"]
    exp = client.create_experiment("old", artifact_location=(store["tmp"] / "old").as_uri())
    r = client.create_run(exp, tags={"algo": "QVPO", "env_id": "Hopper-v5", "seed": "0"})
    client.log_batch(r.info.run_id, metrics=[Metric("eval/return_mean", 1.0, 0, 10)])
    client.set_terminated(r.info.run_id, "FINISHED")
    with pytest.raises(ConfigError, match="results version 1, not the current"):
        build_report("old", store["uri"], None, store["tmp"] / "old-out", log_to_mlflow=False)


def test_welch_interval_of_zero_width_is_shown_as_a_point(store, tmp_path):
    """Both samples constant: the difference's interval is [d, d], written as a point, not a CI."""
    from mlflow.entities import Metric

    client, uri = store["client"], store["uri"]  # a new experiment in the same store: no second database
    exp = client.create_experiment("flat", artifact_location=(tmp_path / "art").as_uri())
    for algo, level in (("QVPO", 100.0), ("SAC", 40.0)):
        for seed in range(3):
            r = client.create_run(exp, tags={"algo": algo, "env_id": "Ant-v5", "seed": str(seed),
                                             VERSION_TAG: str(RESULTS_VERSION), CELL_IDENTITY_TAG: algo})
            client.log_batch(r.info.run_id, metrics=[Metric("eval/return_mean", level, 0, 10)])
            client.set_terminated(r.info.run_id, "FINISHED")
    out = build_report("flat", uri, None, tmp_path / "out", log_to_mlflow=False)
    [comp] = rows(out / "comparisons.csv")
    assert (float(comp["diff"]), float(comp["diff_ci_low"]), float(comp["diff_ci_high"])) == (60.0, 60.0, 60.0)
    assert comp["welch_p"] == "" and comp["welch_t"] == "inf"  # no spread: no t distribution, no p
    assert "| 60.0 [60.0, 60.0] (zero width: no spread) |" in (out / "table.md").read_text()

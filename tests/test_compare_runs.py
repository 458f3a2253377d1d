"""tools/compare_runs.py: a re-run is matched to the original by (algo, env_id, seed) and compared
value by value, timing metrics left out."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import compare_runs  # noqa: E402


def _store(path, loss_at_2=0.5, step_ms=3.0, seeds=(0, 1)):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep")
    for seed in seeds:
        run = client.create_run(exp, tags={"algo": "QVPO", "env_id": "Hopper-v5", "seed": str(seed)})
        for step, loss in ((1, 1.0), (2, loss_at_2 if seed == 1 else 0.5)):
            client.log_metric(run.info.run_id, "loss/actor", loss, step=step)
            client.log_metric(run.info.run_id, "time/update_ms", step_ms + step, step=step)
        client.set_terminated(run.info.run_id)
    return uri


def test_identical_reruns_match_and_a_changed_value_is_named(tmp_path):
    original = _store(tmp_path / "a.db")
    same = _store(tmp_path / "b.db", step_ms=9.0)  # other timings, same numbers
    lines, ok = compare_runs.compare(original, same, "sweep")
    assert ok and lines[-1] == "4 of 4 logged values identical"
    assert lines[0].startswith("QVPO Hopper-v5 seed 0: 1 metrics compared, differing: none")

    changed = _store(tmp_path / "c.db", loss_at_2=0.5000001)
    lines, ok = compare_runs.compare(original, changed, "sweep")
    assert not ok and "seed 1: 1 metrics compared, differing: loss/actor" in lines[1]
    assert lines[-1] == "3 of 4 logged values identical"

    extra = _store(tmp_path / "d.db", seeds=(0, 1, 2))  # a run the original does not have
    lines, ok = compare_runs.compare(original, extra, "sweep")
    assert not ok and "seed 2: no finished run in the original" in lines[2]


def test_bad_input_is_one_line(tmp_path, capsys):
    uri = _store(tmp_path / "a.db")
    assert compare_runs.main([uri, uri, "--experiment", "nope"]) == 2
    said = [ln for ln in capsys.readouterr().err.splitlines() if "INFO" not in ln]  # (MLflow's own log)
    assert said == [f"compare_runs: error: no experiment 'nope' in {uri}"]

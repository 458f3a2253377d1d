"""MLflow store faults: fail fast before training, survive an outage mid-run, concurrent writers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvpo.cli import main

TINY = ["--algo", "sac", "--env", "Pendulum-v1", "--quiet",
        "--bind", "SAC.batch_size = 16", "--bind", "SAC.hidden = (16, 16)", "--bind", "Trainer.warmup_steps = 100",
        "--bind", "Trainer.eval_every = 200", "--bind", "Trainer.eval_episodes = 1",
        "--bind", "Trainer.log_every = 100", "--bind", "ReplayBuffer.capacity = 1000"]


@pytest.mark.parametrize("uri,message", [
    ("http://127.0.0.1:9", "cannot reach the MLflow tracking server"),       # nothing listens on port 9
    ("sqlite:///{tmp}/a_file/mlflow.db", "cannot use MLflow tracking"),       # a parent is a regular file
])
def test_unusable_store_fails_fast_before_training(tmp_path, capsys, uri, message):
    (tmp_path / "a_file").write_text("")
    t0 = time.time()
    rc = main(["train", "--steps", "300", "--tracking-uri", uri.format(tmp=tmp_path),
               "--checkpoint-dir", str(tmp_path / "ck"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and time.time() - t0 < 30
    assert not (tmp_path / "ck").exists()  # nothing started


def test_tracking_outage_mid_run_loses_nothing(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    calls = {"n": 0}
    log_batch = MlflowClient.log_batch

    def flaky(self, run_id, metrics=(), **kw):
        if metrics:
            calls["n"] += 1
            if 2 <= calls["n"] <= 7:  # the store is down for a while (several checkpoints)
                raise ConnectionError("store unreachable")
        return log_batch(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["train", "--steps", "800", "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"),
               "--bind", "Trainer.checkpoint_every = 100", "--bind", "MlflowTracker.retries = 1",
               "--bind", "MlflowTracker.retry_wait_s = 0.0", *TINY])
    out, err = capsys.readouterr()
    assert rc == 0 and "training goes on" in err and "reachable again" in err
    run_id = out.split("run_id: ")[1].split()[0]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss/critic"))
    assert steps == [200, 300, 400, 500, 600, 700, 800]  # updates start after the 100 warm-up steps
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/return_mean")) == [200, 400, 600, 800]


def test_concurrent_runs_on_one_sqlite_store_lose_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    main(["train", "--steps", "0", "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"), *TINY])  # creates the store
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-m", "qvpo", "train", "--steps", "400", "--seed", str(seed),
                               "--tracking-uri", uri, "--experiment", "many", "--checkpoint-dir", str(tmp_path / "ck"),
                               "--bind", "Trainer.checkpoint_every = 100", "--bind", "MlflowTracker.retry_wait_s = 0.2",
                               *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for seed in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [(p.returncode, o[1][-1500:]) for p, o in zip(procs, outs) if p.returncode]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("many").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss/critic")) == [200, 300, 400]
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval/return_mean")) == [200, 400]
        assert len(client.get_metric_history(r.info.run_id, "train/episode_return")) == 2  # 200-step episodes


def test_runs_racing_to_create_one_experiment_share_it(tmp_path):
    """Sweep workers starting together all find a new experiment missing and all create it; the
    store refuses every create but the first (a UNIQUE constraint), and the others must use the
    experiment the first one made instead of failing."""
    from mlflow.tracking import MlflowClient

    from qvpo.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    winner = MlflowTracker(experiment="race", tracking_uri=uri)
    loser = MlflowTracker(experiment="race", tracking_uri=uri)
    client = loser.client._client
    looks = []

    def look_before_the_winner_creates(name):  # the loser's first look sees no experiment
        looks.append(name)
        return None if len(looks) == 1 else MlflowClient.get_experiment_by_name(client, name)

    client.get_experiment_by_name = look_before_the_winner_creates
    exp_id = winner.check()  # creates "race"
    assert loser.check() == exp_id and len(looks) == 2  # missing, create refused, looked again
    assert len(MlflowClient(uri).search_experiments(filter_string="name = 'race'")) == 1


def test_store_failing_at_the_end_keeps_the_metrics_and_says_how_to_send_them(tmp_path, monkeypatch, capsys):
    """The final flush fails: the checkpoint with the unsent metrics is kept (it used to be deleted
    after a warning), the exit status is non-zero, and the printed command sends them later."""
    from mlflow.tracking import MlflowClient

    log_batch = MlflowClient.log_batch
    down = {"now": False}

    def failing_at_the_end(self, run_id, metrics=(), **kw):
        if metrics and down["now"]:
            raise ConnectionError("store unreachable")
        return log_batch(self, run_id, metrics=metrics, **kw)

    from qvpo import train as train_module
    run = train_module.Trainer.run

    def run_then_store_goes_down(self, *a, **kw):
        results = run(self, *a, **kw)
        down["now"] = True
        return results

    monkeypatch.setattr(MlflowClient, "log_batch", failing_at_the_end)
    monkeypatch.setattr(train_module.Trainer, "run", run_then_store_goes_down)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["train", "--steps", "300", "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"),
               "--bind", "Trainer.checkpoint_every = 0", "--bind", "MlflowTracker.retries = 0", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and "could not be sent" in err
    command = err.split("once the store is back with: ")[1].split()
    assert command[:3] == ["qvpo", "train", "--resume"] and Path(command[3]).is_file()
    client = MlflowClient(uri)
    [r] = client.search_runs([client.get_experiment_by_name("qvpo").experiment_id])
    assert r.info.status == "RUNNING" and not client.get_metric_history(r.info.run_id, "eval/return_mean")

    down["now"] = False
    monkeypatch.setattr(train_module.Trainer, "run", run)
    assert main([*command[1:], "--tracking-uri", uri, "--quiet"]) == 0
    assert client.get_run(r.info.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval/return_mean")) == [200, 300]
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss/critic")) == [200, 300]
    assert not Path(command[3]).exists()  # sent and finished: the checkpoint is removed as usual

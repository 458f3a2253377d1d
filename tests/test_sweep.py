"""The sweep: expansion, config hashes, skip / resume / restart planning, and a smoke profile
(two algorithms, one task, two seeds, two workers) through `qvpo sweep` into one MLflow store."""

from types import SimpleNamespace

import pytest

from qvpo import sweep as sw
from qvpo.cli import main
from qvpo.errors import ConfigError

SPEC = """
Sweep.name = 'smoke'
Sweep.experiment = 'smoke'
Sweep.algos = ('sac', 'td3')
Sweep.envs = ('Pendulum-v1',)
Sweep.seeds = 2
Sweep.steps = 400
Sweep.bindings = ('SAC.batch_size = 16', 'SAC.hidden = (16, 16)', 'TD3.batch_size = 16', 'TD3.hidden = (16, 16)',
                  'Trainer.warmup_steps = 100', 'Trainer.eval_every = 200', 'Trainer.eval_episodes = 2',
                  'Trainer.log_every = 100', 'Trainer.checkpoint_every = 200', 'ReplayBuffer.capacity = 1000')
Sweep.steps_per_s = {'sac': 100, 'td3': 200}
"""


def _spec(tmp_path):
    path = tmp_path / "spec.gin"
    path.write_text(SPEC)
    return str(path)


def test_expand_and_config_hash(tmp_path):
    spec = sw.load_spec(_spec(tmp_path), [])
    runs = sw.expand(spec)
    assert [(r.algo, r.seed) for r in runs] == [("sac", 0), ("sac", 1), ("td3", 0), ("td3", 1),
                                                ("random", 0), ("random", 1)]
    hashes = {r.config_hash() for r in runs}
    assert len(hashes) == 6  # every run its own identity
    again = sw.expand(spec, bindings=["MlflowTracker.experiment = 'elsewhere'", "Trainer.progress = True"])
    assert [r.config_hash() for r in again] == [r.config_hash() for r in runs]  # tracking is not identity
    other = sw.expand(spec, bindings=["SAC.tau = 0.01"])
    assert other[0].config_hash() != runs[0].config_hash()
    with pytest.raises(ConfigError, match="unknown algorithm 'sax'"):
        sw.expand(spec, algos=["sax"])
    with pytest.raises(ConfigError, match="unknown env id"):
        sw.expand(spec, envs=["Hopper-v9"])


def test_plan_skips_finished_resumes_checkpointed_restarts_the_rest(tmp_path):
    spec = sw.load_spec(_spec(tmp_path), [])
    a, b, c, d = sw.expand(spec)[:4]
    ckpt = tmp_path / "state.pt"
    ckpt.write_bytes(b"x")

    def run(status, checkpoint=None):
        return SimpleNamespace(info=SimpleNamespace(status=status, run_id=f"id-{status}"),
                               data=SimpleNamespace(tags={"qvpo.checkpoint": str(checkpoint)} if checkpoint else {}))

    known = {a.config_hash(): run("FINISHED"), b.config_hash(): run("KILLED", ckpt),
             c.config_hash(): run("FAILED")}
    assert [(act, rid) for _, act, rid in sw.plan([a, b, c, d], known)] == [
        ("skip", "id-FINISHED"), ("resume", "id-KILLED"), ("new", "id-FAILED"), ("new", None)]


def test_smoke_sweep_two_workers_then_rerun_skips_everything(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = _spec(tmp_path)
    assert main(["sweep", spec, "--dry-run", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "6 to start" in out and not (tmp_path / "mlflow.db").exists()  # dry run: nothing

    assert main(["sweep", spec, "--workers", "2", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "[6/6]" in out and "ETA" in out and "6 runs ended well, 0 failed" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["sweep"] == "smoke" and r.data.tags.get("git_commit") for r in runs)
    for r in runs:  # every metric of every run is there
        evals = client.get_metric_history(r.info.run_id, "eval/return_mean")
        if r.data.tags["algo"] == "Random":
            assert [m.step for m in evals] == [400]
        else:
            assert sorted(m.step for m in evals) == [200, 400]
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss/critic")) == [200, 300, 400]

    assert main(["sweep", spec, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "0 to start, 0 to resume, 6 finished" in out
    assert len(client.search_runs([client.get_experiment_by_name("smoke").experiment_id])) == 6

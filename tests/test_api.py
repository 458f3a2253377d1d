"""The Python API for one run: qvpo.run drives the whole life cycle, and a run stopped by a
signal resumes through it to the same history as an uninterrupted run."""

from pathlib import Path

import pytest

import qvpo
from qvpo.errors import ConfigError
from qvpo.observers import Observer

TINY = ["SAC.batch_size = 16", "SAC.hidden = (16, 16)", "SAC.warmup_steps = 100", "Trainer.eval_every = 200",
        "Trainer.eval_episodes = 1", "Trainer.log_every = 100", "ReplayBuffer.capacity = 1000",
        "Trainer.checkpoint_every = 100", "Trainer.deterministic = True"]


def _history(uri, run_id, key="loss/critic"):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


class StepCounter(Observer):
    """A user's observer: counts transitions, logs the count at each episode end, keeps it in
    the checkpoint."""

    def __init__(self):
        self.seen = 0

    def on_transition(self, trainer, k, obs, action, reward):
        self.seen += 1

    def on_episode_end(self, trainer, k, terminated):
        return {"test/transitions_seen": float(self.seen)}

    def state_dict(self):
        return self.seen

    def load_state_dict(self, state):
        self.seen = state


def test_run_and_resume_through_the_python_api(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    counter = StepCounter()
    whole = qvpo.run([], TINY, algo="sac", env="Pendulum-v1", steps=400, tracking_uri=uri, quiet=True,
                     checkpoint_dir=tmp_path / "a", observers=[counter])
    assert counter.seen == 400
    said = capsys.readouterr().err  # the run says where to see it: the UI's model-training view
    assert f"/#/experiments/{whole.experiment_id}/runs/{whole.run_ids[0]}?workflowType=machine_learning" in said
    assert whole.status == "FINISHED" and whole.exit_code == 0 and len(whole.run_ids) == 1
    assert [e.step for e in whole.results[0].evaluations] == [200, 400]

    # the same run, stopped by a signal after step 250 (as SIGTERM would: checkpoint, then stop)
    from qvpo import train as train_module
    log_step = train_module.MetricAccumulator.pop

    def stop_at_300(self, n):
        out = log_step(self, n)
        if trainer_ref and trainer_ref[0].step == 300:
            trainer_ref[0].stop_signal = 15
        return out

    trainer_ref = []
    init = train_module.Trainer.__init__

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        trainer_ref.append(self)

    monkeypatch.setattr(train_module.Trainer, "__init__", remember)
    monkeypatch.setattr(train_module.MetricAccumulator, "pop", stop_at_300)
    stopped = qvpo.run([], TINY, algo="sac", env="Pendulum-v1", steps=400, tracking_uri=uri, quiet=True,
                       checkpoint_dir=tmp_path / "b", handle_signals=False, observers=[StepCounter()])
    assert stopped.status == "KILLED" and stopped.exit_code == 128 + 15 and stopped.checkpoint.is_file()
    monkeypatch.undo()
    counter = StepCounter()  # a fresh one: its count comes back from the checkpoint
    resumed = qvpo.run(resume=stopped.run_ids[0], tracking_uri=uri, quiet=True, checkpoint_dir=tmp_path / "b",
                       observers=[counter])
    assert resumed.status == "FINISHED" and resumed.run_ids == stopped.run_ids and counter.seen == 400
    assert _history(uri, resumed.run_ids[0], "test/transitions_seen") == \
        _history(uri, whole.run_ids[0], "test/transitions_seen") == [(200, 200.0), (400, 400.0)]
    assert _history(uri, resumed.run_ids[0]) == _history(uri, whole.run_ids[0])
    assert _history(uri, resumed.run_ids[0], "eval/return_mean") == _history(uri, whole.run_ids[0], "eval/return_mean")
    assert not Path(stopped.checkpoint).exists()  # finished: removed


def test_bad_input_is_a_config_error_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match="--algo sac contradicts"):
        qvpo.run(["algos/qvpo.gin"], algo="sac", tracking_uri=uri)
    with pytest.raises(ConfigError, match="--resume continues a run with its own config"):
        qvpo.run(["algos/qvpo.gin"], resume="abc", tracking_uri=uri)
    with pytest.raises(ConfigError, match="two observers named 'StepCounter'"):
        qvpo.run([], TINY, algo="sac", env="Pendulum-v1", steps=400, tracking_uri=uri,
                 observers=[StepCounter(), StepCounter()])
    assert not (tmp_path / "mlflow.db").exists()

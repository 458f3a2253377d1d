"""Runs that survive: checkpoint and resume (in process and after SIGKILL), signals, divergence,
determinism, and bad resume input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import numpy as np
import pytest
import torch

from qvpo import checkpoint
from qvpo.cli import main
from qvpo.errors import ConfigError
from qvpo.train import Checkpointer, DivergenceError, Trainer

TIMING = ("perf/", "time/")  # wall-clock metrics: never the same twice
SETTINGS = {
    "SAC": ["SAC.batch_size = 16", "SAC.hidden = (16, 16)", "Trainer.warmup_steps = 100"],
    "QVPO": ["QVPO.batch_size = 16", "QVPO.train_candidates = 4", "QVPO.eval_candidates = 4",
             "QVPO.target_candidates = 2", "QVPO.T = 3", "Denoiser.hidden = (16, 16)",
             "Denoiser.time_hidden = 16", "TwinQ.hidden = (16, 16)", "Trainer.warmup_steps = 100"],
    "PPO": ["PPO.rollout_steps = 128", "PPO.minibatch_size = 32", "PPO.epochs = 2", "Trainer.warmup_steps = 0"],
}
SETTINGS["SAC x2 seeds"] = SETTINGS["SAC"] + ["Trainer.seeds_per_process = 2"]
SETTINGS["QVPO adaptive"] = SETTINGS["QVPO"] + ["QVPO.entropy_weight = @AdaptiveEntropyWeight()",
                                               "AdaptiveEntropyWeight.lr = 0.01"]  # omega moves in 600 steps


def _config(algo, steps=600, every=200):
    gin.clear_config()
    import qvpo.config  # noqa: F401

    gin.parse_config(["Trainer.env_id = 'Pendulum-v1'", f"Trainer.agent = @{algo.split()[0]}", f"Trainer.total_steps = {steps}",
                      "Trainer.eval_every = 200", "Trainer.eval_episodes = 2", "Trainer.log_every = 100",
                      "Trainer.progress = False", f"Trainer.checkpoint_every = {every}",
                      "Trainer.deterministic = True", "ReplayBuffer.capacity = 2000", *SETTINGS[algo]])


class Store:
    """Stands in for MLflow with `hold`: metrics are committed only after a checkpoint."""

    def __init__(self):
        self.pending, self.rows = [], []

    def log(self, metrics, step, seed=0):
        self.pending += [(seed, k, step, v) for k, v in metrics.items() if not k.startswith(TIMING)]

    def logs(self, trainer):
        """One log function per seed of the trainer."""
        return [lambda m, step, k=k: self.log(m, step, k) for k in range(len(trainer.seeds))]

    def commit(self, step):
        self.rows += self.pending
        self.pending = []


class Crash(Exception):
    pass


def _params(agent):
    return [p.detach().clone() for name in ("policy", "actor", "net", "critic") if hasattr(agent, name)
            for p in getattr(agent, name).parameters()]


@pytest.mark.parametrize("algo", ["SAC", "QVPO", "PPO", "SAC x2 seeds", "QVPO adaptive"])
def test_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(tmp_path, algo):
    """A run that dies right after its checkpoint at step 400 of 600 (Pendulum episodes of 200
    steps: the checkpoint falls between episodes, 300 falls inside one for PPO's rollouts) and is
    resumed from it logs exactly the uninterrupted run's metrics and ends with the same parameters."""
    _config(algo)
    ref_store = Store()
    ref = Trainer()
    ref.run(ref_store.logs(ref), checkpointer=Checkpointer(tmp_path / "ref.pt", committed=ref_store.commit))
    ref_store.commit(600)
    ref_params = _params(ref.agent)

    _config(algo)
    store = Store()

    def commit_then_die(step):
        store.commit(step)
        if step == 400:
            raise Crash

    first = Trainer()
    with pytest.raises(Crash):
        first.run(store.logs(first), checkpointer=Checkpointer(tmp_path / "state.pt", committed=commit_then_die))
    store.pending = []  # what the dead process had not committed is lost with it
    _config(algo)
    resumed = Trainer()
    resumed.load_state_dict(checkpoint.load(tmp_path / "state.pt")["trainer"])
    assert resumed.step == 400
    resumed.run(store.logs(resumed), checkpointer=Checkpointer(tmp_path / "state.pt", committed=store.commit))
    store.commit(600)

    assert store.rows == ref_store.rows  # same keys, steps and values, in the same order: no gap, no repeat
    assert len({(seed, k, s) for seed, k, s, _ in store.rows}) == len(store.rows)
    for a, b in zip(_params(resumed.agent), ref_params):
        assert torch.equal(a, b)
    if algo == "QVPO adaptive":  # the per-seed omega_ent state resumed too, and it moved
        assert torch.equal(resumed.agent.entropy_weight.log_weight, ref.agent.entropy_weight.log_weight)
        assert len({v for _, k, _, v in store.rows if k == "entropy/weight"}) > 1


@pytest.mark.parametrize("algo", ["QVPO", "SAC"])
def test_same_config_and_seed_give_identical_metrics(algo):
    runs = []
    for _ in range(2):
        _config(algo, steps=400, every=0)
        store = Store()
        Trainer().run(store.log)
        runs.append(store.pending)
    assert len(runs[0]) > 20 and runs[0] == runs[1]


def test_checkpoint_writes_are_atomic_and_keep_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"x": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.atomic_save({"x": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["x"] == 1  # the previous checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_divergence_names_the_quantity_and_keeps_the_last_good_checkpoint(tmp_path):
    _config("SAC", steps=600, every=200)
    trainer = Trainer()
    update = trainer.agent.update

    def poisoned(buffers, step):
        if step == 250:  # an injected NaN in a critic weight
            with torch.no_grad():
                next(trainer.agent.critic.parameters()).view(-1)[0] = float("nan")
        return update(buffers, step)

    trainer.agent.update = poisoned
    with pytest.raises(DivergenceError, match=r"loss/critic = nan .*env step 300"):
        trainer.run(checkpointer=Checkpointer(tmp_path / "state.pt"))
    assert checkpoint.load(tmp_path / "state.pt")["trainer"]["step"] == 200
    with pytest.raises(DivergenceError, match=r"non-finite values in agent\.\w+"):
        trainer.state_dict()  # a checkpoint of NaN parameters is refused


# ---------------------------------------------------------------------- through the CLI
CLI_TINY = ["--bind", "SAC.batch_size = 16", "--bind", "SAC.hidden = (16, 16)", "--bind", "Trainer.warmup_steps = 100",
            "--bind", "Trainer.eval_every = 500", "--bind", "Trainer.eval_episodes = 2",
            "--bind", "Trainer.log_every = 100", "--bind", "Trainer.checkpoint_every = 500",
            "--bind", "Trainer.deterministic = True", "--bind", "ReplayBuffer.capacity = 5000"]


def _cli(tmp_path, uri, experiment, steps):
    return [sys.executable, "-m", "qvpo", "train", "--algo", "sac", "--env", "Pendulum-v1", "--steps", str(steps),
            "--experiment", experiment, "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"),
            "--quiet", *CLI_TINY]


def _run_id_from_stderr(proc) -> str:
    for line in proc.stderr:  # MLflow may log its own lines first (e.g. creating the store)
        if line.startswith("MLflow run "):
            return line.split()[2]
    raise AssertionError(f"no run id; exit code {proc.wait()}")


def _wait_for_checkpoint(path: Path, min_step: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if path.exists():
            try:
                if checkpoint.load(path)["trainer"]["step"] >= min_step:
                    return
            except ConfigError:
                pass
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def _history(client, run_id):
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(TIMING)]
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in keys}


def test_sigkill_then_resume_gives_the_uninterrupted_history(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ref = subprocess.run(_cli(tmp_path, uri, "ref", 1500), capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    ref_id = ref.stdout.split("run_id: ")[1].split()[0]

    proc = subprocess.Popen(_cli(tmp_path, uri, "killed", 1500), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    run_id = None
    try:
        # the run id is on stderr first; the checkpoint lives in checkpoints/<run id>/state.pt
        run_id = _run_id_from_stderr(proc)
        _wait_for_checkpoint(tmp_path / "ck" / run_id / "state.pt", 500, proc)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody could end it
    rc = main(["train", "--resume", run_id, "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"), "--quiet"])
    assert rc == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["qvpo.resumed_at_step"]) >= 500
    got, want = _history(client, run_id), _history(client, ref_id)
    assert got.keys() == want.keys() and "loss/critic" in got
    for key in want:
        steps = [s for s, _ in got[key]]
        assert steps == sorted(set(steps)), f"{key}: repeated steps"
        assert got[key] == want[key], key
    final = {}
    for rid in (run_id, ref_id):
        local = client.download_artifacts(rid, "checkpoints/final.pt", str(tmp_path / rid))
        final[rid] = torch.load(local, weights_only=False)["agent"]
    for name in ("actor", "critic"):
        for k, v in final[ref_id][name].items():
            assert torch.equal(final[run_id][name][k], v), f"{name}.{k}"
    assert not (tmp_path / "ck" / run_id).exists()  # a finished run's resumable state is removed


def test_sigterm_checkpoints_marks_killed_and_exits_nonzero(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(_cli(tmp_path, uri, "term", 100_000), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        run_id = _run_id_from_stderr(proc)
        _wait_for_checkpoint(tmp_path / "ck" / run_id / "state.pt", 500, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)  # a guard against a hang, not a speed check: the
        # run stops at the end of the step it is in (end_reason's step = the checkpoint's, below)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and "SIGTERM at env step" in run.data.tags["end_reason"]
    step = checkpoint.load(tmp_path / "ck" / run_id / "state.pt")["trainer"]["step"]
    assert f"SIGTERM at env step {step}" in run.data.tags["end_reason"]
    # everything up to the checkpoint is in MLflow, nothing after it
    losses = MlflowClient(uri).get_metric_history(run_id, "loss/critic")
    assert max(m.step for m in losses) == step - step % 100


@pytest.mark.parametrize("make,message", [
    (lambda d: "0123456789abcdef", "no such checkpoint file, and no MLflow run"),
    (lambda d: (d / "junk.pt").write_text("not a checkpoint") and str(d / "junk.pt"), "corrupt or truncated"),
    (lambda d: _truncated(d), "corrupt or truncated"),
    (lambda d: torch.save({"agent": {}}, d / "other.pt") or str(d / "other.pt"), "not a qvpo training checkpoint"),
])
def test_bad_resume_input_one_line_error_and_no_run(tmp_path, capsys, make, message):
    from test_cli import runs_in

    db = tmp_path / "mlflow.db"
    rc = main(["train", "--resume", make(tmp_path), "--tracking-uri", f"sqlite:///{db}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert runs_in(db) == 0


def _truncated(d: Path) -> str:
    path = d / "state.pt"
    checkpoint.atomic_save({"trainer": {"x": np.zeros(1000)}, "extra": {}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def test_checkpoint_of_another_run_does_not_load(tmp_path):
    _config("SAC", steps=200, every=200)
    trainer = Trainer()
    trainer.run(checkpointer=Checkpointer(tmp_path / "state.pt"))
    state = checkpoint.load(tmp_path / "state.pt")["trainer"]
    gin.parse_config(["Trainer.seed = 5"])
    with pytest.raises(ValueError, match="checkpoint is for"):
        Trainer().load_state_dict(state)

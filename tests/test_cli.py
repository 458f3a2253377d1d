"""End to end through the CLI: a complete MLflow run, and bad input refused before any run."""

import sqlite3
from pathlib import Path

import gin
import pytest

from qvpo.agents import ALGORITHMS, agent_class
from qvpo.cli import main
from test_agent_contract import tiny_bindings

TINY = ["--bind", "Trainer.warmup_steps = 100", "--bind", "Trainer.eval_every = 150",
        "--bind", "Trainer.eval_episodes = 2", "--bind", "Trainer.log_every = 50",
        "--bind", "QVPO.batch_size = 16", "--bind", "QVPO.train_candidates = 4",
        "--bind", "QVPO.eval_candidates = 4", "--bind", "QVPO.T = 3",
        "--bind", "Denoiser.hidden = (16, 16)", "--bind", "TwinQ.hidden = (16, 16)",
        "--bind", "ReplayBuffer.capacity = 1000"]


def runs_in(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        try:
            return c.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_train_writes_a_complete_mlflow_run(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["train", "--gin", "demo.gin", "--steps", "300", "--seed", "1", "--experiment", "e2e",
               "--tracking-uri", uri, "--device", "cpu", "--quiet", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    run_id = out.split("run_id: ")[1].split()[0]
    assert "best eval return:" in out and "final eval return:" in out

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    p = run.data.params
    assert p["QVPO.batch_size"] == "16" and p["QVPO.target_candidates"] == "4"
    assert p["Trainer.env_id"] == "'Pendulum-v1'" and p["Trainer.seed"] == "1"
    assert p["QVPO.T"] == "3" and p["adam.eps"] == "1e-05"
    t = run.data.tags
    for tag in ("device", "host", "version.torch", "version.mlflow", "algo", "env_id"):
        assert tag in t
    assert t["device"] == "cpu" and t["algo"] == "QVPO"

    for key in ("eval/return_mean", "eval/return_std", "eval/return_best", "train/episode_return",
                "loss/critic", "loss/actor", "q/mean", "qweight/mean", "qweight/frac_zero",
                "entropy/weight", "perf/steps_per_s", "time/sampling_ms_per_step",
                "time/critic_ms_per_step", "time/actor_ms_per_step", "time/env_ms_per_step"):
        assert client.get_metric_history(run_id, key), key
    evals = client.get_metric_history(run_id, "eval/return_mean")
    assert sorted(m.step for m in evals) == [150, 300]
    episodes = client.get_metric_history(run_id, "train/episode_return")
    assert sorted(m.step for m in episodes) == [200]  # Pendulum: 200-step episodes

    def files(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += files(f.path) if f.is_dir else [f.path]
        return out

    arts = set(files())
    assert {"config.gin", "eval.csv", "learning_curve.png", "checkpoints/best.pt",
            "checkpoints/final.pt", "environment/packages.txt"} <= arts
    packages = Path(client.download_artifacts(run_id, "environment/packages.txt", str(tmp_path))).read_text()
    import torch  # every resolved package with its version, as the run had it
    assert f"torch=={torch.__version__}" in packages.splitlines() and len(packages.splitlines()) > 30
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning" in out
    from qvpo import identity  # what the run is, for the sweep and the report
    assert t[identity.VERSION_TAG] == str(identity.RESULTS_VERSION) and len(t[identity.IDENTITY_TAG]) == 16
    assert t[identity.CELL_TAG] == identity.cell_identity() and t["qvpo.warmup_steps"] == "100"
    local = Path(client.download_artifacts(run_id, "config.gin", str(tmp_path)))
    text = local.read_text()
    assert "QVPO.train_candidates = 4" in text
    gin.clear_config()
    gin.parse_config(text)  # the recorded config parses as it stands
    csv_lines = Path(client.download_artifacts(run_id, "eval.csv", str(tmp_path))).read_text().splitlines()
    assert csv_lines[0].startswith("step,return_mean,return_std") and len(csv_lines) == 3


BAD_INPUT = [
    (["--gin", "nope.gin"], "gin file 'nope.gin' not found"),
    (["--bind", "Nope.x = 1"], "Nope"),
    (["--bind", "QVPO.batchsize = 3"], "batchsize"),
    (["--bind", "QVPO.batch_size = = 3"], "syntax"),
    (["--bind", "QVPO.batch_size = 'big'"], "QVPO.batch_size must be an integer"),
    (["--algo", "foo"], "unknown --algo 'foo'"),
    (["--env", "Hoppr-v5"], "unknown env id 'Hoppr-v5'"),
    (["--bind", "QVPO.behavior_candidates = 0"], "behavior_candidates (Kb) must be an integer >= 1"),
    (["--bind", "QVPO.T = 0"], "QVPO.T (diffusion steps) must be an integer >= 1"),
    (["--bind", "ReplayBuffer.capacity = 10"], "larger than the replay buffer"),
    (["--steps", "-5"], "total_steps (--steps) must be an integer >= 0"),
    (["--device", "tpu"], "device must be"),
    (["--bind", "QVPO.gamma = 1.5"], "gamma must be in [0, 1]"),
    (["--tracking-uri", "foo://bar"], "cannot use MLflow tracking URI 'foo://bar'"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_one_line_error_and_no_run(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    rc = main(["train", "--env", "Pendulum-v1", "--quiet", "--tracking-uri", f"sqlite:///{db}", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("qvpo: error:") and message in err
    assert len(err.splitlines()) == 1, err
    assert runs_in(db) == 0


def test_module_entry_point_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qvpo", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--tracking-uri" in out.stdout


def test_seeds_per_process_make_one_mlflow_run_per_seed(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["train", "--gin", "demo.gin", "--steps", "150", "--seed", "3", "--experiment", "multi",
               "--tracking-uri", uri, "--device", "cpu", "--quiet", "--bind", "Trainer.seeds_per_process = 2",
               *TINY])
    assert rc == 0
    ids = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("run_id:")]
    assert len(ids) == 2
    client = MlflowClient(uri)
    runs = [client.get_run(i) for i in ids]
    assert sorted(r.data.params["Trainer.seed"] for r in runs) == ["3", "4"]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["seeds_per_process"] == "2"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "eval/return_mean")] == [150]
        assert client.get_metric_history(r.info.run_id, "loss/critic")
        assert {f.path for f in client.list_artifacts(r.info.run_id)} >= {"eval.csv", "learning_curve.png", "checkpoints"}


# tiny settings per algorithm (each run: Pendulum-v1, 300 env steps, two evaluations)
OFF_POLICY_WARMUP = ["Trainer.warmup_steps = 100", "ReplayBuffer.capacity = 1000"]


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_writes_the_same_mlflow_record(tmp_path, monkeypatch, capsys, algo):
    """`qvpo train --algo X` with X's own gin file: the same metric names for the same quantities."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    binds = ([] if agent_class(algo).on_policy else OFF_POLICY_WARMUP) + tiny_bindings(algo) + [
        "Trainer.eval_every = 150", "Trainer.eval_episodes = 2", "Trainer.log_every = 100"]
    rc = main(["train", "--algo", algo, "--env", "Pendulum-v1", "--steps", "300", "--tracking-uri", uri,
               "--device", "cpu", "--quiet", *[x for b in binds for x in ("--bind", b)]])
    assert rc == 0
    run_id = capsys.readouterr().out.split("run_id: ")[1].split()[0]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == ALGORITHMS[algo]
    learner_keys = () if algo == "random" else ("loss/critic", "loss/actor", "time/sampling_ms_per_step",
                                                  "time/actor_ms_per_step")
    for key in ("eval/return_mean", "eval/return_std", "eval/return_best", "train/episode_return",
                "train/episode_length", "perf/steps_per_s", "time/env_ms_per_step", *learner_keys):
        assert client.get_metric_history(run_id, key), f"{algo}: no {key}"
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/return_mean")) == [150, 300]
    assert {f.path for f in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt",
                                                                              "checkpoints/final.pt"}


def test_ui_links_open_the_model_training_view_where_the_store_is(tmp_path):
    """Links go to MLflow 3's model-training view (workflowType=machine_learning) of the UI that
    serves the store: an MLflow server's own address, `qvpo ui`'s for a local store."""
    from mlflow.tracking import MlflowClient

    from qvpo.tracking import MlflowTracker, run_link

    view = "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert run_link("http://mlflow.lab:8080/", "3", "abc") == f"http://mlflow.lab:8080/{view}"
    assert run_link(f"sqlite:///{tmp_path}/x.db", "3", "abc") == f"http://127.0.0.1:5000/{view} (after `qvpo ui`, on its default port)"
    # experiments made before the tag (or by plain mlflow) are marked as model training when a
    # run goes into them; a kind someone chose stays
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    plain = client.create_experiment("plain")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    MlflowTracker("plain", uri).check()
    MlflowTracker("chosen", uri).check()
    assert client.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"

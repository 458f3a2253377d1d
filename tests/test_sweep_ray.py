"""The Ray backend for real, honestly scoped: a single-node Ray head (2 CPUs, no dashboard) and an
MLflow tracking server on 127.0.0.1, a tiny sweep through them, every run checked in MLflow, both
stopped by their process ids."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvpo.cli import main

ray = pytest.importorskip("ray")  # the optional extra qvpo[cluster]; `make install` includes it

SPEC = """
Sweep.name = 'ray-smoke'
Sweep.experiment = 'ray-smoke'
Sweep.algos = ('sac',)
Sweep.envs = ('Pendulum-v1',)
Sweep.seeds = 2
Sweep.steps = 300
Sweep.random_baseline = False
Sweep.bindings = ('SAC.batch_size = 16', 'SAC.hidden = (16, 16)', 'Trainer.warmup_steps = 100',
                  'Trainer.eval_every = 150', 'Trainer.eval_episodes = 2', 'Trainer.log_every = 100',
                  'ReplayBuffer.capacity = 1000')
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port}")


def _stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sweep_on_a_ray_head_logging_to_an_mlflow_server(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    bin_dir = Path(sys.executable).parent
    ray_port, mlflow_port = _free_port(), _free_port()
    ray_tmp = Path(f"/tmp/ray-qvpo-{os.getpid()}")  # Ray's socket paths must stay short
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--port={ray_port}",
                             f"--temp-dir={ray_tmp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(mlflow_port, server)
        _wait_port(ray_port, head)
        spec = tmp_path / "spec.gin"
        spec.write_text(SPEC)
        uri = f"http://127.0.0.1:{mlflow_port}"
        rc = main(["sweep", str(spec), "--backend", "ray", "--ray-address", f"127.0.0.1:{ray_port}",
                   "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck")])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "[2/2]" in out
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("ray-smoke").experiment_id])
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        for r in runs:
            assert r.data.tags["sweep"] == "ray-smoke"
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "eval/return_mean")) == [150, 300]
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss/critic")) == [200, 300]
    finally:
        _stop(head, signal.SIGINT)  # `ray start --block` stops on Ctrl-C (it sat out SIGTERM for 30 s)
        _stop(server)
    assert head.poll() is not None and server.poll() is not None

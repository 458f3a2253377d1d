"""The package as a user installs it: a wheel in a fresh virtual environment, run from a
directory outside the checkout. Its configs and reproduce specs must ship inside it."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A wheel of this checkout installed (without dependencies) into a fresh venv; the
    dependencies come from this interpreter's site-packages through a plain path entry, so the
    checkout's editable install is not on the path and `qvpo` is the wheel's."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist, src = tmp / "dist", tmp / "src"
    # build from a copy: setuptools' build/ directory would otherwise land in the checkout
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "mlruns", "mlflow.db", "checkpoints", "reports", "results",
        "__pycache__", ".pytest_cache", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(src)], check=True, capture_output=True, text=True)
    [wheel] = dist.glob("qvpo-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:  # a wheel is a zip laid out as site-packages
        z.extractall(site)
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    return wheel, py, work


def _run(py, work, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return subprocess.run([str(py), "-m", "qvpo", *args], cwd=work, capture_output=True, text=True, env=env,
                          timeout=300)


def test_wheel_ships_configs_and_specs(wheel_env):
    wheel, _, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ["qvpo/gin/algos/qvpo.gin", "qvpo/gin/algos/dipo.gin", "qvpo/gin/envs/hopper.gin", "qvpo/gin/demo.gin",
              "qvpo/reproduce/table1/sweep.gin", "qvpo/reproduce/table1/paper.csv", "qvpo/native/sampler.c"]:
        assert f in names, f"{f} missing from the wheel"
    assert not any("/results/" in n for n in names)  # committed results stay in the repository


def test_installed_wheel_trains_sweeps_and_reports_outside_the_checkout(wheel_env):
    _, py, work = wheel_env
    where = subprocess.run(
        [str(py), "-c", "import qvpo, pathlib; print(pathlib.Path(qvpo.__file__).resolve())"],
        cwd=work, capture_output=True, text=True)
    assert str(ROOT) not in where.stdout  # the wheel's copy, not the checkout's
    uri = f"sqlite:///{work}/mlflow.db"
    r = _run(py, work, "train", "--algo", "sac", "--gin", "envs/hopper.gin", "--env", "Pendulum-v1", "--steps", "300",
             "--bind", "SAC.warmup_steps = 100", "--bind", "SAC.batch_size = 16", "--bind", "SAC.hidden = (16, 16)",
             "--bind", "Trainer.eval_every = 300", "--bind", "Trainer.eval_episodes = 1",
             "--tracking-uri", uri, "--experiment", "wheel", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final eval return" in r.stdout
    r = _run(py, work, "sweep", "table1", "--dry-run", "--tracking-uri", uri, "--envs", "Hopper-v5", "--seeds", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sweep 'table1': 8 runs" in r.stdout
    r = _run(py, work, "report", "wheel", "--tracking-uri", uri, "--paper", "reproduce/table1/paper.csv",
             "--out", str(work / "reports"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "reports" / "wheel" / "table.md").is_file()

"""Sweeps: a gin spec expanded into (algorithm, task, seed) runs, each one `qvpo train` process.

A run is identified by its run identity (qvpo.identity: a hash of the operative config it
builds, speed-only and tracking settings left out, and the results version), stored as the MLflow
tag `qvpo.run_identity`. The sweep builds each cell's config once (envs and agent, no training)
to compute it. Re-running a sweep looks each identity up in the experiment: FINISHED runs are
skipped, interrupted ones (RUNNING, KILLED or FAILED with a checkpoint on disk) are resumed with
`qvpo train --resume`, others start afresh. A comment edit changes nothing; a changed value, or
a RESULTS_VERSION bump, makes every affected run new.

Backends: `local` runs `workers` processes at once on this machine, all writing to one MLflow
store (sqlite copes with a handful of writers: tests/test_tracking_faults.py runs four); `ray`
makes each run a Ray task on a cluster, all logging to one MLflow tracking server.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import gin

from qvpo import identity
from qvpo.config import find_gin_file
from qvpo.errors import ConfigError, one_line, require, require_int
from qvpo.envs import check_env_id
from qvpo.identity import COLUMNS_TAG, LAYOUT_SWEEP_TAG, TREATMENT_TAG  # the report's layout, recorded by the sweep
from qvpo.tracking import search_all


@gin.configurable
@dataclass
class Sweep:
    """A sweep spec (gin: `Sweep.*`; see reproduce/table1/sweep.gin).

    Args:
      name: the sweep's name (MLflow tag `sweep`).
      experiment: MLflow experiment of its runs (one per table).
      algos: --algo names; each run uses gin/algos/<algo>.gin plus `gin_files[algo]`.
      envs: Gymnasium task ids.
      seeds: seeds 0 .. seeds - 1 per (algorithm, task).
      steps: env steps per run (Trainer.total_steps).
      gin_files: extra gin files per algorithm (after its algos/ file).
      bindings: extra bindings for every run (after the files); those of one algorithm's
        parameters (`QVPO.T = 5`) go to that algorithm's runs only.
      random_baseline: also run the uniformly random policy per task and seed (one evaluation),
        the 0 of the report's normalised scores.
      variants: named variants of an algorithm for ablations, {name: (algo, (bindings...))}: each
        runs like an algorithm of `algos` with its bindings added and is tagged `variant=name`
        (the report groups by variant). A spec with variants runs them instead of `algos`.
      treatment: the report's column every other column is compared with: a variant's name, or an
        algorithm (its --algo name 'qvpo' or its label 'QVPO'); None = the first algorithm (or
        variant) of the spec.
      columns: the order of the report's columns (labels as above); None = the order of `algos`
        (or `variants`); columns it leaves out follow in that order. The sweep records the order
        and the treatment in its experiment's tags when it starts (record_layout), where
        `qvpo report` reads them.
      steps_per_s: measured env steps per second per algorithm (for --dry-run's estimate);
        `gpu_steps_per_s` the same for one GPU where measured or estimated.
    """
    name: str = "sweep"
    experiment: str = "sweep"
    algos: tuple = ("qvpo",)
    envs: tuple = ("Hopper-v5",)
    seeds: int = 5
    steps: int = 1_000_000
    gin_files: dict = field(default_factory=dict)
    bindings: tuple = ()
    random_baseline: bool = True
    variants: dict = field(default_factory=dict)
    treatment: str | None = None
    columns: tuple | None = None
    steps_per_s: dict = field(default_factory=dict)
    gpu_steps_per_s: dict = field(default_factory=dict)


@dataclass
class RunSpec:
    algo: str
    env: str
    seed: int
    steps: int
    gin_files: list[str]
    bindings: list[str]
    variant: str | None = None
    identity: str | None = None  # set by identify()

    @property
    def label(self) -> str:
        return f"{self.variant or self.algo} {self.env} seed {self.seed}"

    def train_args(self, sweep: Sweep, tracking_uri: str, checkpoint_dir: str) -> list[str]:
        args = ["train", "--algo", self.algo, "--experiment", sweep.experiment, "--tracking-uri", tracking_uri,
                "--quiet", "--checkpoint-dir", checkpoint_dir, "--tag", f"sweep={sweep.name}"]
        if self.identity:  # the run refuses to start if it builds another config than planned
            args += ["--tag", f"{identity.PLANNED_TAG}={self.identity}"]
        for f in self.gin_files:
            args += ["--gin", f]
        for b in self.bindings:
            args += ["--bind", b]
        if self.variant:
            args += ["--tag", f"variant={self.variant}"]
        return args


def expand(sweep: Sweep, steps: int | None = None, seeds: int | None = None, envs=None, algos=None,
           bindings=(), variants=None) -> list[RunSpec]:
    """The runs of a sweep, with the command line's overrides; checks every name first. `variants`
    (--variants) runs only those of the spec's variants (a subset's runs are the same runs, with
    the same identities, as the whole spec's: the rest can follow later into the same experiment)."""
    from qvpo.agents import ALGORITHMS

    layout(sweep)  # a treatment or column the spec does not have is an error now, before any run
    algos = list(algos or (() if sweep.variants else sweep.algos))
    envs = list(envs or sweep.envs)
    steps = sweep.steps if steps is None else steps
    seeds = sweep.seeds if seeds is None else seeds
    require_int(steps, "sweep steps (--steps)", 1)
    require_int(seeds, "sweep seeds (--seeds)", 1)
    for b in (*sweep.bindings, *bindings, *(x for _, vb in sweep.variants.values() for x in vb)):
        require(not b.replace(" ", "").startswith(("Trainer.seed=", "Trainer.seeds_per_process=")),
                f"sweep binding {b!r}: a sweep sets each run's seed itself (Sweep.seeds / --seeds), not by binding")
    for a in algos:
        require(a in ALGORITHMS and a != "random",
                f"unknown algorithm {a!r} in the sweep; expected some of {', '.join(sorted(set(ALGORITHMS) - {'random'}))}")
    for e in envs:
        check_env_id(e)
    if variants is not None:
        require(bool(sweep.variants), f"sweep {sweep.name!r} has no variants to choose from (--variants); "
                                      f"its columns are algorithms: choose them with --algos")
        for v in variants:
            require(v in sweep.variants, f"--variants: {v!r} is not a variant of sweep {sweep.name!r}; "
                                         f"expected some of {', '.join(sweep.variants)}")
    groups = [(a, a, ()) for a in algos]  # (variant name or algo, algo, variant bindings)
    for name, (algo, variant_bindings) in sweep.variants.items():
        if variants is not None and name not in variants:
            continue
        require(algo in ALGORITHMS, f"variant {name!r}: unknown algorithm {algo!r}")
        groups.append((name, algo, tuple(variant_bindings)))
    if sweep.random_baseline:
        groups.append(("random", "random", ()))
    runs = []
    for name, algo, variant_bindings in groups:
        files = list(sweep.gin_files.get(algo, []))  # after gin/algos/<algo>.gin (--algo)
        for f in files:
            find_gin_file(f)  # a missing file is an error now, not in the middle of the sweep
        for env in envs:
            for seed in range(seeds):
                run_steps = steps if algo != "random" else min(steps, 1000)
                mine = lambda bs: [b for b in bs if _bound_agent(b) in (None, ALGORITHMS[algo])]  # noqa: E731
                binds = [f"Trainer.env_id = {env!r}", f"Trainer.total_steps = {run_steps}", f"Trainer.seed = {seed}",
                         *mine(sweep.bindings), *variant_bindings, *mine(bindings)]
                if algo == "random":
                    binds.append(f"Trainer.eval_every = {run_steps}")
                runs.append(RunSpec(algo, env, seed, run_steps, files, binds, name if name != algo else None))
    return runs


def layout(sweep: Sweep) -> tuple[list[str], str | None]:
    """The report's columns in order and its treatment, as the spec gives them (checked).

    A column is a label, as the report groups runs: a variant's name, or an algorithm's agent
    name (the MLflow tag `algo`: 'qvpo' -> 'QVPO'). The spec's columns are its variants if it has
    any (they run instead of `algos`), else its algorithms; `Sweep.columns` orders them (those it
    leaves out follow in spec order); the treatment is `Sweep.treatment`, else the first of the
    spec's algorithms or variants. The random baseline is never a column (the report puts it last).
    Either may name an algorithm by its --algo name. A name that is not one of the spec's columns
    is a ConfigError. A spec of neither algorithms nor variants has no columns: ([], None)."""
    from qvpo.agents import ALGORITHMS

    spec_columns = list(sweep.variants) if sweep.variants else [ALGORITHMS.get(a, a) for a in sweep.algos]

    def label(name, what: str) -> str:
        if name in spec_columns:
            return name
        if isinstance(name, str) and ALGORITHMS.get(name) in spec_columns:
            return ALGORITHMS[name]
        raise ConfigError(f"sweep {sweep.name!r}: {what} {name!r} is not one of the spec's columns "
                          f"({', '.join(spec_columns)}: its {'variants' if sweep.variants else 'algorithms'})")

    require(sweep.columns is None or isinstance(sweep.columns, (tuple, list)),
            f"sweep {sweep.name!r}: Sweep.columns must be a tuple of column names, got {sweep.columns!r}")
    order = [label(c, "Sweep.columns entry") for c in (sweep.columns or ())]
    require(len(set(order)) == len(order), f"sweep {sweep.name!r}: Sweep.columns names a column twice: {order}")
    order += [c for c in spec_columns if c not in order]
    if sweep.treatment is not None:
        return order, label(sweep.treatment, "Sweep.treatment")
    return order, spec_columns[0] if spec_columns else None  # None: the random baseline alone


def record_layout(sweep: Sweep, tracking_uri: str) -> None:
    """Record the report's layout in the sweep's experiment (created if missing): the tags
    qvpo.columns (JSON list), qvpo.treatment and qvpo.layout_sweep (the sweep's name), read by
    `qvpo report` (qvpo.report.layout), which may run elsewhere with only the store. The latest
    sweep into an experiment sets them."""
    import json

    from qvpo.tracking import MlflowTracker

    columns, treatment = layout(sweep)
    if treatment is None:
        return  # no columns to order
    tracker = MlflowTracker(sweep.experiment, tracking_uri)
    experiment_id = tracker.check()
    for key, value in ((COLUMNS_TAG, json.dumps(columns)), (TREATMENT_TAG, treatment), (LAYOUT_SWEEP_TAG, sweep.name)):
        tracker.client.set_experiment_tag(experiment_id, key, value)


def _bound_agent(binding: str) -> str | None:
    """The agent whose parameter a binding sets ('QVPO.tau = 0.01' -> 'QVPO'), else None.

    A sweep's bindings apply to every run; one algorithm's parameters go to that algorithm's runs
    only (a single `qvpo train` refuses them: qvpo.agents.check_agent_bindings)."""
    from qvpo.agents import ALGORITHMS

    selector = binding.split("=", 1)[0].strip().rsplit("/", 1)[-1]
    owner = selector.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in selector else None
    return owner if owner in ALGORITHMS.values() else None


def identify(runs: list[RunSpec]) -> None:
    """Set each run's identity: its cell's config is parsed and built once (envs, buffers and
    agent, nothing trained), so the identity is that of the operative config the run will build.
    Bad input in any run is a ConfigError here, before anything starts."""
    from qvpo import config
    from qvpo.train import Trainer

    cells: dict[tuple, str] = {}
    labels: dict[str, str] = {}
    for r in runs:
        key = (r.algo, tuple(r.gin_files), tuple(b for b in r.bindings if not b.startswith("Trainer.seed =")))
        if key not in cells:
            trainer = None
            try:  # on CPU: the device is not part of the identity, and the planner may have no GPU
                config.parse(r.gin_files, [*r.bindings, "Trainer.progress = False", "Trainer.device = 'cpu'"],
                             algo=r.algo)
                trainer = Trainer()
            except (ConfigError, ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"{r.label}: {one_line(e)}") from None
            finally:
                if trainer is not None:
                    trainer.close()
            cells[key] = identity.cell_identity()
        r.identity = identity.run_identity(cells[key], r.seed)
        other = labels.setdefault(r.identity, r.label)
        if other != r.label:
            raise ConfigError(f"{other!r} and {r.label!r} are the same run (same operative config): a variant "
                              f"that changes nothing would share its runs; drop one or make them differ")


def existing_runs(tracking_uri: str, experiment: str) -> dict[str, object]:
    """run identity -> the newest MLflow run of the experiment with that identity."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return {}
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = search_all(client, exp.experiment_id, f"tags.`{identity.IDENTITY_TAG}` != ''",
                      ["attributes.start_time ASC"])
    return {run.data.tags[identity.IDENTITY_TAG]: run for run in runs}  # the newest run of an identity wins


def plan(runs: list[RunSpec], known: dict) -> list[tuple[RunSpec, str, str | None]]:
    """(run, action, run id): action is 'skip' (finished), 'resume' (checkpoint on disk) or 'new'."""
    out = []
    for r in runs:
        prev = known.get(r.identity)
        if prev is None:
            out.append((r, "new", None))
        elif prev.info.status == "FINISHED":
            out.append((r, "skip", prev.info.run_id))
        elif Path(prev.data.tags.get("qvpo.checkpoint", "/nonexistent")).is_file():
            out.append((r, "resume", prev.info.run_id))
        else:
            out.append((r, "new", prev.info.run_id))  # interrupted before its first checkpoint
    return out


def estimate_hours(todo: list[RunSpec], workers: int, table: dict) -> float | None:
    """Hours for the runs left, from measured steps/s per algorithm, `workers` at a time."""
    rate = lambda r: table.get(r.variant) or table.get(r.algo)  # noqa: E731 - a variant may have its own
    if any(rate(r) is None for r in todo if r.algo != "random"):
        return None
    secs = sum(r.steps / rate(r) for r in todo if r.algo != "random")
    return secs / 3600 / max(1, workers)


def run_local(sweep: Sweep, items, tracking_uri: str, checkpoint_dir: str, workers: int,
              log=print) -> list[tuple[RunSpec, int]]:
    """Run the planned items, `workers` processes at a time (a thread pool, each thread waiting on
    one child); returns (run, exit status) in the order they end."""
    todo = [(r, a, rid) for r, a, rid in items if a != "skip"]
    record_layout(sweep, tracking_uri)  # the report's columns and treatment, in the experiment
    results, t0 = [], time.time()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {}
        for r, action, rid in todo:
            _log_start(log, r, action, rid)
            futures[pool.submit(run_child, _command(sweep, r, action, rid, tracking_uri, checkpoint_dir),
                                log_path(checkpoint_dir, sweep, r), tracking_uri, r.identity,
                                sweep.experiment, rid if action == "resume" else None)] = r
        try:
            for future in as_completed(futures):
                r = futures[future]
                rc, last = future.result()
                results.append((r, rc))
                _log_progress(log, r, rc, last, log_path(checkpoint_dir, sweep, r), len(results), len(todo), t0)
        except BaseException:  # Ctrl-C: start nothing more (the running children get the signal too)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def log_path(checkpoint_dir: str, sweep: Sweep, r: RunSpec) -> Path:
    """Where a run's output goes: one file per run identity, appended to by each resume."""
    return Path(checkpoint_dir).resolve() / "logs" / sweep.experiment / f"{r.identity or r.label.replace(' ', '_')}.log"


def child_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "qvpo", *args]


def run_child(args: list[str], log_file: Path, tracking_uri: str, run_identity: str | None,
              experiment: str | None = None, run_id: str | None = None) -> tuple[int, str]:
    """Run `qvpo train ARGS` with its stdout and stderr written to log_file (never to a pipe, which
    a chatty child would fill and block on), then attach the whole log to the run as the
    artifact logs/<run identity>.log. Returns the exit status and the log's last line."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started_ms = int(time.time() * 1000) - 1000
    with open(log_file, "ab") as out:
        out.write(f"$ qvpo {' '.join(args)}\n".encode())
        out.flush()
        rc = subprocess.run(child_command(args), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    if run_identity:
        attach_log(tracking_uri, run_identity, log_file, experiment, run_id, started_ms)
    return rc, _last_line(log_file)


def attach_log(tracking_uri: str, run_identity: str, log_file: Path, experiment: str | None = None,
               run_id: str | None = None, started_ms: int = 0) -> None:
    """Log the file under artifacts logs/ of its run: `run_id` (a resumed run), else the run with
    that identity the child created in `experiment` (started after `started_ms`). A child that
    failed before creating its run has none: the file stays where it is."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        found = run_id or _find_run(client, run_identity, experiment, started_ms)
        if found is not None:
            client.log_artifact(found, str(log_file), "logs")
    except Exception as e:  # noqa: BLE001 - the log stays on disk; say so, never stop the sweep
        print(f"qvpo: warning: could not attach {log_file} to its run: {one_line(e)}", file=sys.stderr)


def _find_run(client, run_identity: str, experiment: str | None, started_ms: int) -> str | None:
    exp = client.get_experiment_by_name(experiment) if experiment else None
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{identity.IDENTITY_TAG}` = '{run_identity}' and "
                              f"attributes.start_time >= {started_ms}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _last_line(path: Path, window: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - window))
        lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _log_start(log, r: RunSpec, action: str, rid: str | None) -> None:
    if action == "resume":
        log(f"resume {r.label} (run {rid})")
    else:
        log(f"queue  {r.label}" + (f" (run {rid} had no checkpoint: restarting)" if rid else ""))


def _log_progress(log, r: RunSpec, rc: int, last: str, log_file: Path, done: int, total: int, t0: float) -> None:
    """One line per finished run: runs done / total, its status, elapsed time and ETA."""
    elapsed = time.time() - t0
    status = "done" if rc == 0 else f"FAILED (exit {rc}): {last[:300]} (whole log: {log_file})"
    log(f"[{done}/{total}] {r.label}: {status}; elapsed {elapsed / 60:.1f} min, "
        f"ETA {elapsed / done * (total - done) / 60:.1f} min")


def _command(sweep: Sweep, r: RunSpec, action: str, rid: str | None, tracking_uri: str,
             checkpoint_dir: str) -> list[str]:
    if action == "resume":
        return ["train", "--resume", rid, "--tracking-uri", tracking_uri, "--quiet", "--checkpoint-dir", checkpoint_dir]
    return r.train_args(sweep, tracking_uri, checkpoint_dir)


def run_ray(sweep: Sweep, items, tracking_uri: str, checkpoint_dir: str, address: str | None,
            cpus_per_run: float, gpus_per_run: float, log=print) -> list[tuple[RunSpec, int]]:
    """Each run is a Ray task (`cpus_per_run` CPUs, `gpus_per_run` GPUs) that runs `qvpo train` on
    whichever node Ray picks, its output in a log file (under --checkpoint-dir on that node)
    attached to its MLflow run. Every node needs qvpo installed at the same path, the tracking URI
    must be reachable from all of them (an `mlflow server`), and --checkpoint-dir should be
    shared storage if interrupted runs are to be resumed on another node."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'qvpo[cluster]'") from None
    if tracking_uri.startswith("sqlite:") and address not in (None, "local"):
        log("warning: a sqlite tracking store is only reachable from this node; give the cluster an "
            "`mlflow server` URI with --tracking-uri")
    try:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    except Exception as e:  # noqa: BLE001 - no cluster at that address, ...
        raise ConfigError(f"cannot connect to Ray at {address!r}: {one_line(e)}") from None

    train_task = ray.remote(run_child)
    todo = [(r, a, rid) for r, a, rid in items if a != "skip"]
    record_layout(sweep, tracking_uri)  # the report's columns and treatment, in the experiment
    pending = {}
    for r, action, rid in todo:
        _log_start(log, r, action, rid)
        ref = train_task.options(num_cpus=cpus_per_run, num_gpus=gpus_per_run).remote(
            _command(sweep, r, action, rid, tracking_uri, checkpoint_dir), log_path(checkpoint_dir, sweep, r),
            tracking_uri, r.identity, sweep.experiment, rid if action == "resume" else None)
        pending[ref] = r
    results, t0 = [], time.time()
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(ref)
            rc, last = ray.get(ref)
            results.append((r, rc))
            _log_progress(log, r, rc, last, log_path(checkpoint_dir, sweep, r), len(results), len(todo), t0)
    finally:
        ray.shutdown()
    return results


def load_spec(path: str, bindings: list[str]) -> Sweep:
    """Parse a sweep spec (gin file) and build its Sweep."""
    from qvpo import config

    config.parse([str(config.find_spec(path))], bindings)
    try:
        return Sweep()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sweep spec {path}: {one_line(e)}") from None

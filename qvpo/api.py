"""One tracked run from Python: `qvpo.run(...)` (the CLI's `qvpo train` and the sweep's children
use it).

It holds a run's whole life cycle: config (gin files, bindings, --algo), building everything
before any MLflow run exists (bad input is a ConfigError then), one MLflow run per seed with the
operative config, run identity and package list, resumable checkpoints, SIGINT/SIGTERM (checkpoint
and stop), artifacts, and what happens when the store fails at the end (the unsent metrics stay
in the checkpoint).

    import qvpo
    out = qvpo.run(["envs/hopper.gin"], ["Trainer.total_steps = 20000"], algo="sac")
    out.run_ids, out.results[0].final_eval
    qvpo.run(resume=out.checkpoint)   # an interrupted run continues where it stopped
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from qvpo.errors import ConfigError, one_line


@dataclass
class RunOutcome:
    """What became of a run: status FINISHED, KILLED (a signal; resume from `checkpoint`),
    FAILED (diverged) or UNSENT (trained, but the store failed at the end: resume from
    `checkpoint` sends the metrics). exit_code is what `qvpo train` exits with."""
    status: str
    exit_code: int
    run_ids: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    results: list = field(default_factory=list)  # qvpo.train.TrainResult per seed (FINISHED only)
    experiment_id: str | None = None
    checkpoint: Path | None = None
    message: str = ""
    tracking_uri: str | None = None  # the store the runs are in


def run(gin_files: list[str] | tuple = (), bindings: list[str] | tuple = (), *, algo: str | None = None,
        env: str | None = None, steps: int | None = None, seed: int | None = None,
        experiment: str | None = None, tracking_uri: str | None = None, device: str | None = None,
        quiet: bool = False, tags: dict[str, str] | None = None, checkpoint_dir: str | Path = "checkpoints",
        resume: str | Path | None = None, handle_signals: bool | None = None,
        observers: list | tuple = ()) -> RunOutcome:
    """Train one agent on one task (one MLflow run per seed) and return the outcome.

    gin_files, bindings, algo: as `qvpo train --gin/--bind/--algo` (with algo, its
    gin/algos/<algo>.gin is parsed first). env, steps, seed, experiment, tracking_uri, device: the
    shorthands (bindings under other names, applied last). resume: an MLflow run id or a
    checkpoint path; the run continues with its own config (only tracking_uri, checkpoint_dir and
    quiet apply: a given tracking_uri replaces the checkpoint's, for a store that moved; the run's
    files stay where its checkpoint is). handle_signals: SIGINT/SIGTERM checkpoint and stop the run
    (None = when called from the main thread, where Python allows signal handlers). observers:
    qvpo.observers.Observer objects the trainer hands its events to (give a resumed run the same
    ones: their state is in its checkpoint; they watch only, the run's identity does not
    include them). Raises
    ConfigError for bad input, before any run exists.
    """
    import gin

    from qvpo import config, identity
    from qvpo.tracking import MlflowTracker, flat_params, run_link, run_tags
    from qvpo.train import Checkpointer, DivergenceError, Interrupted, Trainer

    # 1. config: files, then bindings, then shorthands (all before anything is built); a resumed
    #    run uses the operative config its checkpoint holds
    extra_tags = dict(tags or {})
    if resume is not None and (gin_files or bindings or any(
            v is not None for v in (algo, env, steps, seed, experiment, device))):
        raise ConfigError("--resume continues a run with its own config: drop --gin, --bind and the "
                          "shorthand flags (only --tracking-uri, --checkpoint-dir and --quiet apply)")
    resumed = load_resume(resume, tracking_uri) if resume is not None else None
    if resumed is not None:
        extra = resumed["extra"]
        uri = tracking_uri or extra["tracking_uri"]
        config.parse_text(extra["config"], [f"MlflowTracker.tracking_uri = {uri!r}"]
                          + (["Trainer.progress = False"] if quiet else []))
    else:
        all_bindings = list(bindings) + config.shorthand_bindings(
            env=env, steps=steps, seed=seed, experiment=experiment, tracking_uri=tracking_uri, device=device)
        if quiet:
            all_bindings.append("Trainer.progress = False")
        config.parse(list(gin_files), all_bindings, algo=algo)

    # 2. build envs, buffers and agent (validates every value), check the store: still no run
    trainer = None
    try:
        trainer = Trainer()
        if not isinstance(observers, (list, tuple)):
            raise ConfigError(f"observers must be a list of qvpo.observers.Observer, got a {type(observers).__name__}")
        for observer in observers:
            trainer.add_observer(observer)
        trackers = [MlflowTracker() for _ in trainer.seeds]
        if resumed is not None:
            trainer.load_state_dict(resumed["trainer"])
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        if trainer is not None:
            trainer.close()  # its envs
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(("checkpoint does not fit this run: " if resumed else "") + one_line(e)) from None
    trackers[0].check()
    holding = trainer.checkpoint_every > 0
    for tracker in trackers:
        tracker.hold = holding

    # 3. one MLflow run per seed, with the operative config of everything built above
    algo_name = type(trainer.agent).__name__
    params, config_str = flat_params(), gin.operative_config_str()
    cell = identity.cell_identity()
    planned, built = extra_tags.get(identity.PLANNED_TAG), identity.run_identity(cell, trainer.seeds[0])
    if resumed is None and planned and planned != built:
        trainer.close()
        raise ConfigError(f"this run builds another config than its sweep planned (identity "
                          f"{built}, planned {planned}): was the "
                          f"package or a gin file changed while the sweep ran? Re-run the sweep")
    N = len(trainer.seeds)
    started: list[MlflowTracker] = []
    if handle_signals is None:
        handle_signals = threading.current_thread() is threading.main_thread()
    handlers = _stop_on_signals(trainer) if handle_signals else {}
    out_dirs: list[Path] = []
    ckpt_path = None
    outcome = lambda status, code, **kw: RunOutcome(  # noqa: E731
        status, code, [t.run_id for t in started], list(trainer.seeds), experiment_id=trackers[0].experiment_id,
        checkpoint=ckpt_path, tracking_uri=trackers[0].uri, **kw)
    try:
        if resumed is None:
            for tracker, s in zip(trackers, trainer.seeds):
                tracker.start(
                    run_name=f"{algo_name}-{trainer.env_id}-s{s}",
                    params={**params, "Trainer.seed": str(s)}, config_str=config_str,
                    tags={**run_tags(str(trainer.device)), "algo": algo_name, "env_id": trainer.env_id,
                          "seed": str(s), "seeds_per_process": str(N), **extra_tags,
                          **identity.identity_tags(cell, s), "qvpo.warmup_steps": str(trainer.warmup_steps)})
                started.append(tracker)
            run_dir = Path(checkpoint_dir).resolve() / trackers[0].run_id
        else:
            extra = resumed["extra"]
            for tracker, run_id, pending in zip(trackers, extra["run_ids"], extra["pending"]):
                tracker.resume(run_id, pending, trainer.step)
                started.append(tracker)
            run_dir = Path(extra["run_dir"])
        ckpt_path = run_dir / "state.pt"
        for tracker, s in zip(trackers, trainer.seeds):
            tracker.set_tag("qvpo.checkpoint", str(ckpt_path))
            print(f"MLflow run {tracker.run_id} (seed {s}) in experiment {tracker.experiment!r} at "
                  f"{tracker.uri}" + (f", resumed at env step {trainer.step}" if resumed else "")
                  + f"; in the UI: {run_link(tracker.uri, tracker.experiment_id, tracker.run_id)}", file=sys.stderr)
        out_dirs = [run_dir / f"seed{s}" for s in trainer.seeds]
        checkpointer = Checkpointer(
            ckpt_path,
            extra=lambda: {"config": config_str, "tracking_uri": trackers[0].uri, "run_dir": str(run_dir),
                           "run_ids": [t.run_id for t in trackers], "pending": [t.pending_rows() for t in trackers]},
            committed=lambda step: [t.flush() for t in trackers] if holding else None)
        results = trainer.run([t.log for t in trackers], out_dirs, checkpointer)
        if not all([tracker.flush() for tracker in trackers]):
            # the store failed at the end: keep every unsent metric in a final checkpoint (never
            # delete it), leave the runs unfinished and say how to send them
            checkpointer.save(trainer)
            unsent = sum(len(t.pending_rows()) for t in trackers)
            message = (f"{unsent} metric values could not be sent to {trackers[0].uri}; they are kept in "
                       f"{ckpt_path}. Send them (and finish the run) once the store is back with: "
                       f"qvpo train --resume {ckpt_path}")
            print(f"qvpo: error: {message}", file=sys.stderr)
            return outcome("UNSENT", 1, message=message)
        for tracker, d in zip(trackers, out_dirs):
            if d.exists():
                tracker.log_artifacts(d)
    except Interrupted as stop:
        reason = f"{stop}; resume with: qvpo train --resume {trackers[0].run_id}"
        for tracker in started:
            tracker.end("KILLED", reason, flush=not holding)
        return outcome("KILLED", 128 + stop.signum, message=reason)
    except DivergenceError as e:
        for tracker, d in zip(started, out_dirs or [None] * len(started)):
            _upload_quietly(tracker, d)
            tracker.set_tag("failure_reason", str(e)[:5000])
            tracker.end("FAILED", str(e), flush=not holding)
        message = f"{e} (the last good checkpoint is kept: {ckpt_path})"
        print(f"qvpo: error: {message}", file=sys.stderr)
        return outcome("FAILED", 1, message=message)
    except BaseException as e:
        for tracker, d in zip(started, out_dirs or [None] * len(started)):
            _upload_quietly(tracker, d)
            tracker.end("FAILED", f"{type(e).__name__}: {e}", flush=not holding)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        trainer.close()
    for tracker in trackers:
        tracker.end("FINISHED")
    shutil.rmtree(run_dir, ignore_errors=True)  # uploaded to MLflow; a finished run is not resumed
    ckpt_path = None
    return outcome("FINISHED", 0, results=results)


def load_resume(target: str | Path, tracking_uri: str | None) -> dict:
    """The checkpoint named by --resume: a file path, or an MLflow run id whose tag points to one."""
    from qvpo import checkpoint
    from qvpo.tracking import resolve_tracking_uri

    target = str(target)
    if Path(target).is_file():
        return checkpoint.load(Path(target))
    uri = resolve_tracking_uri(tracking_uri)
    missing = f"--resume {target!r}: no such checkpoint file, and no MLflow run with that id at {uri!r}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(missing)  # (looking would create an empty store)
    try:
        from mlflow.tracking import MlflowClient

        found = MlflowClient(uri).get_run(target)
    except Exception:  # noqa: BLE001 - a missing run or an unusable store
        raise ConfigError(missing) from None
    path = found.data.tags.get("qvpo.checkpoint")
    if found.info.status == "FINISHED":
        raise ConfigError(f"MLflow run {target} has already FINISHED; nothing to resume")
    if not path:
        raise ConfigError(f"MLflow run {target} has no checkpoint (tag qvpo.checkpoint); it cannot be resumed")
    return checkpoint.load(Path(path))


def _stop_on_signals(trainer) -> dict:
    """SIGINT / SIGTERM: the trainer checkpoints and stops at the end of the current env step;
    a second signal stops at once."""
    def handler(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        trainer.stop_signal = signum

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _upload_quietly(tracker, out_dir: Path | None) -> None:
    """Keep what exists (best checkpoint, eval.csv) with a failed run; report, never raise."""
    try:
        if out_dir is not None and out_dir.exists():
            tracker.log_artifacts(out_dir)
    except Exception as e:  # noqa: BLE001
        print(f"qvpo: warning: could not upload artifacts of run {tracker.run_id}: {e}", file=sys.stderr)

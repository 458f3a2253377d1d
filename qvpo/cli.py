"""Command line: `qvpo train ...` and `qvpo ui` (also `python -m qvpo`)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from qvpo.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvpo", description="QVPO and baselines, configured with gin, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one agent on one task (one MLflow run)",
                       description="Parse gin files, then --bind bindings, then the shorthand flags "
                                   "(each one a binding under another name, so they override the files).")
    t.add_argument("--gin", action="append", default=[], metavar="FILE",
                   help="gin file (repeatable; path, or relative to gin/). Default: gin/algos/<algo>.gin")
    t.add_argument("--bind", action="append", default=[], metavar="'Name.param = value'",
                   help="gin binding (repeatable)")
    t.add_argument("--algo", help="algorithm (Trainer.agent); default: the gin files' choice, else qvpo")
    t.add_argument("--env", help="Gymnasium task id (Trainer.env_id), e.g. Hopper-v5")
    t.add_argument("--steps", type=int, help="env steps (Trainer.total_steps)")
    t.add_argument("--seed", type=int, help="seed (Trainer.seed)")
    t.add_argument("--experiment", help="MLflow experiment (MlflowTracker.experiment)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    t.add_argument("--device", help="auto | cpu | cuda (Trainer.device)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 and print links to the runs")
    u.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--experiment", default="qvpo", help="experiment to link to")
    return p


def train(args: argparse.Namespace) -> int:
    import gin

    from qvpo import config
    from qvpo.tracking import MlflowTracker, flat_params, run_tags
    from qvpo.train import Trainer

    # 1. config: files, then bindings, then shorthands (all before anything is built)
    algo = args.algo
    gin_files = args.gin or [f"algos/{algo or 'qvpo'}.gin"]
    bindings = list(args.bind) + config.shorthand_bindings(
        algo=algo, env=args.env, steps=args.steps, seed=args.seed, experiment=args.experiment,
        tracking_uri=args.tracking_uri, device=args.device)
    if args.quiet:
        bindings.append("Trainer.progress = False")
    config.parse(gin_files, bindings)

    # 2. build envs, buffers and agent (validates every value), check the store: still no run
    try:
        trainer = Trainer()
        trackers = [MlflowTracker() for _ in trainer.seeds]
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(config.one_line(e)) from None
    trackers[0].check()

    # 3. one MLflow run per seed, with the operative config of everything built above
    algo_name = type(trainer.agent).__name__
    params, config_str = flat_params(), gin.operative_config_str()
    N = len(trainer.seeds)
    started: list[MlflowTracker] = []
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM ends runs as KILLED
    try:
        with tempfile.TemporaryDirectory(prefix="qvpo-run-") as out:
            out_dirs = [Path(out) / f"seed{seed}" for seed in trainer.seeds]
            for tracker, seed in zip(trackers, trainer.seeds):
                run_id = tracker.start(
                    run_name=f"{algo_name}-{trainer.env_id}-s{seed}",
                    params={**params, "Trainer.seed": str(seed)}, config_str=config_str,
                    tags={**run_tags(str(trainer.device)), "algo": algo_name, "env_id": trainer.env_id,
                          "seed": str(seed), "seeds_per_process": str(N)})
                started.append(tracker)
                print(f"MLflow run {run_id} (seed {seed}) in experiment {tracker.experiment!r} at {tracker.uri}",
                      file=sys.stderr)
            try:
                results = trainer.run([t.log for t in trackers], out_dirs)
            finally:  # what exists (best checkpoint, eval.csv) is kept, also when the run fails
                for tracker, d in zip(started, out_dirs):
                    try:
                        tracker.flush()
                        if d.exists():
                            tracker.log_artifacts(d)
                    except Exception as e:  # noqa: BLE001 - report, and still end the runs
                        print(f"qvpo: warning: could not upload artifacts of run {tracker.run_id}: {e}",
                              file=sys.stderr)
    except KeyboardInterrupt:
        for tracker in started:
            tracker.end("KILLED", "interrupted (SIGINT or SIGTERM)")
            print(f"run_id: {tracker.run_id} (killed)")
        return 130
    except BaseException as e:
        for tracker in started:
            tracker.end("FAILED", f"{type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        trainer.close()
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for tracker, seed, result in zip(trackers, trainer.seeds, results):
        tracker.end("FINISHED")
        if N > 1:
            print(f"seed {seed}:")
        print_curve(result)
        print(f"run_id: {tracker.run_id}")
        print(f"final eval return: {fmt(result.final_eval)}")
        print(f"best eval return: {fmt(result.best_eval)}")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def print_curve(result, max_rows: int = 20) -> None:
    """The evaluation curve as a small table (every k-th evaluation when there are many)."""
    evals = result.evaluations
    if not evals:
        return
    stride = max(1, -(-len(evals) // max_rows))
    rows = evals[::stride] if evals[::stride][-1] is evals[-1] else [*evals[::stride], evals[-1]]
    print(f"{'env steps':>10}  {'eval return':>12}  {'± std':>8}")
    for e in rows:
        bar = "#" * int(round(20 * (e.mean - min(x.mean for x in evals))
                             / max(1e-9, max(x.mean for x in evals) - min(x.mean for x in evals))))
        print(f"{e.step:>10}  {e.mean:>12.1f}  {e.std:>8.1f}  {bar}")


def ui(args: argparse.Namespace) -> int:
    import subprocess

    from qvpo.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    base = f"http://127.0.0.1:{args.port}"
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(args.experiment)
    except Exception:  # noqa: BLE001 - the links are a convenience
        exp = None
    print(f"MLflow UI for {uri} at {base}")
    if exp is not None:
        print(f"  runs table:        {base}/#/experiments/{exp.experiment_id}/runs")
        print(f"  metrics as charts: {base}/#/experiments/{exp.experiment_id}/runs?compareRunsMode=CHART")
    print("  (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": train, "ui": ui}[args.command](args)
    except ConfigError as e:
        print(f"qvpo: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

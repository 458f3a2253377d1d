"""Command line: `qvpo train ...` and `qvpo ui` (also `python -m qvpo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qvpo.errors import ConfigError, one_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvpo", description="QVPO and baselines, configured with gin, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one agent on one task (one MLflow run)",
                       description="Parse gin files, then --bind bindings, then the shorthand flags "
                                   "(each one a binding under another name, so they override the files).")
    t.add_argument("--gin", action="append", default=[], metavar="FILE",
                   help="gin file (repeatable; path, or relative to gin/), parsed after gin/algos/<algo>.gin when "
                        "--algo is given; default: gin/algos/qvpo.gin")
    t.add_argument("--bind", action="append", default=[], metavar="'Name.param = value'",
                   help="gin binding (repeatable)")
    t.add_argument("--algo", help="algorithm: its gin/algos/<algo>.gin is parsed first, so it runs with "
                                        "its own settings; default: the gin files' choice, else qvpo")
    t.add_argument("--env", help="Gymnasium task id (Trainer.env_id), e.g. Hopper-v5")
    t.add_argument("--steps", type=int, help="env steps (Trainer.total_steps)")
    t.add_argument("--seed", type=int, help="seed (Trainer.seed)")
    t.add_argument("--experiment", help="MLflow experiment (MlflowTracker.experiment)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    t.add_argument("--device", help="auto | cpu | cuda (Trainer.device)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", metavar="RUN_ID|PATH",
                   help="continue an interrupted run from its last checkpoint (an MLflow run id, looked up "
                        "in --tracking-uri, or a checkpoint file); its own config is used")
    t.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MLflow run tag (repeatable; the sweep tags its runs this way)")
    t.add_argument("--checkpoint-dir", default="checkpoints",
                   help="where resumable checkpoints and run files live (default: ./checkpoints)")

    w = sub.add_parser("sweep", help="run a sweep spec: (algorithm, task, seed) runs, skipping finished ones",
                       description="Expand a sweep spec (gin, e.g. reproduce/table1/sweep.gin) into one "
                                   "`qvpo train` run per (algorithm, task, seed); finished runs (same config "
                                   "hash) are skipped, interrupted ones resumed from their checkpoints.")
    w.add_argument("spec", help="sweep spec: a gin file, or a shipped spec's name (table1, cpu_scale, ...)")
    w.add_argument("--steps", type=int, help="env steps per run (overrides Sweep.steps)")
    w.add_argument("--seeds", type=int, help="seeds per (algorithm, task) (overrides Sweep.seeds)")
    w.add_argument("--envs", nargs="+", help="tasks (overrides Sweep.envs)")
    w.add_argument("--algos", nargs="+", help="algorithms (overrides Sweep.algos)")
    w.add_argument("--variants", nargs="+", help="run only these of the spec's variants (Sweep.variants)")
    w.add_argument("--bind", action="append", default=[], metavar="'Name.param = value'",
                   help="binding added to every run (repeatable)")
    w.add_argument("--backend", choices=["local", "ray"], default="local")
    w.add_argument("--workers", type=int, default=1, help="runs at once (local backend)")
    w.add_argument("--ray-address", default=None,
                   help="Ray cluster (ray backend): default $RAY_ADDRESS or a running local cluster; "
                        "'local' starts a private one")
    w.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray CPU request per run")
    w.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray GPU request per run (e.g. 0.2: 5 runs per GPU)")
    w.add_argument("--dry-run", action="store_true", help="list the runs and a compute estimate; start nothing")
    w.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    w.add_argument("--checkpoint-dir", default="checkpoints")

    r = sub.add_parser("report", help="build a table with statistics from an experiment's runs")
    r.add_argument("experiment")
    r.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    r.add_argument("--paper", help="the paper's numbers (csv: env,algo,mean,std): a path, or the shipped "
                        "reproduce/table1/paper.csv")
    r.add_argument("--out", default="reports", help="reports go to OUT/<experiment>/")
    r.add_argument("--spec", help="sweep spec (a gin file, or a shipped spec's name) whose Sweep.treatment and "
                                  "column order the report uses; default: those the experiment's sweep recorded "
                                  "in its tags, else QVPO and the paper's order")

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 and print links to the runs")
    u.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--experiment", default="qvpo", help="experiment to link to")
    return p


def train(args: argparse.Namespace) -> int:
    from qvpo.api import run
    from qvpo.tracking import resolve_tracking_uri, run_link

    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value
    out = run(args.gin, args.bind, algo=args.algo, env=args.env, steps=args.steps, seed=args.seed,
              experiment=args.experiment, tracking_uri=args.tracking_uri, device=args.device, quiet=args.quiet,
              tags=tags, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    uri = out.tracking_uri or resolve_tracking_uri(args.tracking_uri)
    if out.status in ("KILLED", "FAILED", "UNSENT"):
        for run_id in out.run_ids:
            print(f"run_id: {run_id} ({out.status.lower()}: {out.message})")
            print(f"in the MLflow UI: {run_link(uri, out.experiment_id, run_id)}")
    if out.status != "FINISHED":
        return out.exit_code
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for run_id, seed, result in zip(out.run_ids, out.seeds, out.results):
        if len(out.seeds) > 1:
            print(f"seed {seed}:")
        print_curve(result)
        print(f"run_id: {run_id}")
        print(f"in the MLflow UI: {run_link(uri, out.experiment_id, run_id)}")
        print(f"final eval return: {fmt(result.final_eval)}")
        print(f"best eval return: {fmt(result.best_eval)}")
    return 0


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

    from qvpo.tracking import local_ui, resolve_tracking_uri, tag_experiment_kind, ui_links

    uri = resolve_tracking_uri(args.tracking_uri)
    base = local_ui(args.port)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(args.experiment)
    except Exception:  # noqa: BLE001 - the links are a convenience
        client, exp = None, None
    try:  # experiments without a kind (made before the tag, or by plain MLflow): model training
        for experiment in client.search_experiments() if client is not None else ():
            tag_experiment_kind(client, experiment)
    except Exception:  # noqa: BLE001 - a read-only store keeps its experiments as they are
        pass
    print(f"MLflow UI for {uri} at {base}")
    if exp is not None:
        for what, link in ui_links(base, exp.experiment_id).items():
            print(f"  {what + ':':19s}{link}")
    print("  (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def sweep(args: argparse.Namespace) -> int:
    from qvpo import sweep as sw
    from qvpo.errors import require_int
    from qvpo.tracking import MlflowTracker, resolve_tracking_uri

    require_int(args.workers, "--workers", 1)
    spec = sw.load_spec(args.spec, [])
    runs = sw.expand(spec, args.steps, args.seeds, args.envs, args.algos, args.bind, args.variants)
    sw.identify(runs)  # builds each cell's config once: bad input stops here, before any run
    uri = resolve_tracking_uri(args.tracking_uri)
    items = sw.plan(runs, sw.existing_runs(uri, spec.experiment))
    counts = {a: sum(1 for _, x, _ in items if x == a) for a in ("new", "resume", "skip")}
    todo = [r for r, a, _ in items if a != "skip"]
    print(f"sweep {spec.name!r}: {len(items)} runs in experiment {spec.experiment!r} at {uri}: "
          f"{counts['new']} to start, {counts['resume']} to resume, {counts['skip']} finished")
    for label, table in (("this machine (CPU)", spec.steps_per_s), ("one GPU", spec.gpu_steps_per_s)):
        hours = sw.estimate_hours(todo, args.workers, table)
        if hours is not None and table:
            when = f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"
            print(f"  estimate on {label}, {args.workers} at a time: {when} "
                  f"(env steps/s per algorithm, from the spec: {table})")
    if args.dry_run:
        for r, action, rid in items:
            print(f"  {action:6s} {r.label:40s} {r.steps:>9d} steps  identity {r.identity}"
                  + (f"  run {rid}" if rid else ""))
        return 0
    MlflowTracker(spec.experiment, uri).check()  # create the store and experiment once, before the workers
    if args.backend == "ray":
        results = sw.run_ray(spec, items, uri, str(Path(args.checkpoint_dir).resolve()), args.ray_address,
                             args.cpus_per_run, args.gpus_per_run)
    else:
        results = sw.run_local(spec, items, uri, args.checkpoint_dir, args.workers)
    failed = [r.label for r, rc in results if rc != 0]
    print(f"sweep {spec.name!r}: {len(results) - len(failed)} runs ended well, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def report(args: argparse.Namespace) -> int:
    from qvpo.config import find_file
    from qvpo.report import build_report
    from qvpo.tracking import resolve_tracking_uri

    paper = find_file(args.paper, "paper table") if args.paper else None  # a path, or a shipped one
    out = build_report(args.experiment, resolve_tracking_uri(args.tracking_uri), paper, Path(args.out),
                       spec=args.spec)
    print((out / "table.md").read_text())
    print(f"report written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": train, "sweep": sweep, "report": report, "ui": ui}[args.command](args)
    except ConfigError as e:
        print(f"qvpo: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

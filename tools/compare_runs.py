"""Compare the metric histories of two sets of runs of one sweep: a re-run against the original.

    python tools/compare_runs.py ORIGINAL_URI RERUN_URI --experiment cpu_scale [--algo QVPO] [--env Hopper-v5]

Runs are matched by (algo, env_id, seed) tags; every metric of the original run except the
timing ones (time/*, perf/*, system/*) is compared step by step, value by value (exact equality:
the question is whether the same command computes the same numbers). Prints one line per run and
the count of identical values; exits 1 if anything differs or a run has no match, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

TIMING = ("time/", "perf/", "system/")  # how fast, not what: never compared


def _runs(client, experiment: str, algo: str | None, env: str | None) -> dict[tuple, object]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment {experiment!r} in {client.tracking_uri}")
    clauses = [f"tags.{k} = '{v}'" for k, v in (("algo", algo), ("env_id", env)) if v]
    found = {}
    for r in client.search_runs([exp.experiment_id], " and ".join(clauses), max_results=10000):
        tags = r.data.tags
        if r.info.status == "FINISHED" and {"algo", "env_id", "seed"} <= tags.keys():
            found[(tags["algo"], tags["env_id"], int(tags["seed"]))] = r
    return found


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def compare(original_uri: str, rerun_uri: str, experiment: str, algo: str | None = None,
            env: str | None = None) -> tuple[list[str], bool]:
    """Lines to print (one per run of the re-run, then a total) and whether everything matched."""
    from mlflow.tracking import MlflowClient

    a_client, b_client = MlflowClient(original_uri), MlflowClient(rerun_uri)
    original, rerun = _runs(a_client, experiment, algo, env), _runs(b_client, experiment, algo, env)
    if not rerun:
        raise LookupError(f"no finished runs in {rerun_uri} experiment {experiment!r} with these tags")
    lines, ok, total, same = [], True, 0, 0
    for key in sorted(rerun):
        label = f"{key[0]} {key[1]} seed {key[2]}"
        if key not in original:
            lines.append(f"{label}: no finished run in the original")
            ok = False
            continue
        a, b = original[key], rerun[key]
        differing, compared = [], sorted(k for k in a.data.metrics if not k.startswith(TIMING))
        for metric in compared:
            ha, hb = _history(a_client, a.info.run_id, metric), _history(b_client, b.info.run_id, metric)
            total += len(ha)
            same += sum(x == y for x, y in zip(ha, hb)) if len(ha) == len(hb) else 0
            if ha != hb:
                differing.append(metric)
        ok = ok and not differing
        lines.append(f"{label}: {len(compared)} metrics compared, differing: {', '.join(differing) or 'none'} "
                     f"(original run {a.info.run_id}, re-run {b.info.run_id})")
    lines.append(f"{same} of {total} logged values identical")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("original_uri")
    p.add_argument("rerun_uri")
    p.add_argument("--experiment", required=True)
    p.add_argument("--algo", help="the algo tag, e.g. QVPO (default: every algorithm)")
    p.add_argument("--env", help="the env_id tag, e.g. Hopper-v5 (default: every task)")
    args = p.parse_args(argv)
    try:
        lines, ok = compare(args.original_uri, args.rerun_uri, args.experiment, args.algo, args.env)
    except LookupError as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

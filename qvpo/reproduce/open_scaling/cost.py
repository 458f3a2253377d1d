"""The cost side of open question 2: time per update and per env step against the action dimension.

For each task of the open_scaling sweep (its real observation and action sizes) and each algorithm
at its reference settings (gin/algos/<algo>.gin): the mean wall time of `--updates` updates on a
filled replay buffer after one warm-up update, the time of one behaviour action (`act`, explore),
and the env's own step time with random actions. One seed, one process, `--threads` threads.
Writes cost.csv and cost.md (with a provenance line) into --out.

    python -m qvpo.reproduce.open_scaling.cost --out qvpo/reproduce/open_scaling/results
"""

from __future__ import annotations

import argparse
import sys
import csv
import time
from pathlib import Path

import gin
import torch

from qvpo.reproduce.costing import filled_buffers, provenance

TASKS = ("Hopper-v5", "Humanoid-v5", "dm_control/humanoid-run-v0", "dm_control/dog-run-v0")
ALGOS = ("qvpo", "sac", "dipo")


def _env(task: str):
    """(obs_dim, action_dim, seconds per env step with random actions) or None if not installable here."""
    from qvpo.envs import env_dims, make_env
    from qvpo.errors import ConfigError

    try:
        env = make_env(task, seed=0)
    except ConfigError as e:
        print(f"skip {task}: {e}")
        return None
    obs_dim, action_dim = env_dims(env)
    env.reset(seed=0)
    steps, t0 = 500, time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    per_step = (time.perf_counter() - t0) / steps
    env.close()
    return obs_dim, action_dim, per_step


def measure(algo: str, obs_dim: int, action_dim: int, updates: int) -> tuple[float, float]:
    """(seconds per update, seconds per behaviour action) of `algo` at its reference settings."""
    from qvpo import config
    from qvpo.agents import agent_class
    from qvpo.agents.base import AgentContext

    gin.clear_config()
    config.parse([f"algos/{algo}.gin"], [])
    agent = agent_class(algo)(AgentContext(obs_dim, action_dim, (0,)))
    buffers = filled_buffers(obs_dim, action_dim)
    agent.update(buffers, 1)  # warm-up: first-call allocations, native build
    t0 = time.perf_counter()
    for step in range(2, updates + 2):
        agent.update(buffers, step)
    per_update = (time.perf_counter() - t0) / updates
    obs = torch.randn(1, 1, obs_dim)
    agent.act(obs, explore=True)
    t0 = time.perf_counter()
    for _ in range(20):
        agent.act(obs, explore=True)
    return per_update, (time.perf_counter() - t0) / 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="open_scaling_cost")
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--algos", nargs="*", default=list(ALGOS))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for task in a.tasks:
        env = _env(task)
        if env is None:
            continue
        obs_dim, action_dim, env_s = env
        for algo in a.algos:
            per_update, per_act = measure(algo, obs_dim, action_dim, a.updates)
            rows.append({"task": task, "obs_dim": obs_dim, "action_dim": action_dim, "algo": algo,
                         "update_ms": round(per_update * 1e3, 1), "act_ms": round(per_act * 1e3, 2),
                         "env_step_ms": round(env_s * 1e3, 3)})
            print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cost.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# open_scaling: cost against the action dimension", "",
             provenance(f"python -m qvpo.reproduce.open_scaling.cost {' '.join(sys.argv[1:] if argv is None else argv)}".strip(),
                        f"{a.updates} updates after one warm-up, each algorithm at gin/algos/<algo>.gin, one seed"), "",
             "| task | obs | |A| | algorithm | ms / update | ms / behaviour action | ms / env step |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['obs_dim']} | {r['action_dim']} | {r['algo']} | {r['update_ms']} | "
              f"{r['act_ms']} | {r['env_step_ms']} |" for r in rows]
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'cost.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

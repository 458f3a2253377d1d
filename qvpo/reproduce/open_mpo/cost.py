"""The cost of open_mpo's weights per update: QVPO's qadv, the MPO E-step over all Nd candidates,
and the E-step with the M-step trust region, at the paper's settings (gin/algos/qvpo.gin) on
Hopper's sizes (11-d observations, 3-d actions), one seed, one process, `--threads` threads.
Each is timed over `--updates` updates on a filled replay buffer after one warm-up update,
`--repeats` times. Writes cost.md (with a provenance line) into --out.

    python -m qvpo.reproduce.open_mpo.cost --out qvpo/reproduce/open_mpo/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gin
import torch

from qvpo.reproduce.costing import filled_buffers, provenance

VARIANTS = {
    "qadv": [],
    "mpo-estep": ["QVPO.q_weight = @MPOEStep()", "QVPO.train_selection = 'all'"],
    "mpo-estep-mstep": ["QVPO.q_weight = @MPOEStep()", "QVPO.train_selection = 'all'",
                        "QVPO.hooks = [@MStepTrustRegion()]"],
}


def seconds_per_update(bindings: list[str], updates: int) -> float:
    from qvpo import config
    from qvpo.agents import agent_class
    from qvpo.agents.base import AgentContext

    gin.clear_config()
    config.parse(["algos/qvpo.gin"], bindings)
    agent = agent_class("qvpo")(AgentContext(11, 3, (0,)))
    buffers = filled_buffers(11, 3)
    agent.update(buffers, 1)  # warm-up: first-call allocations, native build
    t0 = time.perf_counter()
    for step in range(2, updates + 2):
        agent.update(buffers, step)
    return (time.perf_counter() - t0) / updates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="open_mpo_cost")
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    times = {name: [] for name in VARIANTS}
    for _ in range(a.repeats):  # interleaved, so a change of load touches every variant alike
        for name, bindings in VARIANTS.items():
            times[name].append(seconds_per_update(bindings, a.updates))
            print(name, round(times[name][-1], 3), flush=True)
    lines = ["# open_mpo: cost of one update per weight", "",
             provenance(f"python -m qvpo.reproduce.open_mpo.cost {' '.join(sys.argv[1:] if argv is None else argv)}".strip(),
                        f"{a.updates} updates after one warm-up, {a.repeats} repeats interleaved; the paper's "
                        "settings, Hopper's sizes, one seed"), "",
             "| variant | s / update, each repeat | ratio to qadv, each repeat |", "|---|---|---|"]
    for name, ts in times.items():
        ratios = [t / q for t, q in zip(ts, times["qadv"])]
        lines.append(f"| {name} | {' / '.join(f'{t:.2f}' for t in ts)} | {' / '.join(f'{r:.2f}x' for r in ratios)} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'cost.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the reproduce/ folders' cost scripts share (open_scaling/cost.py, open_mpo/cost.py): a
filled replay buffer to time updates on, and the provenance line of the table they write."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch


def random_buffer(obs_dim: int, action_dim: int, n: int = 2048, generator_seed: int = 0, reward: float = 0.0):
    """A replay buffer holding n random transitions of these sizes (normal observations, uniform
    actions in [-1, 1], a constant reward, no terminals), drawn from a generator seeded with
    `generator_seed`: the same data every time (the cost scripts, benchmarks and tests time and
    check updates on it)."""
    from qvpo.buffers import ReplayBuffer

    buf = ReplayBuffer(obs_dim, action_dim, capacity=n)
    g = torch.Generator().manual_seed(generator_seed)
    for _ in range(n):
        buf.add(torch.randn(obs_dim, generator=g), torch.rand(action_dim, generator=g) * 2 - 1, reward,
                torch.randn(obs_dim, generator=g), False)
    return buf


def filled_buffers(obs_dim: int, action_dim: int, n: int = 2048):
    """One seed's replay buffers (seed 0) holding n random transitions of these sizes."""
    from qvpo.buffers import SeedBuffers

    return SeedBuffers([random_buffer(obs_dim, action_dim, n)], [0])


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def provenance(command: str, detail: str) -> str:
    """'Provenance: commit, time, CPU, threads, torch, load; command: `command` (detail); sampler: path.'"""
    from qvpo.native import describe

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"Provenance: commit `{commit or 'unknown'}{' with uncommitted changes' if dirty else ''}`, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({os.cpu_count()} cores), "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, load average at the end {load}; "
            f"command: `{command}` ({detail}); sampler: {describe(where=False)}.")

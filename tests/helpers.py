"""Data builders shared by several test files (seed-dependent, so a seed's data is the same
whether it is built alone or batched with others)."""

from __future__ import annotations

import torch

from qvpo.buffers import ReplayBuffer, SeedBuffers
from qvpo.rollout import Rollout


def filled_buffers(seeds=(0,), obs_dim=3, act_dim=2, n=64) -> SeedBuffers:
    """One replay buffer per seed, holding n random transitions drawn from that seed's generator."""
    bufs = []
    for s in seeds:
        buf = ReplayBuffer(obs_dim, act_dim, capacity=n)
        g = torch.Generator().manual_seed(100 + s)
        for _ in range(n):
            buf.add(torch.randn(obs_dim, generator=g), torch.rand(act_dim, generator=g) * 2 - 1,
                    1.0, torch.randn(obs_dim, generator=g), False)
        bufs.append(buf)
    return SeedBuffers(bufs, list(seeds))


def synthetic_rollout(seeds, T=8, S=3, A=2) -> Rollout:
    """A rollout whose seed k is seed-dependent random data (the same for k alone or batched)."""
    parts = []
    for s in seeds:
        g = torch.Generator().manual_seed(100 + s)
        parts.append(Rollout(torch.randn(T, S, generator=g), torch.randn(T, A, generator=g),
                             -torch.rand(T, generator=g) * 3, torch.randn(T, generator=g),
                             torch.randn(T, generator=g), torch.zeros(T), (torch.arange(T) % 5 == 4).float(),
                             torch.randn(T, generator=g)))
    return Rollout(*(torch.stack(xs) for xs in zip(*parts)))

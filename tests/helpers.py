"""Data builders shared by several test files (seed-dependent, so a seed's data is the same
whether it is built alone or batched with others)."""

from __future__ import annotations

import torch

from qvpo.buffers import SeedBuffers
from qvpo.reproduce.costing import random_buffer
from qvpo.rollout import Rollout


def filled_buffers(seeds=(0,), obs_dim=3, act_dim=2, n=64) -> SeedBuffers:
    """One replay buffer per seed, holding n random transitions drawn from that seed's generator."""
    return SeedBuffers([random_buffer(obs_dim, act_dim, n, generator_seed=100 + s, reward=1.0) for s in seeds],
                       list(seeds))


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

"""Replay buffer for the off-policy agents.

Transitions are stored as float32 tensors on the training device, so a minibatch is an index
gather with no host-to-device copy. `terminal` is the flag the critic target uses:
1 only when the episode *terminated* (a time-limit truncation bootstraps; see train.py).
"""

from __future__ import annotations

from typing import NamedTuple

import gin
import torch

from qvpo.errors import require_int


class Batch(NamedTuple):
    obs: torch.Tensor          # (B, S)
    action: torch.Tensor       # (B, A), in [-1, 1]
    reward: torch.Tensor       # (B,)
    next_obs: torch.Tensor     # (B, S): the real next observation, also on truncation
    terminal: torch.Tensor     # (B,) 1.0 where the episode terminated (no bootstrap)


@gin.configurable
class ReplayBuffer:
    """Circular FIFO buffer.

    Args:
      capacity: transitions kept (QVPO.md: 1,000,000).
    """

    def __init__(self, obs_dim: int, action_dim: int, capacity: int = 1_000_000,
                 device: torch.device | str = "cpu"):
        require_int(capacity, "ReplayBuffer.capacity", 1)
        self.capacity = int(capacity)
        self.device = torch.device(device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.zeros(self.capacity, obs_dim, **f32)
        self.next_obs = torch.zeros(self.capacity, obs_dim, **f32)
        self.action = torch.zeros(self.capacity, action_dim, **f32)
        self.reward = torch.zeros(self.capacity, **f32)
        self.terminal = torch.zeros(self.capacity, **f32)
        self.ptr = 0
        self.size = 0
        self.generator = torch.Generator(device=self.device)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def add(self, obs, action, reward: float, next_obs, terminal: bool) -> None:
        i = self.ptr
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.action[i] = torch.as_tensor(action, dtype=torch.float32)
        self.reward[i] = float(reward)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.terminal[i] = float(terminal)
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator)
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx],
                     self.terminal[idx])

    def __len__(self) -> int:
        return self.size

"""A uniformly random policy: the 0 of the report's normalised scores.

It learns nothing; the sweep runs it for a single evaluation per task and seed, so the random
policy's return is measured under exactly the protocol of the other runs (same envs, same
evaluation episodes, same truncation handling).
"""

from __future__ import annotations

import gin
import torch

from qvpo.agents.base import Agent, AgentContext
from qvpo.rng import EVAL_STREAM, SeedRNG


@gin.configurable(denylist=["context"])
class Random(Agent):
    """Actions uniform in [-1, 1]^A (the env's bounds after rescaling); `update` does nothing."""

    baseline = True

    def __init__(self, context: AgentContext,
                 batch_size: int = 1):
        super().__init__(context)
        self._setup("Random", batch_size, gamma=0.99)
        self.rng = SeedRNG(self.seeds, self.device)
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)

    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        rng = self.rng if explore else self.eval_rng
        return rng.rand(obs.shape[1], self.action_dim) * 2.0 - 1.0

    def begin_evaluation(self, tag: int) -> None:
        self.eval_rng = SeedRNG([s + 7919 * tag for s in self.seeds], self.device, EVAL_STREAM)

    def update(self, buffers, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"seeds": self.seeds, "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        self.rng.load_state_dict(state["rng"])

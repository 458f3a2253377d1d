"""The adaptive entropy weight omega_ent of QVPO (ours; open question 1 of the project's list: the
entropy weight as a hand-set schedule, docs/paper-notes.md#open-questions;
reproduce/open_adaptive_entropy).

Bound as QVPO's schedule (`QVPO.entropy_weight = @AdaptiveEntropyWeight()`): the agent reads
omega from it like from any schedule, and as a hook (qvpo.hooks) it observes the policy's
entropy estimate after every update and moves omega for the next one.
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from qvpo.errors import require
from qvpo.hooks import QVPOHook


@gin.configurable
class AdaptiveEntropyWeight(nn.Module, QVPOHook):
    """omega_ent tuned by dual gradient descent to hold the policy's entropy at a target (ours).

    As SAC tunes its temperature alpha (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and
    Applications", sec. 5): with the loss J(log omega) = log omega * (H - H_target), one step of
    gradient descent is

        log omega <- clamp(log omega - lr * (H - H_target), log min_weight, log max_weight)

    so omega rises while the estimated entropy H is below the target (more weight on the uniform
    rows of QVPO's entropy term) and falls while it is above. Plain SGD on log omega (no Adam
    state): the step is proportional to the gap in nats. State: log omega per seed, (N,), a
    buffer saved with the agent (QVPO.state_dict).

    H is QVPO's Kozachenko-Leonenko estimate (qvpo.entropy.kl_entropy) over the Nd candidates of
    each state, averaged over the minibatch's states, per seed.

    Args:
      target: target entropy in nats per action dimension; the target is target * action_dim.
        Default -1.0 is SAC's -dim(A) heuristic in the same units: the entropy of a uniform
        density on a box of side e^-1 = 0.37 per dimension, i.e. 18% of the action range [-1, 1],
        against log 2 = 0.69 per dimension for the uniform on all of [-1, 1]^d (the maximum).
        The estimator is biased upwards at Nd = 64 for box-bounded densities (about +0.15 nats
        per dimension at d = 6 for the uniform; tests/test_entropy.py): compare targets on its scale.
      lr: step size on log omega per update, per nat of gap (1e-4: a 1-nat gap moves omega by a
        factor e in 10k updates, 1% of a 1M-step run).
      initial: omega at step 0 (0.01: the fixed weight taken as the paper's,
        docs/paper-notes.md#entropy-weight-schedule).
      min_weight, max_weight: bounds on omega (1e-3, 0.1: around the reference decay's 0.002-0.02).
    """

    def __init__(self, target: float = -1.0, lr: float = 1e-4, initial: float = 0.01,
                 min_weight: float = 1e-3, max_weight: float = 0.1):
        super().__init__()
        require(lr > 0, f"AdaptiveEntropyWeight.lr must be > 0, got {lr}")
        require(0 < min_weight <= initial <= max_weight,
                "AdaptiveEntropyWeight needs 0 < min_weight <= initial <= max_weight, got "
                f"min_weight={min_weight}, initial={initial}, max_weight={max_weight}")
        self.target_per_dim, self.lr, self.initial = target, lr, initial
        self.log_min, self.log_max = math.log(min_weight), math.log(max_weight)
        self.action_dim = 1
        self.register_buffer("log_weight", torch.full((1,), math.log(initial)))

    def reset(self, num_seeds: int, action_dim: int) -> None:
        """One log omega per seed, at `initial`; the target scales with action_dim."""
        self.action_dim = action_dim
        self.log_weight = torch.full((num_seeds,), math.log(self.initial), device=self.log_weight.device)

    def attach(self, agent) -> None:
        require(agent.entropy_weight is self, "AdaptiveEntropyWeight is QVPO's omega_ent schedule: bind it as "
                "QVPO.entropy_weight = @AdaptiveEntropyWeight(), not in QVPO.hooks")
        require(agent.estimate_entropy, "an adaptive QVPO.entropy_weight needs QVPO.estimate_entropy = True")
        self.reset(len(agent.seeds), agent.action_dim)
        self.to(agent.device)

    def after_update(self, agent, buffers, step: int, metrics: dict) -> None:
        self.observe(metrics["entropy/estimate"])  # sets omega for the next update

    @property
    def target(self) -> float:
        """The target entropy in nats for the whole action: target per dimension * action_dim."""
        return self.target_per_dim * self.action_dim

    def __call__(self, step: int, total_steps: int) -> torch.Tensor:
        """The current omega per seed, (N,) (step and total_steps unused: the interface of a schedule)."""
        return self.log_weight.exp()

    @torch.no_grad()
    def observe(self, entropy: torch.Tensor) -> None:
        """One dual step from the estimated entropy per seed, (N,) nats."""
        grad = entropy.to(self.log_weight) - self.target  # d J / d log omega
        self.log_weight = (self.log_weight - self.lr * grad).clamp(self.log_min, self.log_max)

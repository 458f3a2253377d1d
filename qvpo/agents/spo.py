"""SPO: Simple Policy Optimization (Xie et al., ICML 2025, arXiv 2401.16025).

PPO with one change: the clipped surrogate is replaced by a penalty on the ratio's deviation
from 1, scaled by |A|, which keeps the gradient alive outside the trust region instead of
zeroing it:

  L_policy = -mean( r A - |A| / (2 eps) (r - 1)^2 ),   r = pi(a|s) / pi_old(a|s).

For fixed A the objective is a concave parabola in r with its optimum at r = 1 + eps sign(A),
exactly PPO's clipping boundary. Everything else (rollouts, GAE, normalisation, value clipping,
minibatches) is PPO's (qvpo/agents/ppo.py). Its settings follow the authors' MuJoCo script
(github MyRepositories-hub/Simple-Policy-Optimization, mujoco/main.py and trainer.py);
gin/algos/spo.gin states them, once, with sources.
"""

from __future__ import annotations

import inspect

import gin
import torch

from qvpo.agents.ppo import PPOBase
from qvpo.errors import require
from qvpo.timing import PhaseTimer


@gin.configurable(denylist=["context"])
class SPO(PPOBase):
    """SPO agent: PPO's machinery with the ratio-deviation penalty (see the module docstring).

    Its settings are the SPO reference's MuJoCo ones (a 2048-step batch in 4 minibatches, 10
    epochs, Adam 3e-4 (PyTorch's eps) annealed linearly, eps = 0.2, its default 7-layer policy
    network 256-256-128-128-64-64 tanh with a 64-64 value network), stated once, with sources,
    in gin/algos/spo.gin: the constructor is PPO's, so built without that file SPO would
    silently run with PPO's settings, and it refuses to. The reference collects the 2048 steps
    as 8 envs x 256 steps; here one env per seed runs 2048 steps (same batch).
    """

    def _check_settings(self) -> None:
        unbound = [p for p in SETTINGS if not _bound(f"SPO.{p}")]
        require(not unbound, f"SPO's settings live in gin/algos/spo.gin ({len(unbound)} of its settings unbound, e.g. SPO.{(unbound or [''])[0]}): "
                "parse it first (`qvpo train --algo spo`, or qvpo.config.parse([], algo='spo'))")

    def policy_loss(self, ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """-mean(r A - |A| (r - 1)^2 / (2 eps)) per seed (`clip_coef` is SPO's eps)."""
        return -(ratio * adv - adv.abs() * (ratio - 1.0).pow(2) / (2.0 * self.clip_coef)).mean(dim=-1)


# the settings spo.gin must bind: every setting of the shared constructor
SETTINGS = tuple(p for p in inspect.signature(PPOBase.__init__).parameters if p not in ("self", "context"))


def _bound(name: str) -> bool:
    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False

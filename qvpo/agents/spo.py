"""SPO: Simple Policy Optimization (Xie et al., ICML 2025, arXiv 2401.16025).

PPO with one change: the clipped surrogate is replaced by a penalty on the ratio's deviation
from 1, scaled by |A|, which keeps the gradient alive outside the trust region instead of
zeroing it:

  L_policy = -mean( r A - |A| / (2 eps) (r - 1)^2 ),   r = pi(a|s) / pi_old(a|s).

For fixed A the objective is a concave parabola in r with its optimum at r = 1 + eps sign(A),
exactly PPO's clipping boundary. Everything else (rollouts, GAE, normalisation, value clipping,
minibatches) is PPO's (qvpo/agents/ppo.py). Defaults follow the authors' MuJoCo script
(github MyRepositories-hub/Simple-Policy-Optimization, mujoco/main.py and trainer.py);
gin/algos/spo.gin restates them with sources.
"""

from __future__ import annotations

import gin
import torch

from qvpo.agents.ppo import PPO
from qvpo.timing import PhaseTimer


@gin.configurable
class SPO(PPO):
    """SPO agent: PPO's machinery with the ratio-deviation penalty (see the module docstring).

    Defaults are the SPO reference's MuJoCo settings: a 2048-step batch in 4 minibatches, 10
    epochs, Adam 3e-4 (PyTorch's eps) annealed linearly, eps = 0.2, and its default 7-layer
    policy network (256-256-128-128-64-64 tanh) with a 64-64 value network. The reference collects
    the 2048 steps as 8 envs x 256 steps; here one env per seed runs 2048 steps (same batch).
    """

    def __init__(self, obs_dim: int, action_dim: int, device: torch.device | str = "cpu",
                 total_steps: int = 1_000_000, timer: PhaseTimer | None = None,
                 seeds: tuple[int, ...] = (0,),
                 rollout_steps: int = 2048,
                 epochs: int = 10,
                 minibatch_size: int = 512,
                 lr: float = 3e-4,
                 anneal_lr: bool = True,
                 adam_eps: float = 1e-8,
                 gamma: float = 0.99,
                 gae_lambda: float = 0.95,
                 clip_coef: float = 0.2,
                 clip_value_loss: bool = True,
                 value_coef: float = 0.5,
                 entropy_coef: float = 0.0,
                 max_grad_norm: float | None = 0.5,
                 normalize_advantages: bool = True,
                 normalize_obs: bool = True,
                 obs_clip: float = 10.0,
                 normalize_reward: bool = True,
                 reward_clip: float = 10.0,
                 actor_hidden: tuple[int, ...] = (256, 256, 128, 128, 64, 64),
                 critic_hidden: tuple[int, ...] = (64, 64),
                 activation: str = "tanh",
                 init_log_std: float = 0.0):
        super().__init__(
            obs_dim, action_dim, device, total_steps, timer, seeds, rollout_steps=rollout_steps,
            epochs=epochs, minibatch_size=minibatch_size, lr=lr, anneal_lr=anneal_lr,
            adam_eps=adam_eps, gamma=gamma, gae_lambda=gae_lambda, clip_coef=clip_coef,
            clip_value_loss=clip_value_loss, value_coef=value_coef, entropy_coef=entropy_coef,
            max_grad_norm=max_grad_norm, normalize_advantages=normalize_advantages,
            normalize_obs=normalize_obs, obs_clip=obs_clip, normalize_reward=normalize_reward,
            reward_clip=reward_clip, actor_hidden=actor_hidden, critic_hidden=critic_hidden,
            activation=activation, init_log_std=init_log_std)

    def policy_loss(self, ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """-mean(r A - |A| (r - 1)^2 / (2 eps)) per seed (`clip_coef` is SPO's eps)."""
        return -(ratio * adv - adv.abs() * (ratio - 1.0).pow(2) / (2.0 * self.clip_coef)).mean(dim=-1)

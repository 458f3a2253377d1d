"""SAC: Soft Actor-Critic with automatic entropy tuning (Haarnoja et al., 2018, "Soft Actor-Critic
Algorithms and Applications", arXiv 1812.05905; Algorithm 1).

One update:
  1. critic: a' ~ pi(.|s'), y = r + gamma (1 - terminal) (min(Q1', Q2')(s', a') - alpha log pi(a'|s'));
     loss = MSE(Q1, y) + MSE(Q2, y).
  2. actor: a ~ pi(.|s) (reparameterised), loss = mean(alpha log pi(a|s) - min(Q1, Q2)(s, a)).
  3. temperature: loss = -mean(log_alpha (log pi(a|s) + target_entropy)), target_entropy = -|A|.
  4. soft update of the target critics, tau = 0.005.
The policy is a tanh-squashed Gaussian; acting in evaluation uses tanh(mean). Every seed of the
process has its own networks, optimiser state, temperature and random stream.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import gin
import torch
import torch.nn.functional as F
from torch import nn

from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import SeedBuffers
from qvpo.errors import require
from qvpo.nets import TwinQ, init_linear, mlp
from qvpo.optim import adam, clip_and_step, frozen, soft_update
from qvpo.rng import SeedRNG, init_generators

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the SAC authors' reference implementation


def tanh_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)) for u ~ N(mean, exp(log_std)^2), summed over action dims.

    The change of variables uses log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), which is exact
    and stays finite where tanh(u) rounds to +-1.
    """
    gauss = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    return gauss - (2 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


class GaussianActor(nn.Module):
    """State -> (mean, log_std) of a Gaussian over pre-tanh actions, one network per seed."""

    def __init__(self, state_dim: int, action_dim: int, generators, hidden: tuple[int, ...], init: str):
        super().__init__()
        self.net = mlp(len(generators), state_dim, tuple(hidden), 2 * action_dim, "relu")
        init_linear(self, generators, scheme=init)

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(s).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, s: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised a = tanh(mean + std * eps) and log pi(a|s): (N, B, A), (N, B)."""
        mean, log_std = self(s)
        u = mean + log_std.exp() * rng.randn(*mean.shape[1:])
        return torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)


@gin.configurable(denylist=["context"])
class SAC(Agent):
    """SAC agent; defaults are the paper's (Haarnoja et al. 2018b, Table 1); gin/algos/sac.gin
    restates them with sources.

    Args:
      warmup_steps: env steps of uniformly random actions before the first update.
      batch_size, gamma, tau: minibatch size, discount, target smoothing coefficient.
      actor_lr, critic_lr, alpha_lr: Adam learning rates (3e-4 each).
      adam_eps: Adam's epsilon (PyTorch's default 1e-8; QVPO's reference uses 1e-5).
      hidden: hidden widths of actor and critics (2 x 256, ReLU).
      target_entropy: None = -|A| (the paper's heuristic).
      init_alpha: initial temperature.
      init: init_linear scheme of the networks ('torch' = PyTorch's default, as the paper's code).
      grad_clip: per-seed gradient-norm clip (None: the paper does not clip).
    """

    def __init__(self, context: AgentContext,
                 warmup_steps: int = 10_000,
                 batch_size: int = 256,
                 gamma: float = 0.99,
                 tau: float = 0.005,
                 actor_lr: float = 3e-4,
                 critic_lr: float = 3e-4,
                 alpha_lr: float = 3e-4,
                 adam_eps: float = 1e-8,
                 hidden: tuple[int, ...] = (256, 256),
                 target_entropy: float | None = None,
                 init_alpha: float = 1.0,
                 init: str = "torch",
                 grad_clip: float | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] = adam):
        super().__init__(context)
        obs_dim, action_dim = context.obs_dim, context.action_dim
        self._setup("SAC", batch_size, gamma, tau, warmup_steps,
                    actor_lr=actor_lr, critic_lr=critic_lr, alpha_lr=alpha_lr)
        require(init_alpha > 0, f"SAC.init_alpha must be > 0, got {init_alpha}")
        self.grad_clip = grad_clip
        self.target_entropy = -float(action_dim) if target_entropy is None else float(target_entropy)

        gens = init_generators(self.seeds)  # actor first, then critics
        self.actor = GaussianActor(obs_dim, action_dim, gens, hidden, init).to(self.device)
        self.critic = TwinQ(obs_dim, action_dim, gens, hidden=tuple(hidden), activation="relu",
                            init=init).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.full((len(self.seeds),), math.log(init_alpha), device=self.device,
                                    requires_grad=True)
        self.actor_opt = optimizer(self.actor.parameters(), lr=actor_lr, eps=adam_eps)
        self.critic_opt = optimizer(self.critic.parameters(), lr=critic_lr, eps=adam_eps)
        self.alpha_opt = optimizer([self.log_alpha], lr=alpha_lr, eps=adam_eps)
        self.rng = SeedRNG(self.seeds, self.device)

    # ---------------------------------------------------------------- acting
    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        if explore:
            return self.actor.sample(obs, self.rng)[0]
        return torch.tanh(self.actor(obs)[0])  # the mean action

    # ---------------------------------------------------------------- learning
    def update(self, buffers: SeedBuffers, step: int) -> dict[str, torch.Tensor | float]:
        timer, b = self.timer, buffers.sample(self.batch_size)
        alpha = self.log_alpha.exp().detach()[:, None]  # (N, 1)
        with timer.phase("critic"):
            with torch.no_grad():  # 1. soft Bellman target
                a2, logp2 = self.actor.sample(b.next_obs, self.rng)
                q_next = self.critic_target.q_min(b.next_obs, a2) - alpha * logp2
                y = b.reward + self.gamma * (1.0 - b.terminal) * q_next
            q1, q2 = self.critic(b.obs, b.action)
            critic_loss = (q1 - y).pow(2).mean(-1) + (q2 - y).pow(2).mean(-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()
            clip_and_step(self.critic_opt, self.grad_clip, norms=False)

        with timer.phase("actor"):  # 2. policy, 3. temperature
            a, logp = self.actor.sample(b.obs, self.rng)
            with frozen(self.critic):  # the actor's gradient flows through Q, not into it
                actor_loss = (alpha * logp - self.critic.q_min(b.obs, a)).mean(-1)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.sum().backward()
            clip_and_step(self.actor_opt, self.grad_clip, norms=False)
            alpha_loss = self.alpha_loss(logp.detach())
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.sum().backward()
            self.alpha_opt.step()
            soft_update(self.critic_target, self.critic, self.tau)  # 4.

        return {
            "loss/critic": critic_loss.detach(), "loss/actor": actor_loss.detach(),
            "loss/alpha": alpha_loss.detach(), "q/mean": q1.detach().mean(-1),
            "q/target_mean": y.mean(-1), "entropy/alpha": alpha[:, 0],
            "entropy/estimate": -logp.detach().mean(-1),
        }

    def alpha_loss(self, logp: torch.Tensor) -> torch.Tensor:
        """Per seed: -mean(log_alpha * (log pi + target_entropy)); alpha rises when the policy's
        entropy -log pi is below the target."""
        return -(self.log_alpha[:, None] * (logp + self.target_entropy)).mean(-1)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"seeds": self.seeds, "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict(), "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name in ("actor", "critic", "critic_target", "actor_opt", "critic_opt", "alpha_opt", "rng"):
            getattr(self, name).load_state_dict(state[name])

"""TD3: Twin Delayed Deep Deterministic policy gradient (Fujimoto et al., ICML 2018, arXiv
1802.09477; Algorithm 1).

One update:
  1. critic: target policy smoothing, a' = clip(pi'(s') + clip(N(0, sigma~), -c, c), -1, 1);
     y = r + gamma (1 - terminal) min(Q1', Q2')(s', a'); loss = MSE(Q1, y) + MSE(Q2, y).
  2. every `policy_delay` updates: actor loss = -mean Q1(s, pi(s)), then soft updates of the
     target actor and target critics (tau).
Acting: pi(s) + N(0, sigma) clipped to [-1, 1] while exploring, pi(s) when evaluating.
"""

from __future__ import annotations

import copy
from typing import Callable

import gin
import torch
from torch import nn

from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import Batch, SeedBuffers
from qvpo.errors import require, require_int
from qvpo.nets import TwinQ, init_linear, mlp
from qvpo.optim import adam, clip_and_step, frozen, soft_update
from qvpo.rng import SeedRNG, init_generators


class DeterministicActor(nn.Module):
    """State -> tanh action in [-1, 1], one network per seed."""

    def __init__(self, state_dim: int, action_dim: int, generators, hidden: tuple[int, ...], init: str):
        super().__init__()
        self.net = mlp(len(generators), state_dim, tuple(hidden), action_dim, "relu")
        init_linear(self, generators, scheme=init)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(s))


@gin.configurable(denylist=["context"])
class TD3(Agent):
    """TD3 agent; defaults are the authors' reference implementation (sfujim/TD3, main.py and
    TD3.py), which updated the paper's Table 3 (lr 1e-3, 400-300 nets, batch 100) to the values
    below; gin/algos/td3.gin restates them with sources.

    Args:
      warmup_steps: env steps of uniformly random actions before the first update.
      batch_size, gamma, tau: minibatch size, discount, target update rate.
      actor_lr, critic_lr: Adam learning rates.
      hidden: hidden widths of actor and critics (ReLU).
      exploration_noise: std of the Gaussian noise added when acting (actions in [-1, 1]).
      policy_noise, noise_clip: target policy smoothing noise std and its clip.
      policy_delay: critic updates per actor (and target) update.
      init: init_linear scheme ('torch' = PyTorch's default, as the reference code).
    """

    def __init__(self, context: AgentContext,
                 warmup_steps: int = 25_000,
                 batch_size: int = 256,
                 gamma: float = 0.99,
                 tau: float = 0.005,
                 actor_lr: float = 3e-4,
                 critic_lr: float = 3e-4,
                 adam_eps: float = 1e-8,
                 hidden: tuple[int, ...] = (256, 256),
                 exploration_noise: float = 0.1,
                 policy_noise: float = 0.2,
                 noise_clip: float = 0.5,
                 policy_delay: int = 2,
                 init: str = "torch",
                 grad_clip: float | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] = adam):
        super().__init__(context)
        obs_dim, action_dim = context.obs_dim, context.action_dim
        self._setup("TD3", batch_size, gamma, tau, warmup_steps,
                    actor_lr=actor_lr, critic_lr=critic_lr)
        require_int(policy_delay, "TD3.policy_delay", 1)
        require(min(exploration_noise, policy_noise, noise_clip) >= 0, "TD3 noise scales must be >= 0")
        self.grad_clip = grad_clip
        self.exploration_noise, self.policy_noise, self.noise_clip = exploration_noise, policy_noise, noise_clip
        self.policy_delay = policy_delay
        self.updates = 0

        gens = init_generators(self.seeds)  # actor first, then critics
        self.actor = DeterministicActor(obs_dim, action_dim, gens, hidden, init).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinQ(obs_dim, action_dim, gens, hidden=tuple(hidden), activation="relu",
                            init=init).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = optimizer(self.actor.parameters(), lr=actor_lr, eps=adam_eps)
        self.critic_opt = optimizer(self.critic.parameters(), lr=critic_lr, eps=adam_eps)
        self.rng = SeedRNG(self.seeds, self.device)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        a = self.actor(obs)
        if explore:
            a = (a + self.exploration_noise * self.rng.randn(*a.shape[1:])).clamp(-1.0, 1.0)
        return a

    @torch.no_grad()
    def target_action(self, next_obs: torch.Tensor) -> torch.Tensor:
        """Target policy smoothing: pi'(s') + clip(N(0, policy_noise), -noise_clip, noise_clip), in [-1, 1]."""
        a = self.actor_target(next_obs)
        noise = (self.policy_noise * self.rng.randn(*a.shape[1:])).clamp(-self.noise_clip, self.noise_clip)
        return (a + noise).clamp(-1.0, 1.0)

    @torch.no_grad()
    def td_target(self, b: Batch) -> torch.Tensor:
        q_next = self.critic_target.q_min(b.next_obs, self.target_action(b.next_obs))
        return b.reward + self.gamma * (1.0 - b.terminal) * q_next

    def update(self, buffers: SeedBuffers, step: int) -> dict[str, torch.Tensor | float]:
        timer, b = self.timer, buffers.sample(self.batch_size)
        self.updates += 1
        with timer.phase("critic"):
            y = self.td_target(b)
            q1, q2 = self.critic(b.obs, b.action)
            critic_loss = (q1 - y).pow(2).mean(-1) + (q2 - y).pow(2).mean(-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()
            clip_and_step(self.critic_opt, self.grad_clip, norms=False)
        metrics = {"loss/critic": critic_loss.detach(), "q/mean": q1.detach().mean(-1),
                   "q/target_mean": y.mean(-1)}
        if self.updates % self.policy_delay == 0:  # delayed actor and target updates
            with timer.phase("actor"):
                with frozen(self.critic):  # gradient through Q1 into the actor only
                    q1_pi = self.critic.q1(torch.cat([b.obs, self.actor(b.obs)], dim=-1)).squeeze(-1)
                actor_loss = -q1_pi.mean(-1)
                self.actor_opt.zero_grad(set_to_none=True)
                actor_loss.sum().backward()
                clip_and_step(self.actor_opt, self.grad_clip, norms=False)
                soft_update(self.actor_target, self.actor, self.tau)
                soft_update(self.critic_target, self.critic, self.tau)
            metrics["loss/actor"] = actor_loss.detach()
        return metrics

    def state_dict(self) -> dict:
        return {"seeds": self.seeds, "updates": self.updates, "actor": self.actor.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seeds, self.updates = list(state["seeds"]), state["updates"]
        for name in ("actor", "actor_target", "critic", "critic_target", "actor_opt", "critic_opt", "rng"):
            getattr(self, name).load_state_dict(state[name])

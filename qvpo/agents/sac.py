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

On a task with n discrete actions (context.discrete_actions = n) SAC takes its discrete form,
SAC-Discrete (Christodoulou 2019, "Soft Actor-Critic for Discrete Action Settings", arXiv
1910.07207): a categorical policy pi(.|s) (logits from an MLP, `CategoricalActor`) and twin critics
Q(s) in R^n, one output per action (`DiscreteTwinQ`). Every expectation over actions is then a sum:
  1. y = r + gamma (1 - terminal) V'(s'),  V'(s') = sum_a pi(a|s') [min(Q1', Q2')(s', a) - alpha log pi(a|s')];
     the critics regress Q_i(s, a) of the stored action a (the argmax of its [-1, 1]^n vector) on y;
  2. actor: loss = mean_s sum_a pi(a|s) [alpha log pi(a|s) - min(Q1, Q2)(s, a)]  (Q held fixed);
  3. temperature: as above with log pi(a|s) replaced by its expectation sum_a pi log pi = -H(pi(.|s)),
     target_entropy = 0.98 log n (the paper's choice, its authors' code: 98% of the uniform
     policy's entropy);
  4. as above.
Exploration samples a ~ pi, evaluation takes argmax pi; the env receives a's vector in [-1, 1]^n
(qvpo/agents/discrete.py). The update draws no random numbers.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import gin
import torch
import torch.nn.functional as F
from torch import nn

from qvpo.agents import discrete
from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import SeedBuffers
from qvpo.errors import require
from qvpo.nets import TwinQ, init_linear, mlp
from qvpo.optim import adam, clip_and_step, frozen, soft_update
from qvpo.rng import SeedRNG, init_generators

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the SAC authors' reference implementation
DISCRETE_TARGET_ENTROPY = 0.98  # x log n: SAC-Discrete's target entropy (Christodoulou 2019)


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

    def act(self, s: torch.Tensor, explore: bool, rng: SeedRNG) -> torch.Tensor:
        return self.sample(s, rng)[0] if explore else torch.tanh(self(s)[0])  # evaluation: the mean action

    # The two expectations over a ~ pi(.|s) of an update, estimated with one reparameterised sample.
    def soft_value(self, s: torch.Tensor, critic: TwinQ, alpha: torch.Tensor, rng: SeedRNG) -> torch.Tensor:
        """V(s) = E_a[min Q(s, a) - alpha log pi(a|s)], (N, B)."""
        a, logp = self.sample(s, rng)
        return critic.q_min(s, a) - alpha * logp

    def policy_loss(self, s: torch.Tensor, critic: TwinQ, alpha: torch.Tensor,
                    rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """mean_s E_a[alpha log pi(a|s) - min Q(s, a)] per seed (N,), and log pi(a|s) (N, B)."""
        a, logp = self.sample(s, rng)
        return (alpha * logp - critic.q_min(s, a)).mean(-1), logp


class CategoricalActor(nn.Module):
    """State -> logits of a categorical policy over n discrete actions, one network per seed
    (SAC-Discrete). Same interface as GaussianActor; the expectations over actions are exact sums."""

    def __init__(self, state_dim: int, n: int, generators, hidden: tuple[int, ...], init: str):
        super().__init__()
        self.n = n
        self.net = mlp(len(generators), state_dim, tuple(hidden), n, "relu")
        init_linear(self, generators, scheme=init)

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pi(.|s) and log pi(.|s), each (N, B, n)."""
        log_p = self.net(s).log_softmax(dim=-1)
        return log_p.exp(), log_p

    def act(self, s: torch.Tensor, explore: bool, rng: SeedRNG) -> torch.Tensor:
        """a ~ pi(.|s) (explore) or argmax pi(.|s), as its vector in [-1, 1]^n: (N, M, n)."""
        logits = self.net(s)
        index = discrete.sample_index(logits, rng) if explore else logits.argmax(dim=-1)
        return discrete.to_vector(index, self.n)

    def soft_value(self, s: torch.Tensor, critic: "DiscreteTwinQ", alpha: torch.Tensor,
                   rng: SeedRNG) -> torch.Tensor:
        """V(s) = sum_a pi(a|s) [min Q(s, a) - alpha log pi(a|s)], (N, B)."""
        p, log_p = self(s)
        return (p * (critic.q_min_all(s) - alpha[..., None] * log_p)).sum(-1)

    def policy_loss(self, s: torch.Tensor, critic: "DiscreteTwinQ", alpha: torch.Tensor,
                    rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """mean_s sum_a pi(a|s) [alpha log pi(a|s) - min Q(s, a)] per seed (N,), and
        E_a[log pi(a|s)] = -H(pi(.|s)) (N, B) for the temperature."""
        p, log_p = self(s)
        with torch.no_grad():
            q = critic.q_min_all(s)
        loss = (p * (alpha[..., None] * log_p - q)).sum(-1).mean(-1)
        return loss, (p * log_p).sum(-1)


class DiscreteTwinQ(nn.Module):
    """Twin critics s -> (Q(s, a))_a in R^n, one pair per seed (SAC-Discrete). Same interface as
    TwinQ for stored actions: `forward` / `q_min` take the actions' [-1, 1]^n vectors and read the
    value at their argmax (the action the env played)."""

    def __init__(self, state_dim: int, n: int, generators, hidden: tuple[int, ...], init: str):
        super().__init__()
        N = len(generators)
        self.q1 = mlp(N, state_dim, tuple(hidden), n, "relu")
        self.q2 = mlp(N, state_dim, tuple(hidden), n, "relu")
        init_linear(self, generators, scheme=init)

    def q_all(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s (N, R, S) -> Q1, Q2 of every action, each (N, R, n)."""
        return self.q1(s), self.q2(s)

    def q_min_all(self, s: torch.Tensor) -> torch.Tensor:
        return torch.minimum(*self.q_all(s))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s (N, R, S), action vectors a (N, R, n) -> Q1, Q2 at argmax a, each (N, R)."""
        index = discrete.to_index(a)[..., None]
        q1, q2 = self.q_all(s)
        return q1.gather(-1, index).squeeze(-1), q2.gather(-1, index).squeeze(-1)

    def q_min(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.minimum(*self(s, a))


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
      target_entropy: None = -|A| (the paper's heuristic); on a discrete task (SAC-Discrete)
        None = 0.98 log n (Christodoulou 2019).
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
        n = self.discrete_actions
        if target_entropy is None:  # the papers' defaults
            target_entropy = -float(action_dim) if n is None else DISCRETE_TARGET_ENTROPY * math.log(n)
        self.target_entropy = float(target_entropy)

        gens = init_generators(self.seeds)  # actor first, then critics
        if n is None:
            self.actor = GaussianActor(obs_dim, action_dim, gens, hidden, init).to(self.device)
            self.critic = TwinQ(obs_dim, action_dim, gens, hidden=tuple(hidden), activation="relu",
                                init=init).to(self.device)
        else:  # SAC-Discrete: the same update with exact sums over the n actions
            self.actor = CategoricalActor(obs_dim, n, gens, hidden, init).to(self.device)
            self.critic = DiscreteTwinQ(obs_dim, n, gens, hidden, init).to(self.device)
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
        return self.actor.act(obs, explore, self.rng)

    @property
    def has_q_critic(self) -> bool:
        """Both forms: `q_estimate` is min(Q1, Q2)(s, a), at the action's argmax on a discrete task."""
        return True

    # ---------------------------------------------------------------- learning
    def update(self, buffers: SeedBuffers, step: int) -> dict[str, torch.Tensor | float]:
        timer, b = self.timer, buffers.sample(self.batch_size)
        alpha = self.log_alpha.exp().detach()[:, None]  # (N, 1)
        with timer.phase("critic"):
            with torch.no_grad():  # 1. soft Bellman target
                q_next = self.actor.soft_value(b.next_obs, self.critic_target, alpha, self.rng)
                y = b.reward + self.gamma * (1.0 - b.terminal) * q_next
            q1, q2 = self.critic(b.obs, b.action)
            critic_loss = (q1 - y).pow(2).mean(-1) + (q2 - y).pow(2).mean(-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()
            clip_and_step(self.critic_opt, self.grad_clip, norms=False)

        with timer.phase("actor"):  # 2. policy, 3. temperature
            with frozen(self.critic):  # the actor's gradient flows through Q, not into it
                actor_loss, logp = self.actor.policy_loss(b.obs, self.critic, alpha, self.rng)
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
        entropy -log pi is below the target. (Discrete: logp = E_a log pi(a|s), the paper's eq. 11.)"""
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

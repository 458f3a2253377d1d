"""PPO: Proximal Policy Optimization with the clipped surrogate (Schulman et al., 2017,
arXiv 1707.06347, Algorithm 1), with the continuous-control settings of its MuJoCo experiments
(Table 3) and the implementation details of OpenAI baselines' ppo2 that the MuJoCo results rely
on (observation and reward normalisation, advantage normalisation, value clipping, orthogonal
init, learning-rate annealing, gradient clipping; listed in Huang et al. 2022, "The 37
implementation details of PPO").

Each iteration:
  1. collect `rollout_steps` env steps with pi_old (the trainer's on-policy loop), storing
     log pi_old(a|s) and V_old(s);
  2. advantages by GAE(gamma, lambda) (qvpo/rollout.py), returns R = A + V_old;
  3. `epochs` passes over the rollout in shuffled minibatches of `minibatch_size`:
       r = pi(a|s) / pi_old(a|s),  A normalised per minibatch,
       L_policy = -mean(min(r A, clip(r, 1 - eps, 1 + eps) A))        (policy_loss; SPO overrides it)
       L_value  = 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))
       L = L_policy + c1 L_value - c2 entropy;  one Adam step, gradient norm clipped.
The policy is a Gaussian with a state-independent log-std; the env receives the action clipped
to [-1, 1] (the rollout keeps the unclipped sample, whose log-probability the ratio needs).
Evaluation acts with the mean. Every seed has its own networks, statistics and random stream.

On a task with n discrete actions (context.discrete_actions = n) the policy is categorical, as in
the PPO paper's Atari experiments: logits from an MLP of the mean network's shape and init (gain
0.01 on the output), log pi and the entropy of the categorical (`CategoricalPolicyValue`);
exploration samples, evaluation takes the argmax. The env and the rollout get the action as its
vector in [-1, 1]^n (+1 at the action, -1 elsewhere; qvpo/agents/discrete.py), the update reads the
index back as its argmax. SPO shares this.
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from qvpo.agents import discrete
from qvpo.agents.base import AgentContext, OnPolicyAgent
from qvpo.errors import require, require_int
from qvpo.nets import mlp, orthogonal_init
from qvpo.normalize import ObsNormalizer, RewardScaler
from qvpo.optim import clip_and_step
from qvpo.rng import SeedRNG, init_generators
from qvpo.rollout import Rollout, gae

LOG_2PI = math.log(2 * math.pi)


class GaussianPolicyValue(nn.Module):
    """Separate policy-mean and value MLPs (tanh) and a state-independent log-std, per seed."""

    def __init__(self, obs_dim: int, action_dim: int, generators, actor_hidden, critic_hidden,
                 activation: str, init_log_std: float):
        super().__init__()
        N = len(generators)
        self.actor_mean = mlp(N, obs_dim, tuple(actor_hidden), action_dim, activation)
        self.critic = mlp(N, obs_dim, tuple(critic_hidden), 1, activation)
        self.log_std = nn.Parameter(torch.full((N, 1, action_dim), float(init_log_std)))
        orthogonal_init(self.actor_mean, generators, hidden_gain=math.sqrt(2), out_gain=0.01)
        orthogonal_init(self.critic, generators, hidden_gain=math.sqrt(2), out_gain=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def log_prob_entropy(self, obs: torch.Tensor, action: torch.Tensor):
        """log pi(a|s) (N, B), entropy (N, B), and the mean (N, B, A)."""
        mean = self.actor_mean(obs)
        return gaussian_log_prob(mean, self.log_std, action), self.entropy(mean), mean

    def entropy(self, mean: torch.Tensor) -> torch.Tensor:
        return (0.5 + 0.5 * LOG_2PI + self.log_std.expand_as(mean)).sum(-1)

    def act(self, obs: torch.Tensor, explore: bool, rng: SeedRNG) -> torch.Tensor:
        """(Normalised) obs (N, M, S) -> env actions (N, M, A): a sample or the mean, clipped."""
        mean = self.actor_mean(obs)
        if explore:
            mean = mean + self.log_std.exp() * rng.randn(*mean.shape[1:])
        return mean.clamp(-1.0, 1.0)

    def sample(self, obs: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs (N, 1, S) -> the sample the rollout stores (N, 1, A), the env's action (the sample
        clipped to [-1, 1]), log pi(sample) (N, 1)."""
        mean = self.actor_mean(obs)
        action = mean + self.log_std.exp() * rng.randn(1, mean.shape[-1])
        return action, action.clamp(-1.0, 1.0), gaussian_log_prob(mean, self.log_std, action)

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"ppo/policy_std": self.log_std.detach().exp().mean(dim=(1, 2))}


class CategoricalPolicyValue(nn.Module):
    """The discrete form: a logits MLP over n actions (the mean network's shape, activation and
    init) and the value MLP, per seed. Actions are [-1, 1]^n vectors (qvpo/agents/discrete.py)."""

    def __init__(self, obs_dim: int, n: int, generators, actor_hidden, critic_hidden, activation: str):
        super().__init__()
        N = len(generators)
        self.n = n
        self.actor_logits = mlp(N, obs_dim, tuple(actor_hidden), n, activation)
        self.critic = mlp(N, obs_dim, tuple(critic_hidden), 1, activation)
        orthogonal_init(self.actor_logits, generators, hidden_gain=math.sqrt(2), out_gain=0.01)
        orthogonal_init(self.critic, generators, hidden_gain=math.sqrt(2), out_gain=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def log_prob_entropy(self, obs: torch.Tensor, action: torch.Tensor):
        """log pi(argmax action|s) (N, B), entropy (N, B), and the logits (N, B, n)."""
        logits = self.actor_logits(obs)
        return (*discrete.log_prob_entropy(logits, discrete.to_index(action)), logits)

    def act(self, obs: torch.Tensor, explore: bool, rng: SeedRNG) -> torch.Tensor:
        """(Normalised) obs (N, M, S) -> a ~ pi (explore) or argmax pi, as vectors (N, M, n)."""
        logits = self.actor_logits(obs)
        index = discrete.sample_index(logits, rng) if explore else logits.argmax(dim=-1)
        return discrete.to_vector(index, self.n)

    def sample(self, obs: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs (N, 1, S) -> a ~ pi as its vector (N, 1, n) (stored and played), log pi(a) (N, 1)."""
        logits = self.actor_logits(obs)
        index = discrete.sample_index(logits, rng)
        vector = discrete.to_vector(index, self.n)
        return vector, vector, discrete.log_prob_entropy(logits, index)[0]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {}  # the policy's spread is `entropy/estimate`


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log N(action; mean, exp(log_std)^2), summed over action dims."""
    log_std = log_std.expand_as(mean)
    return (-0.5 * ((action - mean) / log_std.exp()).pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


class PPOBase(OnPolicyAgent):
    """The machinery PPO and SPO share (rollouts, GAE, normalisation, value clipping, minibatch
    epochs), with PPO's clipped surrogate as `policy_loss`. Its defaults are the PPO paper's
    MuJoCo settings (Table 3) and baselines' ppo2 details; gin/algos/ppo.gin restates them with
    sources. Not a gin configurable itself: `PPO` and `SPO` are.

    Args:
      rollout_steps: env steps per seed per iteration (Table 3: horizon T = 2048).
      epochs, minibatch_size: passes over the rollout and minibatch size (Table 3: 10, 64).
      lr, anneal_lr: Adam step size (Table 3: 3e-4), linearly annealed to 0 over the run (ppo2).
      adam_eps: Adam's epsilon (ppo2: 1e-5).
      gamma, gae_lambda: discount and GAE lambda (Table 3: 0.99, 0.95).
      clip_coef: the clipping epsilon (Table 3: 0.2); also the value-clipping range (ppo2).
      clip_value_loss: clip the value update around V_old (ppo2).
      value_coef, entropy_coef: c1, c2 (ppo2 MuJoCo: 0.5, 0.0).
      max_grad_norm: per-seed gradient-norm clip (ppo2: 0.5).
      normalize_advantages: per-minibatch advantage normalisation (ppo2).
      normalize_obs, obs_clip: running observation normalisation, clipped to +-10 (VecNormalize).
      normalize_reward, reward_clip: reward scaling by the return's std, clipped to +-10.
      actor_hidden, critic_hidden, activation: separate 64-64 tanh networks (paper, section 6.1).
      init_log_std: initial log-std of the Gaussian (ppo2: 0; unused on a discrete task).
    """

    def __init__(self, context: AgentContext,
                 rollout_steps: int = 2048,
                 epochs: int = 10,
                 minibatch_size: int = 64,
                 lr: float = 3e-4,
                 anneal_lr: bool = True,
                 adam_eps: float = 1e-5,
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
                 actor_hidden: tuple[int, ...] = (64, 64),
                 critic_hidden: tuple[int, ...] = (64, 64),
                 activation: str = "tanh",
                 init_log_std: float = 0.0):
        name = type(self).__name__
        self._check_settings()
        super().__init__(context)
        obs_dim, action_dim = context.obs_dim, context.action_dim
        self._setup(name, minibatch_size, gamma, lr=lr)
        require_int(rollout_steps, f"{name}.rollout_steps (env steps)", 1)
        require_int(epochs, f"{name}.epochs", 1)
        require(minibatch_size >= 2 or not normalize_advantages,
                f"{name}.minibatch_size must be >= 2 to normalise advantages per minibatch, got {minibatch_size}")
        require(rollout_steps % minibatch_size == 0,
                f"{name}.minibatch_size ({minibatch_size}) must divide {name}.rollout_steps ({rollout_steps})")
        require(0 <= gae_lambda <= 1, f"{name}.gae_lambda must be in [0, 1], got {gae_lambda}")
        require(clip_coef > 0, f"{name}.clip_coef must be > 0, got {clip_coef}")
        self.rollout_steps, self.epochs, self.minibatch_size = rollout_steps, epochs, minibatch_size
        self.lr, self.anneal_lr, self.gae_lambda = lr, anneal_lr, gae_lambda
        self.clip_coef, self.clip_value_loss = clip_coef, clip_value_loss
        self.value_coef, self.entropy_coef, self.max_grad_norm = value_coef, entropy_coef, max_grad_norm
        self.normalize_advantages = normalize_advantages
        self.num_iterations = max(1, self.total_steps // rollout_steps)  # for the lr annealing
        self.iteration = 0

        N = len(self.seeds)
        if self.discrete_actions is None:
            self.net = GaussianPolicyValue(obs_dim, action_dim, init_generators(self.seeds), actor_hidden,
                                           critic_hidden, activation, init_log_std).to(self.device)
        else:  # the discrete form: a categorical policy
            self.net = CategoricalPolicyValue(obs_dim, self.discrete_actions, init_generators(self.seeds),
                                              actor_hidden, critic_hidden, activation).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, eps=adam_eps)
        self.obs_norm = ObsNormalizer(N, obs_dim, self.device, obs_clip) if normalize_obs else None
        self.reward_scaler = RewardScaler(N, gamma, self.device, reward_clip) if normalize_reward else None
        self.rng = SeedRNG(self.seeds, self.device)

    def _check_settings(self) -> None:
        """Subclasses whose settings live only in their gin file check it was parsed (SPO)."""

    # ---------------------------------------------------------------- acting
    def _normalize(self, obs: torch.Tensor, update: bool) -> torch.Tensor:
        return self.obs_norm(obs, update) if self.obs_norm is not None else obs

    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        return self.net.act(self._normalize(obs, update=False), explore, self.rng)

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self._normalize(obs[:, None], update=True)             # (N, 1, S)
        action, env_action, log_prob = self.net.sample(z, self.rng)
        return {"env_action": env_action[:, 0], "obs": z[:, 0], "action": action[:, 0],
                "log_prob": log_prob[:, 0], "value": self.net.value(z)[:, 0]}

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net.value(self._normalize(obs[:, None], update=False))[:, 0]

    # ---------------------------------------------------------------- learning
    def policy_loss(self, ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """PPO's clipped surrogate, negated, per seed: -mean(min(r A, clip(r, 1-eps, 1+eps) A))."""
        clipped = ratio.clamp(1.0 - self.clip_coef, 1.0 + self.clip_coef)
        return -torch.min(ratio * adv, clipped * adv).mean(dim=-1)

    def value_loss(self, v: torch.Tensor, v_old: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        """0.5 mean((V - R)^2), or with the update clipped around V_old (ppo2), per seed."""
        if not self.clip_value_loss:
            return 0.5 * (v - returns).pow(2).mean(dim=-1)
        v_clipped = v_old + (v - v_old).clamp(-self.clip_coef, self.clip_coef)
        return 0.5 * torch.max((v - returns).pow(2), (v_clipped - returns).pow(2)).mean(dim=-1)

    def advantages(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and returns (N, T), on the scaled rewards."""
        rewards = rollout.reward
        if self.reward_scaler is not None:
            rewards = self.reward_scaler(rewards, rollout.done)
        adv = gae(rewards, rollout.value, rollout.next_value, rollout.terminal, rollout.done,
                  self.gamma, self.gae_lambda)
        return adv, adv + rollout.value

    def update(self, rollout: Rollout, step: int) -> dict[str, torch.Tensor | float]:
        timer = self.timer
        with timer.phase("actor"), torch.no_grad():  # 2. advantages
            adv, returns = self.advantages(rollout)
        lr = self.lr * (1.0 - self.iteration / self.num_iterations) if self.anneal_lr else self.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.iteration += 1

        N, T = rollout.reward.shape
        M = self.minibatch_size
        sums: dict[str, torch.Tensor] = {}
        with timer.phase("actor"):
            for _ in range(self.epochs):  # 3.
                order = self.rng.rand(T).argsort(dim=-1)  # (N, T): one permutation per seed
                for start in range(0, T, M):
                    idx = order[:, start:start + M]
                    mb = [_take(x, idx) for x in (rollout.obs, rollout.action, rollout.log_prob,
                                                  rollout.value, adv, returns)]
                    obs, action, log_prob_old, v_old, mb_adv, mb_ret = mb
                    log_prob, entropy, _ = self.net.log_prob_entropy(obs, action)
                    log_ratio = log_prob - log_prob_old
                    ratio = log_ratio.exp()
                    if self.normalize_advantages:
                        mb_adv = (mb_adv - mb_adv.mean(-1, keepdim=True)) / (mb_adv.std(-1, keepdim=True) + 1e-8)
                    pg_loss = self.policy_loss(ratio, mb_adv)
                    v_loss = self.value_loss(self.net.value(obs), v_old, mb_ret)
                    entropy = entropy.mean(-1)
                    loss = pg_loss + self.value_coef * v_loss - self.entropy_coef * entropy
                    self.opt.zero_grad(set_to_none=True)
                    loss.sum().backward()  # seeds have disjoint parameters
                    grad_norm = clip_and_step(self.opt, self.max_grad_norm)
                    with torch.no_grad():
                        for k, v in {"loss/actor": pg_loss, "loss/critic": v_loss, "entropy/estimate": entropy,
                                     "ppo/approx_kl": ((ratio - 1) - log_ratio).mean(-1),
                                     "ppo/clip_frac": ((ratio - 1).abs() > self.clip_coef).float().mean(-1),
                                     "ppo/ratio_deviation": (ratio - 1).abs().mean(-1),
                                     "grad/norm": grad_norm}.items():
                            sums[k] = sums.get(k, 0) + v.detach()
        n_mb = self.epochs * (T // M)
        metrics = {k: v / n_mb for k, v in sums.items()}
        var_ret = returns.var(dim=-1)
        metrics.update({
            "ppo/explained_variance": 1 - (returns - rollout.value).var(dim=-1) / var_ret.clamp(min=1e-12),
            "ppo/advantage_mean": adv.mean(dim=-1),
            **self.net.metrics(),
            "ppo/lr": lr,
            "v/mean": rollout.value.mean(dim=-1),
        })
        return metrics

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"seeds": self.seeds, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "iteration": self.iteration, "rng": self.rng.state_dict(),
                "obs_norm": self.obs_norm.rms.state_dict() if self.obs_norm else None,
                "reward_scaler": self.reward_scaler.state_dict() if self.reward_scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.rng.load_state_dict(state["rng"])
        self.iteration = state["iteration"]
        if self.obs_norm is not None:
            self.obs_norm.rms.load_state_dict(state["obs_norm"])
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(state["reward_scaler"])


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx (N, M) of x (N, T, ...) per seed -> (N, M, ...)."""
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


@gin.configurable(denylist=["context"])
class PPO(PPOBase):
    """PPO with the clipped surrogate (the module docstring), at PPOBase's defaults: the PPO
    paper's MuJoCo settings."""

"""QSM: Q-score matching (Psenka, Escontrela, Abbeel, Ma, ICML 2024, "Learning a Diffusion Model
Policy from Rewards via Q-Score Matching", arXiv 2312.11752).

The policy is a DDPM over actions whose noise model eps_theta(a~, s, t) is trained to match the
action gradient of the critic, not a denoising target: the sampler moves a_t by -eps_theta, so
eps_theta -> -alpha grad_a Q turns every denoising step into a step up the Q landscape.

One update, as the authors' released code does it (github Alescontrela/score_matching_rl,
jaxrl5/agents/score_matching/score_matching_learner.py, ScoreMatchingLearner.update):
  1. critic: a' = sampler(s') of the sampling actor, plus N(0, target_noise^2), clipped to
     [-1, 1]; y = r + gamma (1 - terminal) min(Q1', Q2')(s', a');
     loss = MSE(Q1, y) + MSE(Q2, y); soft update of the target critics (tau).
  2. actor, on the same minibatch: t ~ Uniform{0..T-1}, eps ~ N(0, I),
     a~ = sqrt(ab_t) a + sqrt(1 - ab_t) eps (the replay action, noised);
     g = (grad_a~ Q1(s, a~) + grad_a~ Q2(s, a~)) / 2 of the just-updated critics (held fixed);
     loss = mean_B mean_A (-alpha g - eps_theta(a~, s, t))^2, alpha = `score_scale` (the
     paper's alpha, the code's M_q); eps itself only makes a~.
  3. sampling actor <- EMA of the online actor (rate actor_tau; 1.0 = the online actor itself,
     which is what the released code samples from).
The actor's learning rate decays by a cosine over `actor_lr_decay_steps` actor updates (optax's
cosine_decay_schedule in the reference). Acting: one sample of the sampling actor plus
N(0, action_noise^2), clipped; evaluation: one sample, no added noise (the DDPM's own noise
stays, drawn from an evaluation stream re-seeded by `begin_evaluation`).

The sampler is plain DDPM ancestral sampling as the reference's ddpm_sampler: x_T ~ N(0, I);
for t = T-1 .. 0: x <- (x - beta_t / sqrt(1 - ab_t) eps_theta(x, s, t)) / sqrt(alpha_t)
+ [t > 0] sqrt(beta_t) temperature z, clipped to [-1, 1] after every step (`clip_sampler`);
the final action is clipped. `repeat_last_step` M repeats the t = 0 step M more times (the
earlier learner's M, IDQL's repeat_last_step; 0 = off). It is the package's DiffusionPolicy
with this agent's ScoreNet as its denoiser and that step (qvpo.diffusion.EpsStep).

Versions: an earlier learner of the same repository (commit 04a3920,
jaxrl5/agents/score_matching/score_matching_learner.py there; docs/paper-notes.md#qsm) has: loss -eps_theta . grad_a (Q1 + Q2), actor
step first, an EMA actor (tau 0.001) for targets and acting, no target-action noise. That loss pushes eps_theta along +grad Q, so its
sampler walks down Q; the released learner (the defaults here) matches -M_q grad Q instead.
actor_tau = 0.001 and target_noise = 0 recover that version's sampling; gin/algos/qsm.gin
names every difference.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import gin
import torch
from torch import nn

from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import SeedBuffers
from qvpo.diffusion import DiffusionPolicy, EpsStep
from qvpo.errors import require, require_int
from qvpo.nets import TwinQ, init_linear, mlp
from qvpo.optim import adam, clip_and_step, frozen, soft_update
from qvpo.rng import EVAL_STREAM, SeedRNG, init_generators


class FourierTimeFeatures(nn.Module):
    """Learnable Fourier features of the diffusion step: t -> [cos(2 pi t w), sin(2 pi t w)].

    w has dim/2 entries per seed, initialised N(0, std^2) (reference FourierFeatures,
    learnable=True, std 0.2); t is the integer step as a float, not rescaled.
    """

    def __init__(self, seeds: int, dim: int, std: float = 0.2):
        super().__init__()
        require(dim >= 2 and dim % 2 == 0, f"QSM.time_dim must be even and >= 2, got {dim}")
        self.std = std
        self.kernel = nn.Parameter(torch.empty(seeds, 1, dim // 2))

    def reset_parameters(self, generators: list[torch.Generator]) -> None:
        with torch.no_grad():
            for k, g in enumerate(generators):
                self.kernel[k].copy_(torch.randn(self.kernel.shape[1:], generator=g) * self.std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (N, R) -> (N, R, dim)."""
        f = 2.0 * math.pi * t.to(self.kernel.dtype)[..., None] * self.kernel  # (N, R, dim/2)
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ScoreNet(nn.Module):
    """eps_theta(a_t, s, t) of QSM, one network per seed (reference: jaxrl5 DDPM module); called
    as DiffusionPolicy's denoisers are, net(a_t, t, s, T).

    time: FourierTimeFeatures(time_dim) -> MLP(time_hidden, Mish, no final activation);
    body: MLP on [a_t, s, time features] with `hidden` Mish layers -> |A|. Linear layers are
    Xavier-uniform with zero bias (the reference's default_init), or `init`.
    """

    def __init__(self, state_dim: int, action_dim: int, generators: list[torch.Generator],
                 hidden: tuple[int, ...], time_dim: int, time_hidden: tuple[int, ...], init: str = "xavier"):
        super().__init__()
        require(len(hidden) >= 1 and all(h >= 1 for h in hidden),
                f"QSM.actor_hidden must be a non-empty tuple of positive widths, got {hidden}")
        require(len(time_hidden) >= 1 and all(h >= 1 for h in time_hidden),
                f"QSM.time_hidden must be a non-empty tuple of positive widths, got {time_hidden}")
        N = len(generators)
        self.time_features = FourierTimeFeatures(N, time_dim)
        self.time_mlp = mlp(N, time_dim, tuple(time_hidden[:-1]), time_hidden[-1], "mish")
        self.body = mlp(N, action_dim + state_dim + time_hidden[-1], tuple(hidden), action_dim, "mish")
        init_linear(self, generators, scheme=init)
        self.time_features.reset_parameters(generators)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Integer steps t (N, R) -> (N, R, time_hidden[-1])."""
        return self.time_mlp(self.time_features(t))

    def forward(self, a_t: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """a_t (N, R, A), t (N, R) integer steps in [0, T) or one int step for every row,
        s (N, R, S) -> eps (N, R, A). T is unused: the Fourier features take the raw step."""
        if isinstance(t, int):  # every row at step t: the time features once per seed, not per row
            N, R, _ = a_t.shape
            cond = self.time_embedding(torch.full((N, 1), t, device=a_t.device)).expand(N, R, -1)
        else:
            cond = self.time_embedding(t)
        return self.body(torch.cat([a_t, s, cond], dim=-1))


def cosine_decay(count: int, decay_steps: int | None) -> float:
    """optax.cosine_decay_schedule(1, decay_steps) at update `count`: 0.5 (1 + cos(pi min(count, D) / D))."""
    if decay_steps is None:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(count, decay_steps) / decay_steps))


@gin.configurable(denylist=["context"])
class QSM(Agent):
    """QSM agent; defaults are the authors' released code run by its own script and config
    (examples/states/train_score_matching_online.py with configs/score_matching_config.py);
    gin/algos/qsm.gin restates them with sources and names the earlier code's values.

    Args:
      warmup_steps: env steps of uniformly random actions before the first update.
      batch_size, gamma, tau: minibatch size, discount, soft-update rate of the target critics.
      actor_lr, critic_lr: Adam learning rates (3e-4 each).
      actor_lr_decay_steps: cosine decay of the actor's learning rate to 0 over this many actor
        updates (reference decay_steps 2e6); None = constant.
      adam_eps: Adam's epsilon (optax's default 1e-8, which the reference uses).
      score_scale: alpha (the code's M_q): eps_theta is matched to -alpha grad_a Q.
      T, schedule: diffusion steps and beta schedule ('vp', 'cosine' or 'linear').
      ddpm_temperature: scale of the sampler's step noise (1 = plain DDPM).
      clip_sampler: clip x to [-1, 1] after every sampling step.
      repeat_last_step: M, extra t = 0 steps at the end of sampling.
      actor_hidden: Mish hidden widths of the noise model's body.
      time_dim, time_hidden: Fourier time features and the Mish MLP on them.
      critic_hidden: ReLU hidden widths of each of the two critics.
      actor_tau: EMA rate of the sampling actor (used for the critic target and for acting);
        1.0 = the online actor itself.
      target_noise: std of the Gaussian added to the target action a' (then clipped).
      action_noise: std of the Gaussian added when acting (then clipped); not in evaluation.
      init: init_linear scheme of every Linear ('xavier' = Xavier-uniform, zero bias).
      grad_clip: per-seed gradient-norm clip of both networks (None: the reference does not clip).
      optimizer: optimiser factory, called as optimizer(params, lr=..., eps=...).
    """

    def __init__(self, context: AgentContext,
                 warmup_steps: int = 10_000,
                 batch_size: int = 256,
                 gamma: float = 0.99,
                 tau: float = 0.005,
                 actor_lr: float = 3e-4,
                 critic_lr: float = 3e-4,
                 actor_lr_decay_steps: int | None = 2_000_000,
                 adam_eps: float = 1e-8,
                 score_scale: float = 50.0,
                 T: int = 5,
                 schedule: str = "vp",
                 ddpm_temperature: float = 1.0,
                 clip_sampler: bool = True,
                 repeat_last_step: int = 0,
                 actor_hidden: tuple[int, ...] = (512, 512),
                 time_dim: int = 64,
                 time_hidden: tuple[int, ...] = (128, 128),
                 critic_hidden: tuple[int, ...] = (512, 512),
                 actor_tau: float = 1.0,
                 target_noise: float = 0.1,
                 action_noise: float = 0.1,
                 init: str = "xavier",
                 grad_clip: float | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] = adam):
        super().__init__(context)
        obs_dim, action_dim = context.obs_dim, context.action_dim
        self._setup("QSM", batch_size, gamma, tau, warmup_steps,
                    actor_lr=actor_lr, critic_lr=critic_lr)
        if actor_lr_decay_steps is not None:
            require_int(actor_lr_decay_steps, "QSM.actor_lr_decay_steps", 1)
        require_int(repeat_last_step, "QSM.repeat_last_step (M)", 0)
        require(0 < actor_tau <= 1, f"QSM.actor_tau must be in (0, 1], got {actor_tau}")
        require(min(target_noise, action_noise, ddpm_temperature) >= 0,
                "QSM.target_noise, action_noise and ddpm_temperature must be >= 0")
        self.actor_lr, self.actor_lr_decay_steps = actor_lr, actor_lr_decay_steps
        self.score_scale = score_scale
        self.ddpm_temperature, self.clip_sampler = ddpm_temperature, clip_sampler
        self.repeat_last_step = repeat_last_step
        self.actor_tau, self.target_noise, self.action_noise = actor_tau, target_noise, action_noise
        self.grad_clip = grad_clip
        self.num_updates = 0  # actor updates so far: the step count of the learning-rate schedule

        gens = init_generators(self.seeds)  # actor first, then critics: per-seed init streams
        self.actor = ScoreNet(obs_dim, action_dim, gens, tuple(actor_hidden), time_dim, tuple(time_hidden),
                              init).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)  # the sampling actor
        # the sampler: a DiffusionPolicy on the sampling actor (shared, not copied), with the
        # reference's step. Every DiffusionPolicy setting is passed, so none of its gin bindings
        # (meant for QVPO's and DIPO's Denoiser) applies here or enters this run's operative config
        self.policy = DiffusionPolicy(
            obs_dim, action_dim, None, T=T, schedule=schedule, clip_x0=False, precision="fp32",
            block_rows=None, compile=False, native=False, fused=False, denoiser=self.actor_target,
            eps_step=EpsStep(ddpm_temperature, clip_sampler, repeat_last_step)).to(self.device)
        self.schedule = self.policy.schedule  # also noises the replay actions of the actor loss
        self.critic = TwinQ(obs_dim, action_dim, gens, hidden=tuple(critic_hidden), activation="relu",
                            init=init).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = optimizer(self.actor.parameters(), lr=actor_lr, eps=adam_eps)
        self.critic_opt = optimizer(self.critic.parameters(), lr=critic_lr, eps=adam_eps)
        self.rng = SeedRNG(self.seeds, self.device)
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)

    @property
    def T(self) -> int:
        return self.schedule.T

    def sample(self, states: torch.Tensor, rng: SeedRNG) -> torch.Tensor:
        """One action of the sampling (EMA) actor per state: (N, B, S) -> (N, B, A) in [-1, 1]."""
        return self.policy.sample(states, 1, rng)[:, :, 0]

    # ---------------------------------------------------------------- acting
    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        if not explore:
            return self.sample(obs, self.eval_rng)
        a = self.sample(obs, self.rng)
        return (a + self.action_noise * self.rng.randn(*a.shape[1:])).clamp(-1.0, 1.0)

    def begin_evaluation(self, tag: int) -> None:
        self.eval_rng = SeedRNG([s + 7919 * tag for s in self.seeds], self.device, EVAL_STREAM)

    # ---------------------------------------------------------------- learning
    def score_target(self, obs: torch.Tensor, noisy_action: torch.Tensor) -> torch.Tensor:
        """g = mean over the two critics of grad_a Q_i(s, a) at a = noisy_action: (N, B, A).

        Each row's Q depends on that row's action only, so the gradient of the summed Q is the
        per-row action gradient. The critics' parameters get no gradient.
        """
        a = noisy_action.detach().requires_grad_(True)
        with frozen(self.critic), torch.enable_grad():
            q1, q2 = self.critic(obs, a)
            (grad,) = torch.autograd.grad((q1 + q2).sum(), a)
        return 0.5 * grad

    def actor_loss(self, obs: torch.Tensor, action: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """Per seed: mean_B mean_A (-alpha g(s, a~) - eps_theta(a~, s, t))^2 with
        a~ = sqrt(ab_t) a + sqrt(1 - ab_t) eps. Returns (loss (N,), g, eps_theta)."""
        noisy = self.schedule.noised(action, t, eps)
        g = self.score_target(obs, noisy)
        eps_pred = self.actor(noisy, t, obs, self.T)
        loss = (-self.score_scale * g - eps_pred).pow(2).mean(dim=-1).mean(dim=-1)
        return loss, g, eps_pred

    def update(self, buffers: SeedBuffers, step: int) -> dict[str, torch.Tensor | float]:
        timer, b = self.timer, buffers.sample(self.batch_size)
        B, A = b.action.shape[1], self.action_dim
        # 1. critic: clipped double-Q towards a smoothed sample of the sampling actor at s'
        with timer.phase("sampling"):
            a2 = self.sample(b.next_obs, self.rng)
            a2 = (a2 + self.target_noise * self.rng.randn(B, A)).clamp(-1.0, 1.0)
        with timer.phase("critic"):
            with torch.no_grad():
                y = b.reward + self.gamma * (1.0 - b.terminal) * self.critic_target.q_min(b.next_obs, a2)
            q1, q2 = self.critic(b.obs, b.action)
            critic_loss = (q1 - y).pow(2).mean(dim=-1) + (q2 - y).pow(2).mean(dim=-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()  # seeds have disjoint parameters: sum = per-seed gradients
            critic_grad = clip_and_step(self.critic_opt, self.grad_clip)
            soft_update(self.critic_target, self.critic, self.tau)

        # 2. actor: match eps_theta at the noised replay action to -alpha grad_a Q
        with timer.phase("actor"):
            t = self.rng.randint(self.T, B)
            eps = self.rng.randn(B, A)
            actor_loss, g, eps_pred = self.actor_loss(b.obs, b.action, t, eps)
            lr = self.actor_lr * cosine_decay(self.num_updates, self.actor_lr_decay_steps)
            for group in self.actor_opt.param_groups:
                group["lr"] = lr
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.sum().backward()
            actor_grad = clip_and_step(self.actor_opt, self.grad_clip)
            self.num_updates += 1
            # 3. the sampling actor
            soft_update(self.actor_target, self.actor, self.actor_tau)

        return {  # each (N,): one value per seed
            "loss/critic": critic_loss.detach(),
            "loss/actor": actor_loss.detach(),
            "q/mean": q1.detach().mean(dim=-1),
            "q/target_mean": y.mean(dim=-1),
            "grad/critic_norm": critic_grad,
            "grad/actor_norm": actor_grad,
            "qsm/q_grad_norm": g.norm(dim=-1).mean(dim=-1),
            "qsm/eps_pred_norm": eps_pred.detach().norm(dim=-1).mean(dim=-1),
            "qsm/actor_lr": lr,
        }

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"seeds": self.seeds, "num_updates": self.num_updates,
                "actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
                "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        self.num_updates = int(state["num_updates"])
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)
        for name in ("actor", "actor_target", "critic", "critic_target", "actor_opt", "critic_opt", "rng"):
            getattr(self, name).load_state_dict(state[name])

"""DIPO: DIffusion POlicy (Yang et al. 2023, "Policy Representation via Diffusion Probability Model
for Reinforcement Learning", arXiv 2305.13122), as its reference code runs it (BellmanTimeHut/DIPO,
commit bb3d85b, `main.py` with its parser defaults; docs/paper-notes.md#dipo).

One update:
  1. critic: a' = ONE sample of the EMA target policy at s' (no best-of-K);
     y = r + gamma (1 - terminal) min(Q1', Q2')(s', a'); loss = MSE(Q1, y) + MSE(Q2, y).
  2. action gradient: a minibatch (s, a) of the diffusion buffer, drawn apart from step 1's;
     `action_gradient_steps` Adam steps (lr `action_lr`, a fresh optimiser each update) of ascent
     on min(Q1, Q2)(s, a) of the just-updated critic. Before each step the gradient with respect
     to the minibatch's actions is clipped to norm `action_grad_ratio` * |A| (one norm over the
     whole B x A minibatch, per seed); after it the actions are clamped to [-1, 1].
     The improved actions are written back into the diffusion buffer (`write_back`).
  3. policy: the plain (unweighted) denoising loss on (s, improved a).
  4. targets: the critic's every update, the EMA policy's every `update_actor_target_every`
     updates (the first update included), both with rate tau.
Both networks' gradient norms are clipped per seed at `grad_clip`.

The diffusion buffer: the reference appends (s, a) to a second ring at every env step, next to the
replay ring. Here it is the replay buffer's improved-action column (qvpo/buffers.py), which starts
as the taken action and is sampled with the buffer's own stream.

Acting: one sample of the online policy, no Q selection (`noise_ratio` scales the noise of the
reverse steps, 1 = plain DDPM). Evaluation: the reference's `eval=True` path, x_T ~ N(0, I) then
reverse steps with their noise scaled by `eval_noise_ratio` (0: the posterior mean at every step),
drawn from the evaluation stream that begin_evaluation re-seeds.

Reference code details kept as options (see gin/algos/dipo.gin):
* its write-back, `DiffusionMemory.replace`, is `np.copyto(best_actions[idxs], ...)`: numpy's
  fancy indexing copies, so nothing is written and every ascent starts again from the taken
  action. write_back=True (default) does what the paper and the code mean; False what the code does.
* it stores a time-limit truncation as terminal (Trainer.truncation_is_terminal).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import gin
import torch

from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import Batch, SeedBuffers
from qvpo.diffusion import DiffusionPolicy
from qvpo.errors import require, require_int
from qvpo.nets import TwinQ
from qvpo.optim import adam, clip_and_step, frozen, soft_update
from qvpo.rng import EVAL_STREAM, SeedRNG, init_generators


@torch.no_grad()
def sample_one(policy: DiffusionPolicy, states: torch.Tensor, rng: SeedRNG, noise_ratio: float = 1.0) -> torch.Tensor:
    """One action per state, states (N, B, S) -> (N, B, A), with the reverse steps' noise scaled by
    noise_ratio (the reference's `noise_ratio`; x_T is always N(0, I))."""
    if noise_ratio == 1.0:
        return policy.sample(states, 1, rng)[:, :, 0]
    noise = rng.randn(policy.T, states.shape[1], policy.action_dim)  # (N, T, B, A): x_T, then steps
    noise[:, 1:] *= noise_ratio
    return policy.sample(states, 1, noise=noise)[:, :, 0]


def clip_grad_per_seed_(grad: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Scale each seed's gradient grad[k] (any shape after the seed dim) in place to norm <= max_norm,
    as torch.nn.utils.clip_grad_norm_ does for one tensor (same 1e-6 guard); returns the pre-clip
    norms (N,). max_norm None or <= 0: no clip (the reference's `if action_grad_norm > 0`)."""
    norm = grad.flatten(1).norm(dim=1)
    if max_norm is not None and max_norm > 0:
        grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).view(-1, *([1] * (grad.dim() - 1))))
    return norm


def action_gradient(critic: TwinQ, states: torch.Tensor, actions: torch.Tensor, steps: int, lr: float,
                    max_norm: float | None, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """DIPO's policy improvement in action space: `steps` Adam steps of ascent on min(Q1, Q2)(s, a),
    starting at `actions`, with the critic fixed.

    states (N, B, S), actions (N, B, A) in [-1, 1]. Each step: g = -d sum_b min Q / d a; if max_norm,
    g *= min(1, max_norm / (|g_k| + 1e-6)) with |g_k| the norm of seed k's whole (B, A) gradient
    (torch's clip_grad_norm_ on one seed's minibatch, as the reference); an Adam step (torch's
    update, zero moments at the start as the reference's fresh optimiser, written out here to
    save kernel launches: the loop runs every update); the actions are clamped to [-1, 1]. Seeds
    never mix: each row's Q depends on its own action only, and Adam is elementwise.

    Returns {'actions': improved (N, B, A), 'q_before' / 'q_after': min Q of the start and the
    improved actions (N, B), 'grad_norm': the pre-clip gradient norm, mean over the steps (N,)}.
    """
    a = actions.detach().clone().requires_grad_(True)
    m, v = torch.zeros_like(actions), torch.zeros_like(actions)
    b1, b2 = betas
    norm_sum, q_before = torch.zeros(actions.shape[0], device=actions.device), None
    with frozen(critic):
        for k in range(1, steps + 1):
            q = critic.q_min(states, a)
            if q_before is None:
                q_before = q.detach()
            (g,) = torch.autograd.grad(q.sum(), a)
            g.neg_()  # the gradient of the loss -Q
            norm_sum += clip_grad_per_seed_(g, max_norm)
            with torch.no_grad():
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2 ** k)).add_(eps)
                a.addcdiv_(m, denom, value=-lr / (1 - b1 ** k))
                a.clamp_(-1.0, 1.0)
        with torch.no_grad():
            q_after = critic.q_min(states, a)
    if q_before is None:  # steps == 0
        q_before = q_after
    return {"actions": a.detach(), "q_before": q_before, "q_after": q_after,
            "grad_norm": norm_sum / max(steps, 1)}


@gin.configurable(denylist=["context"])
class DIPO(Agent):
    """DIPO agent. Every default is the reference code's (`main.py`'s parser defaults;
    docs/paper-notes.md#dipo); gin/algos/dipo.gin restates them.

    Trains len(seeds) independent seeds at once (leading seed dimension everywhere; per-seed
    losses, gradient clips and action-gradient clips).

    Args:
      warmup_steps: env steps of uniformly random actions before the first update (reference: start_steps).
      T: diffusion steps of the policy (reference: n_timesteps 100).
      batch_size: minibatch size, for the critic and (separately drawn) for the diffusion buffer.
      gamma: discount.
      tau: soft-update rate of the target critic and the EMA target policy.
      policy_lr, critic_lr: Adam learning rates (reference: diffusion_lr, critic_lr).
      grad_clip: max gradient norm per seed for both networks (reference: ac_grad_norm; None = off).
      action_lr: learning rate of the action ascent's optimiser (reference: action_lr).
      action_gradient_steps: optimiser steps of the action ascent per update.
      action_grad_ratio: the action gradient's norm is clipped to action_grad_ratio * |A|
        (reference: ratio; <= 0 = no clip).
      update_actor_target_every: updates between EMA steps of the target policy.
      noise_ratio: scale of the reverse steps' noise when acting and in the critic target.
      eval_noise_ratio: the same when evaluating (reference: 0, i.e. only x_T is random).
      write_back: write the improved actions back into the diffusion buffer (see the module
        docstring: the reference code means to, but does not).
      optimizer: factory of the networks' optimisers, optimizer(params, lr=...).
      action_adam_eps: epsilon of the action ascent's Adam (reference: 1e-5; betas torch's 0.9, 0.999).
    """

    def __init__(self, context: AgentContext,
                 warmup_steps: int = 10_000,
                 T: int = 100,
                 batch_size: int = 256,
                 gamma: float = 0.99,
                 tau: float = 0.005,
                 policy_lr: float = 3e-4,
                 critic_lr: float = 3e-4,
                 grad_clip: float | None = 2.0,
                 action_lr: float = 0.03,
                 action_gradient_steps: int = 20,
                 action_grad_ratio: float = 0.1,
                 update_actor_target_every: int = 1,
                 noise_ratio: float = 1.0,
                 eval_noise_ratio: float = 0.0,
                 write_back: bool = True,
                 optimizer: Callable[..., torch.optim.Optimizer] = adam,
                 action_adam_eps: float = 1e-5):
        super().__init__(context)
        obs_dim, action_dim = context.obs_dim, context.action_dim
        self._setup("DIPO", batch_size, gamma, tau, warmup_steps,
                    policy_lr=policy_lr, critic_lr=critic_lr, action_lr=action_lr)
        require_int(action_gradient_steps, "DIPO.action_gradient_steps", 0)
        require_int(update_actor_target_every, "DIPO.update_actor_target_every (updates)", 1)
        for name, value in [("noise_ratio", noise_ratio), ("eval_noise_ratio", eval_noise_ratio),
                            ("action_adam_eps", action_adam_eps)]:
            require(value >= 0, f"DIPO.{name} must be >= 0, got {value}")
        self.grad_clip = grad_clip
        self.action_lr, self.action_steps = action_lr, action_gradient_steps
        self.action_grad_ratio = action_grad_ratio
        self.action_grad_norm = action_grad_ratio * action_dim  # reference: action_dim * ratio
        self.update_actor_target_every = update_actor_target_every
        self.noise_ratio, self.eval_noise_ratio = noise_ratio, eval_noise_ratio
        self.write_back = write_back
        self.action_adam_eps = action_adam_eps
        self.num_updates = 0

        require_int(T, "DIPO.T (diffusion steps)", 1)
        init = init_generators(self.seeds)  # policy first, then critic (as QVPO)
        self.policy = DiffusionPolicy(obs_dim, action_dim, init, T=T).to(self.device)
        self.policy_target = copy.deepcopy(self.policy).requires_grad_(False)  # EMA policy
        self.critic = TwinQ(obs_dim, action_dim, init).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.policy_opt = optimizer(self.policy.parameters(), lr=policy_lr)
        self.critic_opt = optimizer(self.critic.parameters(), lr=critic_lr)
        self.rng = SeedRNG(self.seeds, self.device)
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)

    # ---------------------------------------------------------------- acting
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        if explore:
            return sample_one(self.policy, obs, self.rng, self.noise_ratio)
        return sample_one(self.policy, obs, self.eval_rng, self.eval_noise_ratio)

    def begin_evaluation(self, tag: int) -> None:
        self.eval_rng = SeedRNG([s + 7919 * tag for s in self.seeds], self.device, EVAL_STREAM)

    # ---------------------------------------------------------------- learning
    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """y = r + gamma (1 - terminal) min(Q1', Q2')(s', a'), a' one sample of the EMA policy."""
        with self.timer.phase("sampling"):
            next_action = sample_one(self.policy_target, batch.next_obs, self.rng, self.noise_ratio)
        with self.timer.phase("critic"):
            q_next = self.critic_target.q_min(batch.next_obs, next_action)
            return batch.reward + self.gamma * (1.0 - batch.terminal) * q_next

    def update(self, buffers: SeedBuffers, step: int) -> dict[str, torch.Tensor | float]:
        timer = self.timer
        buffers.track_improved_actions()  # the diffusion buffer (allocated at the first update)
        # 1. critic: clipped double-Q towards one sample of the target policy
        batch = buffers.sample(self.batch_size)
        y = self.td_target(batch)
        with timer.phase("critic"):
            q1, q2 = self.critic(batch.obs, batch.action)
            critic_loss = (q1 - y).pow(2).mean(dim=-1) + (q2 - y).pow(2).mean(dim=-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()  # seeds have disjoint parameters: sum = per-seed gradients
            critic_grad = clip_and_step(self.critic_opt, self.grad_clip)

        with timer.phase("actor"):
            # 2. action gradient on a minibatch of the diffusion buffer, written back
            slots, states, actions = buffers.sample_improved(self.batch_size)
            ascent = action_gradient(self.critic, states, actions, self.action_steps, self.action_lr,
                                     self.action_grad_norm, eps=self.action_adam_eps)
            improved = ascent["actions"]
            if self.write_back:
                buffers.write_improved(slots, improved)
            # 3. the plain denoising loss on the improved actions
            policy_loss = self.policy.loss(states, improved, None, self.rng)  # (N,)
            self.policy_opt.zero_grad(set_to_none=True)
            policy_loss.sum().backward()
            policy_grad = clip_and_step(self.policy_opt, self.grad_clip)

            # 4. targets (the reference counts updates from 0: the first one moves the EMA policy)
            soft_update(self.critic_target, self.critic, self.tau)
            if self.num_updates % self.update_actor_target_every == 0:
                soft_update(self.policy_target, self.policy, self.tau)
            self.num_updates += 1

        return {  # each (N,): one value per seed
            "loss/critic": critic_loss.detach(),
            "loss/actor": policy_loss.detach(),
            "q/mean": q1.detach().mean(dim=-1),
            "q/target_mean": y.mean(dim=-1),
            "grad/critic_norm": critic_grad,
            "grad/actor_norm": policy_grad,
            "dipo/action_q_gain": (ascent["q_after"] - ascent["q_before"]).mean(dim=-1),
            "dipo/action_change": (improved - actions).norm(dim=-1).mean(dim=-1),
            "dipo/action_grad_norm": ascent["grad_norm"],
        }

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "seeds": self.seeds, "num_updates": self.num_updates,
            "policy": self.policy.state_dict(), "policy_target": self.policy_target.state_dict(),
            "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
            "policy_opt": self.policy_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "rng": self.rng.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        self.num_updates = int(state["num_updates"])
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)
        for name in ("policy", "policy_target", "critic", "critic_target", "policy_opt", "critic_opt", "rng"):
            getattr(self, name).load_state_dict(state[name])

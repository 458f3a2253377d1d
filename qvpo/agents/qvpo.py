"""QVPO: Q-weighted Variational Policy Optimization (Ding et al., NeurIPS 2024, arXiv 2405.16173).

One update, as the reference code does it (docs/paper-notes.md#the-algorithm, which cites
wadx2019/qvpo@40a1974 line by line):
  1. critic: a' = best of Kt candidates of the EMA target policy at s', scored by the target
     critic; y = r + gamma (1 - terminal) min(Q1', Q2')(s', a'); loss = MSE(Q1, y) + MSE(Q2, y).
  2. policy samples: a fresh minibatch; Nd candidates per state from the online policy, scored by
     min(Q1, Q2) of the just-updated critic.
  3. Q-weight: keep the best candidate a*, weight w(s) = transform(Q) (qadv: max(Q(a*) - V, 0)).
  4. entropy term: Ne uniform actions per state, each weighted omega_ent * w(s).
  5. Q-weighted variational loss: the weighted denoising loss over the B best and B*Ne uniform rows.
  6. soft target updates (critic and EMA policy), tau = 0.005.
Acting: best of Kb candidates by min Q (behaviour), best of 32 (evaluation).
"""

from __future__ import annotations

import copy
from typing import Callable

import gin
import torch

from qvpo.agents.base import Agent
from qvpo.buffers import Batch, SeedBuffers
from qvpo.diagnostics import build_weightings, weighting_gradient_variance
from qvpo.diffusion import DiffusionPolicy
from qvpo.entropy import kl_entropy
from qvpo.errors import require, require_int
from qvpo.nets import TwinQ
from qvpo.optim import adam, clip_and_step, soft_update
from qvpo.rng import EVAL_STREAM, SeedRNG, init_generators
from qvpo.schedules import LinearDecay
from qvpo.timing import PhaseTimer
from qvpo.weights import QAdv, QWeight


@torch.no_grad()
def best_of_candidates(policy: DiffusionPolicy, critic: TwinQ, states: torch.Tensor, k: int,
                       rng: SeedRNG | None = None, return_candidates: bool = False) -> tuple[torch.Tensor, ...]:
    """The K-efficient policy: argmax over k sampled actions of min(Q1, Q2).

    states (N, B, S) -> (best actions (N, B, A), Q of all candidates (N, B, k)), and with
    return_candidates the candidates themselves (N, B, k, A) third. With k = 1 the critic is
    skipped (Q returned as zeros).
    """
    N, B, _ = states.shape
    candidates = policy.sample(states, k, rng)  # (N, B, k, A)
    if k == 1:
        best, q = candidates[:, :, 0], torch.zeros(N, B, 1, device=states.device)
    else:
        q = critic.q_min_candidates(states, candidates)  # no autograd: Q only ranks and weights
        best = pick(candidates, q.argmax(dim=-1))
    return (best, q, candidates) if return_candidates else (best, q)


def row_weights(w: torch.Tensor, omega, Ne: int) -> torch.Tensor:
    """Weights of `QVPO.policy_rows`: w (N, B) for the chosen rows, omega_ent * w for each
    state's Ne uniform rows -> (N, B + B * Ne). omega: a float, or one weight per seed (N,)
    (a constant here: no gradient flows into it)."""
    omega_rows = omega.detach()[:, None] if torch.is_tensor(omega) else omega  # broadcast over (N, B)
    return torch.cat([w, (omega_rows * w).repeat_interleave(Ne, dim=1)], dim=1)


def pick(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates (N, B, k, A), index (N, B) in [0, k) -> the indexed candidate of each state (N, B, A)."""
    return torch.gather(candidates, 2, index[..., None, None].expand(-1, -1, 1, candidates.shape[-1]))[:, :, 0]


@gin.configurable
class QVPO(Agent):
    """QVPO agent. Every default is the reference code's (docs/paper-notes.md#training-protocol);
    gin/algos/qvpo.gin restates them.

    Trains len(seeds) independent seeds at once: every network, optimiser state, random stream
    and replay buffer has a leading seed dimension, and the seeds never mix (per-seed losses,
    per-seed gradient clipping; Adam is elementwise).

    Args:
      warmup_steps: env steps of uniformly random actions before the first update.
      T: diffusion steps of the policy (reference: 20).
      batch_size: minibatch size, for the critic and (separately drawn) for the policy step.
      gamma: discount.
      tau: soft-update rate of the target critic and the EMA target policy.
      policy_lr, critic_lr: Adam learning rates.
      grad_clip: max gradient norm per seed for both networks (None = no clip).
      train_candidates: Nd, policy samples per state for the policy step.
      uniform_samples: Ne, uniform actions per state in the entropy term.
      behavior_candidates: Kb, candidates when acting in the env.
      target_candidates: Kt, candidates of the target policy for the critic target.
      eval_candidates: candidates when evaluating.
      q_weight: the Q-weight transform (qvpo.weights); None = QAdv(), the reference's qadv.
      entropy_weight: schedule of omega_ent over env steps (qvpo.schedules); None =
        LinearDecay(), the reference code's decay from 0.02 to 0.002. A schedule with an
        `observe(entropy)` method (AdaptiveEntropyWeight) is given the entropy estimate after
        every update and may return one omega per seed, (N,).
      estimate_entropy: estimate the policy's entropy per state from the Nd candidates already
        drawn (Kozachenko-Leonenko, qvpo.entropy; no extra sampling), mean over states per seed,
        logged as `entropy/estimate`. Required by an adaptive entropy_weight.
      train_selection: 'best' (QVPO: the best of the Nd candidates by Q) or 'random' (a uniformly
        random candidate: with q_weight = @Uniform() the component-isolation variant that drops
        both the selection and the weighting; reproduce/open_components).
      shared_batch: reuse the critic's minibatch for the policy step (a deviation from the
        reference, which draws a fresh one; off by default).
      optimizer: optimiser factory, called as optimizer(params, lr=...).
      gradient_variance_every: every this many env steps (at updates with step % every == 0) run
        the gradient-variance diagnostic (qvpo.diagnostics; reproduce/open_weight_variance) and
        add its `gradvar/<weighting>/*` metrics to the update's; 0 = off (the default).
      gradient_variance_samples: K, independent minibatch + candidate draws per diagnostic.
      behavior_rule, target_rule: adaptive Kb / Kt (qvpo.adaptive_k: @SpreadKb(), @BiasKt(); an
        open question, reproduce/open_adaptive_k); None = the fixed behavior_candidates /
        target_candidates. One seed per process only (the seeds would share K).
      gradient_variance_weightings: names of the weightings it compares (qvpo.diagnostics.WEIGHTINGS);
        stateful ones (qexp's running mean/std of Q) follow the training Q values of every update
        while the diagnostic is on, so they normalise as they would in training.
    """

    def __init__(self, obs_dim: int, action_dim: int, device: torch.device | str = "cpu",
                 total_steps: int = 1_000_000, timer: PhaseTimer | None = None,
                 seeds: tuple[int, ...] = (0,),
                 warmup_steps: int = 10_000,
                 T: int = 20,
                 batch_size: int = 256,
                 gamma: float = 0.99,
                 tau: float = 0.005,
                 policy_lr: float = 1e-4,
                 critic_lr: float = 3e-4,
                 grad_clip: float | None = 2.0,
                 train_candidates: int = 64,
                 uniform_samples: int = 10,
                 behavior_candidates: int = 4,
                 target_candidates: int = 4,
                 eval_candidates: int = 32,
                 q_weight: QWeight | None = None,
                 entropy_weight: Callable[[int, int], float] | None = None,
                 shared_batch: bool = False,
                 estimate_entropy: bool = True,
                 train_selection: str = "best",
                 optimizer: Callable[..., torch.optim.Optimizer] = adam,
                 gradient_variance_every: int = 0,
                 gradient_variance_samples: int = 8,
                 gradient_variance_weightings: tuple[str, ...] = ("qadv", "qcut", "qrelu", "qexp", "qexpadv"),
                 behavior_rule=None,
                 target_rule=None):
        self._setup("QVPO", device, timer, seeds, batch_size, gamma, tau, warmup_steps,
                    policy_lr=policy_lr, critic_lr=critic_lr)
        for name, value in [("behavior_candidates (Kb)", behavior_candidates),
                            ("target_candidates (Kt)", target_candidates),
                            ("eval_candidates", eval_candidates)]:
            require_int(value, f"QVPO.{name}", 1)
        require_int(train_candidates, "QVPO.train_candidates (Nd: the Q-weight compares candidates)", 2)
        require_int(uniform_samples, "QVPO.uniform_samples (Ne)", 0)
        self.total_steps = total_steps
        self.grad_clip = grad_clip
        self.Nd, self.Ne = train_candidates, uniform_samples
        self.Kb, self.Kt, self.K_eval = behavior_candidates, target_candidates, eval_candidates
        # adaptive Kb / Kt (qvpo.adaptive_k; an open question): one K per process, so one seed
        self.behavior_rule, self.target_rule = behavior_rule, target_rule
        if behavior_rule is not None or target_rule is not None:
            require(len(self.seeds) == 1, "adaptive Kb / Kt (QVPO.behavior_rule / target_rule) need "
                    "Trainer.seeds_per_process = 1: seeds trained together share one K")
        if behavior_rule is not None:
            self.Kb = behavior_rule.value
        if target_rule is not None:
            self.Kt = target_rule.value
        self.shared_batch = shared_batch
        self.action_dim = action_dim

        require_int(T, "QVPO.T (diffusion steps)", 1)
        init = init_generators(self.seeds)  # policy first, then critic: per-seed init streams
        self.policy = DiffusionPolicy(obs_dim, action_dim, init, T=T).to(self.device)
        self.policy_target = copy.deepcopy(self.policy).requires_grad_(False)  # EMA policy
        self.critic = TwinQ(obs_dim, action_dim, init).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.q_weight = q_weight if q_weight is not None else QAdv()
        self.q_weight.reset(len(self.seeds))
        self.q_weight.to(self.device)
        self.entropy_weight = entropy_weight or LinearDecay()
        self.estimate_entropy = estimate_entropy
        require(train_selection in ("best", "random"),
                f"QVPO.train_selection must be 'best' or 'random', got {train_selection!r}")
        self.train_selection = train_selection
        if hasattr(self.entropy_weight, "observe"):
            require(estimate_entropy, "an adaptive QVPO.entropy_weight needs QVPO.estimate_entropy = True")
            self.entropy_weight.reset(len(self.seeds), action_dim)
            self.entropy_weight.to(self.device)
        self.policy_opt = optimizer(self.policy.parameters(), lr=policy_lr)
        self.critic_opt = optimizer(self.critic.parameters(), lr=critic_lr)
        self.rng = SeedRNG(self.seeds, self.device)
        require_int(gradient_variance_every, "QVPO.gradient_variance_every (env steps, 0 = off)", 0)
        require_int(gradient_variance_samples, "QVPO.gradient_variance_samples (K)", 2)
        self.gradient_variance_every = gradient_variance_every
        self.gradient_variance_samples = gradient_variance_samples
        self.gradvar_weightings = (build_weightings(tuple(gradient_variance_weightings), len(self.seeds), self.device)
                                   if gradient_variance_every else {})
        # the ones with running statistics, which follow training's Q values every update
        self._gradvar_stateful = [t for t in self.gradvar_weightings.values() if next(t.buffers(), None) is not None]
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)

    # ---------------------------------------------------------------- acting
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        k = self.Kb if explore else self.K_eval
        action, _ = best_of_candidates(self.policy, self.critic, obs, k, self.rng if explore else self.eval_rng)
        return action

    def begin_evaluation(self, tag: int) -> None:
        self.eval_rng = SeedRNG([s + 7919 * tag for s in self.seeds], self.device, EVAL_STREAM)

    # ---------------------------------------------------------------- learning
    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """y = r + gamma (1 - terminal) min(Q1', Q2')(s', a'), a' = best of Kt EMA-policy candidates.

        `terminal` is 1 only for a true termination: a time-limit truncation bootstraps.
        """
        with self.timer.phase("sampling"):
            next_action, _ = best_of_candidates(self.policy_target, self.critic_target,
                                                batch.next_obs, self.Kt, self.rng)
        with self.timer.phase("critic"):
            q_next = self.critic_target.q_min(batch.next_obs, next_action)
            return batch.reward + self.gamma * (1.0 - batch.terminal) * q_next

    def update(self, buffers: SeedBuffers, step: int) -> dict[str, torch.Tensor | float]:
        timer = self.timer
        # 1. critic: clipped double-Q towards the best of Kt target-policy candidates
        batch = buffers.sample(self.batch_size)
        y = self.td_target(batch)
        with timer.phase("critic"):
            q1, q2 = self.critic(batch.obs, batch.action)
            critic_loss = (q1 - y).pow(2).mean(dim=-1) + (q2 - y).pow(2).mean(dim=-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()  # seeds have disjoint parameters: sum = per-seed gradients
            critic_grad = clip_and_step(self.critic_opt, self.grad_clip)

        # 2. Nd candidates per state of a fresh minibatch, scored by the updated critic
        states = batch.obs if self.shared_batch else buffers.sample(self.batch_size).obs
        with timer.phase("sampling"):
            best_action, q, candidates = self.select_candidates(states, self.rng)
        entropy = None
        if self.estimate_entropy:
            with timer.phase("entropy"):  # (N, B, Nd, A) -> (N, B) -> (N,): per seed, never mixed
                entropy = kl_entropy(candidates).mean(dim=-1)

        with timer.phase("actor"):
            # 3. the weight of each state's best candidate
            w = self.q_weight(q).detach()  # (N, B)
            if self.behavior_rule is not None:  # Kb from the candidates' Q spread (one host read)
                self.Kb = self.behavior_rule.observe(q)
            with torch.no_grad():  # the diagnostic's running statistics follow training's Q values
                for transform in self._gradvar_stateful:
                    transform(q)
            # 4. entropy term: Ne uniform actions per state, weight omega_ent * w
            omega = self.entropy_weight(step, self.total_steps)  # float, or (N,) per seed
            # 5. one weighted denoising loss over both blocks (mean over all B + B*Ne rows)
            loss_states, loss_actions = self.policy_rows(states, best_action, self.rng)
            loss_weights = row_weights(w, omega, self.Ne)
            policy_loss = self.policy.loss(loss_states, loss_actions, loss_weights, self.rng)  # (N,)
            self.policy_opt.zero_grad(set_to_none=True)
            policy_loss.sum().backward()
            policy_grad = clip_and_step(self.policy_opt, self.grad_clip)

            # 6. targets
            soft_update(self.critic_target, self.critic, self.tau)
            soft_update(self.policy_target, self.policy, self.tau)
        if hasattr(self.entropy_weight, "observe"):
            self.entropy_weight.observe(entropy)  # sets omega for the next update

        metrics = {  # each (N,): one value per seed
            "loss/critic": critic_loss.detach(),
            "loss/actor": policy_loss.detach(),
            "q/mean": q1.detach().mean(dim=-1),
            "q/target_mean": y.mean(dim=-1),
            "q/candidates_mean": q.mean(dim=(1, 2)),
            "q/candidates_std": q.std(dim=-1).mean(dim=-1),
            "qweight/mean": w.mean(dim=-1),
            "qweight/frac_zero": (w == 0).float().mean(dim=-1),
            "entropy/weight": omega,
            "grad/critic_norm": critic_grad,
            "grad/actor_norm": policy_grad,
        }
        if entropy is not None:
            metrics["entropy/estimate"] = entropy
        if self.gradient_variance_every and step % self.gradient_variance_every == 0:
            with timer.phase("diagnostic"):  # at the parameters this update left
                metrics.update(weighting_gradient_variance(self, buffers, self.gradvar_weightings,
                                                           self.gradient_variance_samples, step))
        return metrics

    def select_candidates(self, states: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, ...]:
        """Nd candidates per state scored by the critic: (chosen (N, B, A), Q (N, B, Nd),
        candidates (N, B, Nd, A)); the chosen one is the best by Q, or a random one with
        train_selection = 'random' (component isolation: no selection by Q)."""
        best, q, candidates = best_of_candidates(self.policy, self.critic, states, self.Nd, rng,
                                                 return_candidates=True)
        if self.train_selection == "random":
            best = pick(candidates, rng.randint(self.Nd, states.shape[1]))
        return best, q, candidates

    def policy_rows(self, states: torch.Tensor, chosen: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the weighted denoising loss, (states, actions): each state's chosen
        candidate, then Ne actions per state uniform on [-1, 1]^A (the entropy term)."""
        B, A = states.shape[1], self.action_dim
        uniform = rng.rand(B * self.Ne, A) * 2.0 - 1.0
        return (torch.cat([states, states.repeat_interleave(self.Ne, dim=1)], dim=1),
                torch.cat([chosen, uniform], dim=1))

    def observe_episode(self, seed_index: int, metrics: dict[str, float]) -> None:
        """Adaptive Kt: the trainer's measured overestimation of each finished episode."""
        if self.target_rule is not None and "q/overestimation" in metrics:
            self.Kt = self.target_rule.observe(metrics["q/overestimation"], metrics["q/mc_return"])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "seeds": self.seeds,
            "policy": self.policy.state_dict(), "policy_target": self.policy_target.state_dict(),
            "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
            "q_weight": self.q_weight.state_dict(),
            "policy_opt": self.policy_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "rng": self.rng.state_dict(),
            **({"gradvar_weightings": {k: w.state_dict() for k, w in self.gradvar_weightings.items()}}
               if self.gradvar_weightings else {}),
            **({"entropy_weight": self.entropy_weight.state_dict()}
               if hasattr(self.entropy_weight, "state_dict") else {}),
            "K": {"Kb": self.Kb, "Kt": self.Kt,
                  "behavior_rule": self.behavior_rule.state_dict() if self.behavior_rule else None,
                  "target_rule": self.target_rule.state_dict() if self.target_rule else None},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)
        for name in ("policy", "policy_target", "critic", "critic_target", "q_weight",
                     "policy_opt", "critic_opt", "rng"):
            getattr(self, name).load_state_dict(state[name])
        for k, w in self.gradvar_weightings.items():  # absent from checkpoints of runs without it
            if k in state.get("gradvar_weightings", {}):
                w.load_state_dict(state["gradvar_weightings"][k])
        if hasattr(self.entropy_weight, "load_state_dict"):  # the adaptive omega's per-seed state
            self.entropy_weight.load_state_dict(state["entropy_weight"])
        if "K" in state:  # adaptive Kb / Kt and their rules' smoothed signals
            self.Kb, self.Kt = state["K"]["Kb"], state["K"]["Kt"]
            for name in ("behavior_rule", "target_rule"):
                if getattr(self, name) is not None and state["K"][name] is not None:
                    getattr(self, name).load_state_dict(state["K"][name])

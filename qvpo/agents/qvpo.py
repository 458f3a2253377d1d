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

from qvpo.agents.base import Agent, AgentContext
from qvpo.buffers import Batch, SeedBuffers
from qvpo.diffusion import DiffusionPolicy
from qvpo.entropy import kl_entropy
from qvpo.errors import require, require_int
from qvpo.hooks import QVPOHook, Scored
from qvpo.nets import TwinQ
from qvpo.optim import adam, clip_and_step, soft_update
from qvpo.rng import EVAL_STREAM, SeedRNG, init_generators
from qvpo.schedules import LinearDecay
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
    state's Ne uniform rows -> (N, B + B * Ne). With every candidate a row (w (N, B, K),
    train_selection = 'all'), the candidates' weights (N, B * K), and each uniform row carries
    omega_ent times its state's total weight sum_j w_j(s): the entropy term keeps the share
    omega_ent * Ne of each state's loss it has in QVPO. omega: a float, or one weight per seed
    (N,) (a constant here: no gradient flows into it)."""
    omega_rows = omega.detach()[:, None] if torch.is_tensor(omega) else omega  # broadcast over (N, B)
    rows, mass = (w.flatten(1), w.sum(dim=-1)) if w.dim() == 3 else (w, w)
    return torch.cat([rows, (omega_rows * mass).repeat_interleave(Ne, dim=1)], dim=1)


def pick(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates (N, B, k, A), index (N, B) in [0, k) -> the indexed candidate of each state (N, B, A)."""
    return torch.gather(candidates, 2, index[..., None, None].expand(-1, -1, 1, candidates.shape[-1]))[:, :, 0]


@gin.configurable(denylist=["context"])
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
        LinearDecay(), the reference code's decay from 0.02 to 0.002. A schedule may return one
        omega per seed, (N,); one that is also a hook (qvpo.research.adaptive_entropy) observes
        the entropy estimate after every update.
      estimate_entropy: estimate the policy's entropy per state from the Nd candidates already
        drawn (Kozachenko-Leonenko, qvpo.entropy; no extra sampling), mean over states per seed,
        logged as `entropy/estimate`. Required by an adaptive entropy_weight.
      train_selection: 'best' (QVPO: the best of the Nd candidates by Q), 'random' (a uniformly
        random candidate: with q_weight = @Uniform() the component-isolation variant that drops
        both the selection and the weighting; reproduce/open_components) or 'all' (every
        candidate a row of the loss, weighted per candidate by a q_weight with per_candidate =
        True: MPO's E-step, qvpo.research.mpo.MPOEStep; reproduce/open_mpo).
      shared_batch: reuse the critic's minibatch for the policy step (a deviation from the
        reference, which draws a fresh one; off by default).
      optimizer: optimiser factory, called as optimizer(params, lr=...).
      hooks: research add-ons (qvpo.hooks: adaptive Kb / Kt, the gradient-variance diagnostic,
        ...), called in this order at fixed points of every update; none by default.
    """

    def __init__(self, context: AgentContext,
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
                 hooks: tuple[QVPOHook, ...] = ()):
        super().__init__(context)
        self._setup("QVPO", batch_size, gamma, tau, warmup_steps, policy_lr=policy_lr, critic_lr=critic_lr)
        for name, value in [("behavior_candidates (Kb)", behavior_candidates),
                            ("target_candidates (Kt)", target_candidates),
                            ("eval_candidates", eval_candidates)]:
            require_int(value, f"QVPO.{name}", 1)
        require_int(train_candidates, "QVPO.train_candidates (Nd: the Q-weight compares candidates)", 2)
        require_int(uniform_samples, "QVPO.uniform_samples (Ne)", 0)
        require_int(T, "QVPO.T (diffusion steps)", 1)
        require(train_selection in ("best", "random", "all"),
                f"QVPO.train_selection must be 'best', 'random' or 'all', got {train_selection!r}")
        per_candidate = getattr(q_weight, "per_candidate", False)
        require(per_candidate == (train_selection == "all"),
                f"QVPO.train_selection = 'all' (every candidate weighted) goes with a per-candidate q_weight "
                f"(e.g. @MPOEStep()) and only with one; got train_selection = {train_selection!r} and "
                f"q_weight = {type(q_weight).__name__ if q_weight is not None else 'QAdv'}")
        self.grad_clip = grad_clip
        self.Nd, self.Ne = train_candidates, uniform_samples
        self.Kb, self.Kt, self.K_eval = behavior_candidates, target_candidates, eval_candidates
        self.shared_batch = shared_batch
        self.estimate_entropy = estimate_entropy
        self.train_selection = train_selection

        init = init_generators(self.seeds)  # policy first, then critic: per-seed init streams
        self.policy = DiffusionPolicy(self.obs_dim, self.action_dim, init, T=T).to(self.device)
        self.policy_target = copy.deepcopy(self.policy).requires_grad_(False)  # EMA policy
        self.critic = TwinQ(self.obs_dim, self.action_dim, init).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.q_weight = q_weight if q_weight is not None else QAdv()
        self.q_weight.reset(len(self.seeds))
        self.q_weight.to(self.device)
        self.entropy_weight = entropy_weight or LinearDecay()
        self.policy_opt = optimizer(self.policy.parameters(), lr=policy_lr)
        self.critic_opt = optimizer(self.critic.parameters(), lr=critic_lr)
        self.rng = SeedRNG(self.seeds, self.device)
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)
        # an adaptive schedule observes the entropy first: later hooks see omega after this
        # update's step, the omega the next update uses
        self.hooks = ([self.entropy_weight] if isinstance(self.entropy_weight, QVPOHook) else [])
        self.hooks += [h for h in hooks if h is not self.entropy_weight]
        for hook in self.hooks:
            hook.attach(self)

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
        # 1. critic: clipped double-Q towards the best of Kt target-policy candidates
        batch = buffers.sample(self.batch_size)
        critic_loss, critic_grad, q_data, y = self.critic_step(batch)
        # 2. Nd candidates per state of a fresh minibatch, scored by the updated critic
        states = batch.obs if self.shared_batch else buffers.sample(self.batch_size).obs
        with self.timer.phase("sampling"):
            chosen, q, candidates = self.select_candidates(states, self.rng)
        entropy = self.entropy_estimate(candidates) if self.estimate_entropy else None
        with self.timer.phase("actor"):
            # 3. the Q-weight of each state's chosen candidate
            w = self.q_weight(q).detach()  # (N, B), or (N, B, Nd) for a per-candidate weight
            if self.hooks:
                scored = Scored(states, candidates, q, chosen, w)
                for hook in self.hooks:
                    hook.on_candidates(self, scored)
            # 4. the entropy term's weight omega_ent (its Ne uniform rows per state are built in 5)
            omega = self.entropy_weight(step, self.total_steps)  # float, or (N,) per seed
            # 5. the Q-weighted variational loss over the chosen and the uniform rows
            policy_loss, policy_grad = self.policy_step(states, chosen, w, omega)
            # 6. targets
            soft_update(self.critic_target, self.critic, self.tau)
            soft_update(self.policy_target, self.policy, self.tau)

        metrics = {  # each (N,): one value per seed
            "loss/critic": critic_loss.detach(),
            "loss/actor": policy_loss.detach(),
            "q/mean": q_data.detach().mean(dim=-1),
            "q/target_mean": y.mean(dim=-1),
            "q/candidates_mean": q.mean(dim=(1, 2)),
            "q/candidates_std": q.std(dim=-1).mean(dim=-1),
            "qweight/mean": w.flatten(1).mean(dim=-1),
            "qweight/frac_zero": (w == 0).flatten(1).float().mean(dim=-1),
            "entropy/weight": omega,
            "grad/critic_norm": critic_grad,
            "grad/actor_norm": policy_grad,
        }
        if entropy is not None:
            metrics["entropy/estimate"] = entropy
        metrics.update(self.q_weight.metrics())  # e.g. MPO's temperature
        for hook in self.hooks:
            hook.after_update(self, buffers, step, metrics)
        return metrics

    def critic_step(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """One Adam step on MSE(Q1, y) + MSE(Q2, y) per seed -> (loss (N,), gradient norm (N,),
        Q1 of the batch (N, B), y (N, B))."""
        y = self.td_target(batch)
        with self.timer.phase("critic"):
            q1, q2 = self.critic(batch.obs, batch.action)
            critic_loss = (q1 - y).pow(2).mean(dim=-1) + (q2 - y).pow(2).mean(dim=-1)  # (N,)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.sum().backward()  # seeds have disjoint parameters: sum = per-seed gradients
            critic_grad = clip_and_step(self.critic_opt, self.grad_clip)
        return critic_loss, critic_grad, q1, y

    def entropy_estimate(self, candidates: torch.Tensor) -> torch.Tensor:
        """The policy's entropy per seed from the Nd candidates already drawn (no extra sampling):
        (N, B, Nd, A) -> (N, B) -> (N,), seeds never mixed."""
        with self.timer.phase("entropy"):
            return kl_entropy(candidates).mean(dim=-1)

    def policy_step(self, states: torch.Tensor, chosen: torch.Tensor, w: torch.Tensor, omega) -> tuple[torch.Tensor, ...]:
        """One Adam step on the weighted denoising loss over each state's chosen candidate
        (weight w) and its Ne uniform actions (weight omega * w): mean over all B + B * Ne rows
        per seed -> (loss (N,), gradient norm (N,))."""
        loss_states, loss_actions = self.policy_rows(states, chosen, self.rng)
        policy_loss = self.policy.loss(loss_states, loss_actions, row_weights(w, omega, self.Ne), self.rng)  # (N,)
        objective = policy_loss
        if self.hooks:  # e.g. MPO's M-step trust region (qvpo.research.mpo.MStepTrustRegion)
            n_chosen = loss_actions.shape[1] - states.shape[1] * self.Ne  # the rows before the uniform ones
            for hook in self.hooks:
                penalty = hook.policy_penalty(self, loss_states[:, :n_chosen], loss_actions[:, :n_chosen])
                if penalty is not None:
                    objective = objective + penalty
        self.policy_opt.zero_grad(set_to_none=True)
        objective.sum().backward()
        return policy_loss, clip_and_step(self.policy_opt, self.grad_clip)

    def select_candidates(self, states: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, ...]:
        """Nd candidates per state scored by the critic: (chosen (N, B, A), Q (N, B, Nd),
        candidates (N, B, Nd, A)); the chosen one is the best by Q, a random one with
        train_selection = 'random' (component isolation: no selection by Q), or every candidate
        (N, B, Nd, A) with train_selection = 'all'."""
        best, q, candidates = best_of_candidates(self.policy, self.critic, states, self.Nd, rng,
                                                 return_candidates=True)
        if self.train_selection == "random":
            best = pick(candidates, rng.randint(self.Nd, states.shape[1]))
        elif self.train_selection == "all":
            best = candidates
        return best, q, candidates

    def policy_rows(self, states: torch.Tensor, chosen: torch.Tensor, rng: SeedRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the weighted denoising loss, (states, actions): each state's chosen
        candidate (or, chosen (N, B, K, A), each of its K candidates), then Ne actions per state
        uniform on [-1, 1]^A (the entropy term)."""
        B, A = states.shape[1], self.action_dim
        uniform = rng.rand(B * self.Ne, A) * 2.0 - 1.0
        chosen_states = states
        if chosen.dim() == 4:  # every candidate a row
            chosen_states, chosen = states.repeat_interleave(chosen.shape[2], dim=1), chosen.flatten(1, 2)
        return (torch.cat([chosen_states, states.repeat_interleave(self.Ne, dim=1)], dim=1),
                torch.cat([chosen, uniform], dim=1))

    def observe_episode(self, seed_index: int, metrics: dict[str, float]) -> None:
        for hook in self.hooks:  # e.g. adaptive Kt reads the measured overestimation
            hook.on_episode(self, seed_index, metrics)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "seeds": self.seeds,
            "policy": self.policy.state_dict(), "policy_target": self.policy_target.state_dict(),
            "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
            "q_weight": self.q_weight.state_dict(),
            "policy_opt": self.policy_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "rng": self.rng.state_dict(),
            "K": {"Kb": self.Kb, "Kt": self.Kt},  # hooks may move them (adaptive K)
            "hooks": [(type(hook).__name__, hook.state_dict()) for hook in self.hooks],
        }

    def load_state_dict(self, state: dict) -> None:
        self.seeds = list(state["seeds"])
        self.eval_rng = SeedRNG(self.seeds, self.device, EVAL_STREAM)
        for name in ("policy", "policy_target", "critic", "critic_target", "q_weight",
                     "policy_opt", "critic_opt", "rng"):
            getattr(self, name).load_state_dict(state[name])
        require("hooks" in state and "K" in state, "this QVPO checkpoint predates the research hooks "
                "(qvpo.hooks); it cannot be resumed by this version: start the run again")
        self.Kb, self.Kt = state["K"]["Kb"], state["K"]["Kt"]
        saved, here = [name for name, _ in state["hooks"]], [type(h).__name__ for h in self.hooks]
        require(saved == here, f"the checkpoint's QVPO hooks {saved} are not this run's {here}")
        for hook, (_, hook_state) in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)

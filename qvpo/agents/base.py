"""The interface every agent offers the trainer.

An agent never touches MLflow, files or environments: it maps observations to actions and
a replay buffer to a parameter update, and returns its metrics as tensors (no host sync; the
trainer reads them every `log_every` steps).
"""

from __future__ import annotations

import abc

import torch

from qvpo.buffers import ReplayBuffer
from qvpo.errors import require, require_int
from qvpo.timing import PhaseTimer


class Agent(abc.ABC):
    """Built by the trainer as AgentClass(obs_dim=, action_dim=, device=, total_steps=, timer=, seeds=).

    Off-policy agents learn from the trainer's replay buffers, one `update` per env step;
    on-policy agents (`OnPolicyAgent`) from rollouts they collect themselves.
    """

    on_policy = False
    # a reference point that learns nothing (the random policy): it ignores other agents' bindings
    baseline = False
    # env steps of uniformly random actions before the first update: the algorithm's own setting
    # (TD3's reference uses 25k, SAC's and QVPO's 10k); Trainer.warmup_steps overrides it for all
    warmup_steps: int = 0

    batch_size: int
    device: torch.device
    timer: PhaseTimer
    seeds: list[int]

    def _setup(self, name: str, device, timer: PhaseTimer | None, seeds, batch_size: int,
               gamma: float, tau: float = 1.0, warmup_steps: int = 0, **learning_rates: float) -> None:
        """What every agent checks and keeps: device, timer, seeds, warm-up and the TD settings."""
        require_int(warmup_steps, f"{name}.warmup_steps (env steps)", 0)
        self.warmup_steps = warmup_steps
        require(len(seeds) >= 1, f"{name} needs at least one seed")
        require_int(batch_size, f"{name}.batch_size", 1)
        require(0 <= gamma <= 1, f"{name}.gamma must be in [0, 1], got {gamma}")
        require(0 < tau <= 1, f"{name}.tau must be in (0, 1], got {tau}")
        for lr_name, lr in learning_rates.items():
            require(lr > 0, f"{name}.{lr_name} must be > 0, got {lr}")
        self.device = torch.device(device)
        self.timer = timer or PhaseTimer(self.device)
        self.seeds = list(seeds)
        self.batch_size, self.gamma, self.tau = batch_size, gamma, tau

    @abc.abstractmethod
    def act(self, obs: torch.Tensor, explore: bool) -> torch.Tensor:
        """obs (N, M, S) on self.device -> actions (N, M, A) in [-1, 1] (N seeds, M states each).

        explore=True is the behaviour policy (data collection), False the evaluation policy.
        """

    @property
    def has_q_critic(self) -> bool:
        """Whether the agent has a twin Q critic (all off-policy agents but Random)."""
        from qvpo.nets import TwinQ

        return isinstance(getattr(self, "critic", None), TwinQ)

    @torch.no_grad()
    def q_estimate(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2)(s, a) of the agent's critic, (N, M) for obs (N, M, S) and actions (N, M, A),
        for agents with `has_q_critic`. The trainer compares it with the discounted Monte-Carlo
        return of finished episodes (the `q/overestimation` metric)."""
        return self.critic.q_min(obs, action)

    def observe_episode(self, seed_index: int, metrics: dict[str, float]) -> None:
        """Called by the trainer at each episode end of seed `seed_index` with that episode's
        metrics (train/episode_return, q/overestimation, ...); agents with rules that read them
        (QVPO's adaptive Kt) override this."""

    def begin_evaluation(self, tag: int) -> None:
        """Called before each evaluation (tag = env step): agents re-seed their evaluation noise
        here, so evaluation never consumes training randomness and each seed's evaluation is
        the same whether it trains alone or with other seeds."""

    @abc.abstractmethod
    def update(self, buffer: ReplayBuffer, step: int) -> dict[str, torch.Tensor | float]:
        """One gradient update at env step `step`; returns metrics named `group/name`."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to continue training: networks, targets, optimisers."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class OnPolicyAgent(Agent):
    """An agent that learns from its own rollouts (PPO, SPO).

    The trainer's on-policy loop calls `explore` every env step, stores its outputs with the
    rewards in a `RolloutBuffer` of `rollout_steps` steps, and hands the finished rollout to
    `update` (no warm-up, no replay buffer).
    """

    on_policy = True
    rollout_steps: int

    @abc.abstractmethod
    def explore(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw observations (N, S) -> {'env_action': (N, A) in [-1, 1] for the env, and what the
        rollout stores: 'obs' (N, S) as the policy saw it, 'action' (N, A), 'log_prob' (N,),
        'value' (N,)}. May update observation statistics."""

    @abc.abstractmethod
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) of raw observations (N, S) -> (N,), without updating any statistics."""

    @abc.abstractmethod
    def update(self, rollout, step: int) -> dict[str, torch.Tensor | float]:  # type: ignore[override]
        """Learn from one finished `qvpo.rollout.Rollout`; returns metrics named `group/name`."""

"""The interface every agent offers the trainer.

An agent never touches MLflow, files or environments: it maps observations to actions and
a replay buffer to a parameter update, and returns its metrics as tensors (no host sync; the
trainer reads them every `log_every` steps).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from qvpo.buffers import ReplayBuffer
from qvpo.errors import require, require_int
from qvpo.timing import PhaseTimer


@dataclass(frozen=True)
class AgentContext:
    """What the trainer tells an agent about the run, passed once as the agent's first argument
    (the algorithm's own settings are its keyword arguments, bound with gin).

    obs_dim, action_dim: the env's flat observation and action sizes (actions live in [-1, 1]).
    seeds: the seeds trained together in this process (the leading dimension of everything).
    device: where networks and tensors live.
    total_steps: the run's length in env steps (schedules that decay over the run read it).
    timer: the trainer's phase timer (None = a private one).
    discrete_actions: n for a task with n discrete actions, relaxed to [-1, 1]^n (the env takes
      the argmax; docs/environments.md#discrete-actions), None for a continuous task. Agents with
      a standard discrete form (SAC, PPO) use it; the others act on the relaxation.
    """

    obs_dim: int
    action_dim: int
    seeds: tuple[int, ...] = (0,)
    device: torch.device | str = "cpu"
    total_steps: int = 1_000_000
    timer: PhaseTimer | None = None
    discrete_actions: int | None = None


class Agent(abc.ABC):
    """The contract between an agent and the trainer (qvpo.train.Trainer).

    Built as AgentClass(context, **settings); an agent keeps the context's fields as attributes
    (obs_dim, action_dim, seeds, device, total_steps, timer, discrete_actions; `self.context` is
    the context it was built with: load_state_dict restores `seeds` from the checkpoint). What the trainer reads besides the
    methods below:

      on_policy      False: the off-policy loop (replay buffers, `update(buffers, step)` once per
                     env step after the warm-up); True (`OnPolicyAgent`): the on-policy loop.
      baseline       True only for reference points that learn nothing (the random policy): they
                     ignore other agents' gin bindings.
      warmup_steps   env steps of uniformly random actions before the first update: the
                     algorithm's own setting (TD3's reference uses 25k, SAC's and QVPO's 10k);
                     Trainer.warmup_steps overrides it for all.
      batch_size     the minibatch an off-policy update samples (the trainer waits until every
                     replay buffer holds that many transitions).
      has_q_critic   whether `q_estimate` exists (the trainer's overestimation measurement).
      gamma          the discount (set by `_setup`): what the overestimation measurement
                     discounts the Monte-Carlo returns with, for agents with a Q critic.

    Every quantity is batched over seeds: a metric is a tensor (N,) or a float, and an agent with
    seeds (a, b) computes exactly what two agents with seeds (a,) and (b,) compute
    (tests/test_agent_contract.py checks this and the rest of the contract for every algorithm).
    """

    on_policy = False
    baseline = False
    warmup_steps: int = 0
    batch_size: int
    gamma: float

    def __init__(self, context: AgentContext):
        require(len(context.seeds) >= 1, f"{type(self).__name__} needs at least one seed")
        require_int(context.obs_dim, "the observation size", 1)
        require_int(context.action_dim, "the action size", 1)
        self.context = context
        self.obs_dim, self.action_dim = context.obs_dim, context.action_dim
        self.seeds = list(context.seeds)
        self.device = torch.device(context.device)
        self.total_steps = context.total_steps
        self.timer = context.timer or PhaseTimer(self.device)
        self.discrete_actions = context.discrete_actions
        if self.discrete_actions is not None:
            require(self.discrete_actions == self.action_dim,
                    f"a task with {self.discrete_actions} discrete actions is relaxed to [-1, 1]^{self.discrete_actions}, "
                    f"got action_dim {self.action_dim}")

    def _setup(self, name: str, batch_size: int, gamma: float, tau: float = 1.0, warmup_steps: int = 0,
               **learning_rates: float) -> None:
        """The settings every agent checks and keeps: warm-up, batch and the TD settings."""
        require_int(warmup_steps, f"{name}.warmup_steps (env steps)", 0)
        self.warmup_steps = warmup_steps
        require_int(batch_size, f"{name}.batch_size", 1)
        require(0 <= gamma <= 1, f"{name}.gamma must be in [0, 1], got {gamma}")
        require(0 < tau <= 1, f"{name}.tau must be in (0, 1], got {tau}")
        for lr_name, lr in learning_rates.items():
            require(lr > 0, f"{name}.{lr_name} must be > 0, got {lr}")
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

"""Rollout buffer and GAE for the on-policy agents (PPO, SPO).

One rollout is `steps` consecutive env steps of every seed's env, kept as (N, steps, ...) tensors on
the agent's device. Episodes may end inside a rollout; two flags keep the cases apart:
`terminal` (the episode terminated: no bootstrap) and `done` (terminated or truncated: the
advantage recursion stops). A time-limit truncation bootstraps from the value of the real final
observation, which the trainer computes and stores in `bootstrap_value` (CleanRL and most PPO
code treat truncation as termination; here every algorithm bootstraps at truncations:
docs/algorithms.md#deviations-from-the-papers-setting).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qvpo.errors import require_int


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
        terminals: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16), all tensors (..., T):

      delta_t = r_t + gamma (1 - terminal_t) V(s_{t+1}) - V(s_t)
      A_t     = delta_t + gamma lam (1 - done_t) A_{t+1},    A_T = 0

    next_values[t] is V of the real next observation of step t (also at a truncation).
    """
    deltas = rewards + gamma * (1.0 - terminals) * next_values - values
    carry = gamma * lam * (1.0 - dones)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        last = deltas[..., t] + carry[..., t] * last
        adv[..., t] = last
    return adv


class Rollout(NamedTuple):
    """A finished rollout, every field (N, T, ...)."""
    obs: torch.Tensor            # (N, T, S) the observations the policy saw (normalised, if it does)
    action: torch.Tensor         # (N, T, A) the sampled (unclipped) actions
    log_prob: torch.Tensor       # (N, T) log pi_old(a|s)
    value: torch.Tensor          # (N, T) V_old(s)
    reward: torch.Tensor         # (N, T) env rewards (unscaled)
    terminal: torch.Tensor       # (N, T) 1.0 where the episode terminated
    done: torch.Tensor           # (N, T) 1.0 where it terminated or was truncated
    next_value: torch.Tensor     # (N, T) V_old of the real next observation (0 after a termination)


class RolloutBuffer:
    """Fixed-size storage for one rollout of N seeds; add() once per env step, then finish()."""

    def __init__(self, seeds: int, steps: int, obs_dim: int, action_dim: int,
                 device: torch.device | str = "cpu"):
        require_int(steps, "rollout steps", 1)
        self.steps, self.device = int(steps), torch.device(device)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.zeros(seeds, steps, obs_dim, **f32)
        self.action = torch.zeros(seeds, steps, action_dim, **f32)
        self.log_prob = torch.zeros(seeds, steps, **f32)
        self.value = torch.zeros(seeds, steps, **f32)
        self.reward = torch.zeros(seeds, steps, **f32)
        self.terminal = torch.zeros(seeds, steps, **f32)
        self.done = torch.zeros(seeds, steps, **f32)
        self.bootstrap_value = torch.zeros(seeds, steps, **f32)  # V(final obs) at truncations
        self.t = 0

    @property
    def full(self) -> bool:
        return self.t == self.steps

    def add(self, obs, action, log_prob, value, reward, terminal, done, bootstrap_value=None) -> None:
        """One env step of every seed: obs (N, S), action (N, A), the rest (N,)."""
        t = self.t
        if t >= self.steps:
            raise IndexError(f"RolloutBuffer.add: the rollout already holds {self.steps} steps; call finish()")
        self.obs[:, t], self.action[:, t] = obs, action
        self.log_prob[:, t], self.value[:, t] = log_prob, value
        for dst, x in ((self.reward, reward), (self.terminal, terminal), (self.done, done)):
            dst[:, t] = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        self.bootstrap_value[:, t] = 0.0 if bootstrap_value is None else bootstrap_value
        self.t = t + 1

    def finish(self, last_value: torch.Tensor) -> Rollout:
        """The rollout, given V(s_T) of the observation after its last step (N,); resets for the next."""
        if not self.full:
            raise RuntimeError(f"RolloutBuffer.finish: only {self.t} of {self.steps} steps added")
        following = torch.cat([self.value[:, 1:], last_value[:, None]], dim=1)
        next_value = torch.where(self.done.bool(), self.bootstrap_value, following)
        self.t = 0
        return Rollout(self.obs.clone(), self.action.clone(), self.log_prob.clone(), self.value.clone(),
                       self.reward.clone(), self.terminal.clone(), self.done.clone(), next_value)

    # ------------------------------------------------------------------ checkpoints
    _FIELDS = ("obs", "action", "log_prob", "value", "reward", "terminal", "done", "bootstrap_value")

    def state_dict(self) -> dict:
        """The partial rollout (a checkpoint may fall inside one)."""
        return {"t": self.t, **{k: getattr(self, k)[:, :self.t].cpu().clone() for k in self._FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        for k in self._FIELDS:
            getattr(self, k)[:, :self.t] = state[k].to(self.device)

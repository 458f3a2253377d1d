"""Running statistics for the on-policy agents' observation and reward normalisation.

The PPO implementations the MuJoCo results come from (OpenAI baselines' VecNormalize, CleanRL,
SPO's reference code through Gymnasium's wrappers) normalise observations by a running mean and
variance and scale rewards by the running standard deviation of the discounted return. Here the
statistics belong to the agent (one set per seed), so they are saved in its checkpoints and the
evaluation policy sees observations exactly as the trained one did.
"""

from __future__ import annotations

import torch


class RunningMeanStd:
    """Per-seed running mean and variance of (N, ..., D) samples (Chan et al.'s parallel update),
    in float64. `count` starts at 1e-4 as in baselines / Gymnasium, so the first update is ~exact."""

    def __init__(self, seeds: int, shape: tuple[int, ...], device: torch.device | str):
        f64 = dict(dtype=torch.float64, device=device)
        self.mean = torch.zeros(seeds, *shape, **f64)
        self.var = torch.ones(seeds, *shape, **f64)
        self.count = 1e-4  # every seed adds the same number of samples

    def update(self, x: torch.Tensor) -> None:
        """x (N, M, *shape): M new samples per seed."""
        x = x.to(torch.float64)
        m = x.shape[1]
        batch_mean, batch_var = x.mean(dim=1), x.var(dim=1, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + m
        self.mean = self.mean + delta * (m / total)
        self.var = (self.var * self.count + batch_var * m + delta.pow(2) * (self.count * m / total)) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = state["mean"].to(self.mean), state["var"].to(self.var)
        self.count = float(state["count"])


class ObsNormalizer:
    """(obs - mean) / sqrt(var + eps), clipped to +-clip; `update=True` adds the samples first
    (Gymnasium's NormalizeObservation + TransformObservation(clip), as CleanRL and SPO use)."""

    def __init__(self, seeds: int, obs_dim: int, device, clip: float = 10.0, eps: float = 1e-8):
        self.rms = RunningMeanStd(seeds, (obs_dim,), device)
        self.clip, self.eps = clip, eps

    def __call__(self, obs: torch.Tensor, update: bool) -> torch.Tensor:
        """obs (N, M, S) -> normalised float32 (N, M, S)."""
        if update:
            self.rms.update(obs)
        z = (obs - self.rms.mean[:, None]) / torch.sqrt(self.rms.var[:, None] + self.eps)
        return z.clamp(-self.clip, self.clip).to(torch.float32)


class RewardScaler:
    """r_t / sqrt(Var[R] + eps), clipped to +-clip, where R_t = r_t + gamma R_{t-1} is the running
    discounted return of each seed's env, reset after an episode ends (baselines' VecNormalize)."""

    def __init__(self, seeds: int, gamma: float, device, clip: float = 10.0, eps: float = 1e-8):
        self.rms = RunningMeanStd(seeds, (), device)
        self.ret = torch.zeros(seeds, dtype=torch.float64, device=device)
        self.gamma, self.clip, self.eps = gamma, clip, eps

    def __call__(self, rewards: torch.Tensor, dones: torch.Tensor) -> torch.Tensor:
        """Scale a rollout's rewards (N, T) in time order, updating the statistics step by step
        exactly as a per-step env wrapper would."""
        out = torch.empty_like(rewards)
        for t in range(rewards.shape[1]):
            r = rewards[:, t].to(torch.float64)
            self.ret = self.ret * self.gamma + r
            self.rms.update(self.ret[:, None])
            out[:, t] = (r / torch.sqrt(self.rms.var + self.eps)).clamp(-self.clip, self.clip).to(out.dtype)
            self.ret = self.ret * (1.0 - dones[:, t].to(torch.float64))
        return out

    def state_dict(self) -> dict:
        return {"rms": self.rms.state_dict(), "ret": self.ret.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state["rms"])
        self.ret = state["ret"].to(self.ret)

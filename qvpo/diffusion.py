"""DDPM for actions: noise schedules and the diffusion policy's sampler and (weighted) loss.

Follows the QVPO / DIPO reference code (shared/paper/QVPO.md): epsilon-prediction, cosine beta
schedule (s = 0.008, betas clipped to 0.999), predicted x0 clamped to [-1, 1] while sampling, no
noise at the last step (t = 0), final action clamped to [-1, 1].
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from qvpo.errors import require, require_int
from qvpo.nets import Denoiser


def cosine_beta_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule: alpha_bar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    alpha_bar = torch.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0, max_beta).to(torch.float32)


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)


def vp_beta_schedule(T: int) -> torch.Tensor:
    """Variance-preserving schedule of Diffusion-QL / QSM (b_min 0.1, b_max 10)."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    b_max, b_min = 10.0, 0.1
    alpha = torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T ** 2)
    return (1 - alpha).to(torch.float32)


SCHEDULES = {"cosine": cosine_beta_schedule, "linear": linear_beta_schedule, "vp": vp_beta_schedule}


class NoiseSchedule(nn.Module):
    """Every constant of the forward and reverse processes, computed once (buffers move with .to)."""

    def __init__(self, T: int, kind: str):
        super().__init__()
        require_int(T, "DiffusionPolicy.T (diffusion steps)", 1)
        require(kind in SCHEDULES, f"unknown beta schedule {kind!r}; expected one of {sorted(SCHEDULES)}")
        betas = SCHEDULES[kind](T).to(torch.float64)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        consts = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            # x0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            # posterior q(x_{t-1} | x_t, x0) mean = c0 x0 + ct x_t
            "posterior_c0": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_ct": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
            # the reference clips the log-variance at 1e-20 (the t = 0 variance is 0)
            "posterior_std": (0.5 * post_var.clamp(min=1e-20).log()).exp(),
        }
        self.T = T
        for name, value in consts.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)


@gin.configurable
class DiffusionPolicy(nn.Module):
    """A conditional DDPM over actions in [-1, 1]^A.

    Args:
      T: diffusion steps (QVPO.md: 20 for QVPO).
      schedule: beta schedule name (QVPO.md: cosine).
      clip_x0: clamp the predicted x0 to [-1, 1] at each sampling step (QVPO.md: yes).
    """

    def __init__(self, state_dim: int, action_dim: int, T: int = 20, schedule: str = "cosine",
                 clip_x0: bool = True):
        super().__init__()
        self.action_dim = action_dim
        self.schedule = NoiseSchedule(T, schedule)
        self.denoiser = Denoiser(state_dim, action_dim)
        self.clip_x0 = clip_x0

    @property
    def T(self) -> int:
        return self.schedule.T

    def sample(self, states: torch.Tensor, n: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n actions for each state: (B, S) -> (B, n, A).

        All B*n chains run through each denoising step as one tensor. `noise`, if given, is
        (T, B*n, A): the initial x_T, then the noise of steps T-1 .. 1 (to compare samplers).
        """
        B, A, T = states.shape[0], self.action_dim, self.T
        sch = self.schedule
        s = states.repeat_interleave(n, dim=0)  # row b*n + j is candidate j of state b
        # the time MLP depends only on t: evaluate it for all T steps at once, not per row
        temb = self.denoiser.time_embedding(torch.arange(T, device=states.device))
        x = torch.randn(B * n, A, device=states.device) if noise is None else noise[0]
        for i in reversed(range(T)):
            eps = self.denoiser.body(torch.cat([x, temb[i].expand(B * n, -1), s], dim=-1))
            x0 = sch.sqrt_recip_alpha_bar[i] * x - sch.sqrt_recipm1_alpha_bar[i] * eps
            if self.clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            x = sch.posterior_c0[i] * x0 + sch.posterior_ct[i] * x
            if i > 0:  # no noise at the last step
                z = torch.randn_like(x) if noise is None else noise[T - i]
                x = x + sch.posterior_std[i] * z
        return x.clamp(-1.0, 1.0).view(B, n, A)

    def loss(self, states: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor | None = None,
             t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted denoising loss: mean_i w_i * mean_d (eps - eps_theta(sqrt(ab_t) a_i + sqrt(1-ab_t) eps, s_i, t))^2.

        states (N, S), actions (N, A), weights (N,) or None for the plain (unweighted) DDPM loss.
        t (N,) ~ Uniform{0..T-1} and eps ~ N(0, I) are drawn here unless given.
        """
        N = actions.shape[0]
        if t is None:
            t = torch.randint(0, self.T, (N,), device=actions.device)
        if eps is None:
            eps = torch.randn_like(actions)
        sch = self.schedule
        a_t = sch.sqrt_alpha_bar[t, None] * actions + sch.sqrt_one_minus_alpha_bar[t, None] * eps
        per_row = (self.denoiser(a_t, t, states) - eps).pow(2).mean(dim=-1)
        if weights is not None:
            per_row = per_row * weights
        return per_row.mean()

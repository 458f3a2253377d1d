"""Networks shared by the agents: MLPs with Mish, the sinusoidal time embedding, twin Q.

Initialisation follows the QVPO reference code: every Linear gets weight ~ N(0, 1/(2*sqrt(fan_in)))
and bias 0 (the code intends a truncated normal but never truncates, so the effective init is
the plain normal; see shared/paper/QVPO.md). `init='torch'` keeps PyTorch's default instead.
"""

from __future__ import annotations

import math

import gin
import torch
from torch import nn

from qvpo.errors import require


def mish(x: torch.Tensor) -> torch.Tensor:
    """Exact Mish, x * tanh(softplus(x)), written with one exp.

    tanh(log(1 + e^x)) = n / (n + 2) with n = e^x (e^x + 2). On CPU this is 2-3x faster than
    F.mish (see QVPO.md, "Cost"); the clamp only avoids inf for x > 20, where n / (n + 2) == 1
    to float32 precision anyway.
    """
    e = torch.exp(x.clamp(max=20.0))
    n = e * (e + 2.0)
    return x * n / (n + 2.0)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


ACTIVATIONS = {"mish": Mish, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    require(name in ACTIVATIONS, f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


@gin.configurable
def init_linear(module: nn.Module, scheme: str = "reference") -> None:
    """Initialise every nn.Linear inside `module`.

    Args:
      scheme: 'reference' = N(0, 1/(2 sqrt(fan_in))) weights and zero bias (QVPO / DIPO reference
        code), 'torch' = PyTorch's default (leave as is), 'xavier' = Xavier-uniform, zero bias
        (QSM reference code).
    """
    require(scheme in ("reference", "torch", "xavier"),
            f"init_linear.scheme must be 'reference', 'torch' or 'xavier', got {scheme!r}")
    if scheme == "torch":
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if scheme == "reference":
                nn.init.normal_(m.weight, mean=0.0, std=1.0 / (2.0 * math.sqrt(m.in_features)))
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), make_activation(activation)]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of integer diffusion steps t, shape (..., dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / (half - 1)))
    angles = t.to(torch.float32)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


@gin.configurable
class Denoiser(nn.Module):
    """epsilon_theta(a_t, t, s): the noise predictor of the diffusion policy.

    Input is [a_t, time embedding, s]; the time embedding is sinusoidal(time_dim) ->
    Linear(time_dim, time_hidden) -> Mish -> Linear(time_hidden, time_dim), as in the reference.
    """

    def __init__(self, state_dim: int, action_dim: int,
                 hidden: tuple[int, ...] = (256, 256, 256),  # QVPO.md: 3 x 256
                 time_dim: int = 32,  # QVPO.md: sinusoidal(32)
                 time_hidden: int = 256,  # QVPO.md: Linear(32, 256) -> Mish -> Linear(256, 32)
                 activation: str = "mish"):
        super().__init__()
        require(time_dim >= 4 and time_dim % 2 == 0, f"Denoiser.time_dim must be even and >= 4, got {time_dim}")
        require(len(hidden) >= 1 and all(h >= 1 for h in hidden),
                f"Denoiser.hidden must be a non-empty tuple of positive widths, got {hidden}")
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_hidden), make_activation(activation),
                                      nn.Linear(time_hidden, time_dim))
        self.body = mlp(action_dim + time_dim + state_dim, tuple(hidden), action_dim, activation)
        init_linear(self)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(sinusoidal_embedding(t, self.time_dim))

    def forward(self, a_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """a_t: (N, A), t: (N,) integer steps, s: (N, S) -> predicted noise (N, A)."""
        return self.body(torch.cat([a_t, self.time_embedding(t), s], dim=-1))


@gin.configurable
class TwinQ(nn.Module):
    """Two independent Q networks on [s, a] (clipped double-Q)."""

    def __init__(self, state_dim: int, action_dim: int,
                 hidden: tuple[int, ...] = (256, 256, 256),  # QVPO.md: 3 x 256 Mish
                 activation: str = "mish"):
        super().__init__()
        require(len(hidden) >= 1 and all(h >= 1 for h in hidden),
                f"TwinQ.hidden must be a non-empty tuple of positive widths, got {hidden}")
        self.q1 = mlp(state_dim + action_dim, tuple(hidden), 1, activation)
        self.q2 = mlp(state_dim + action_dim, tuple(hidden), 1, activation)
        init_linear(self)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sa = torch.cat([s, a], dim=-1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def q_min(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        q1, q2 = self(s, a)
        return torch.minimum(q1, q2)

"""Q-weight transforms: from the Q values of the Nd candidates of each state to the weight of its
best candidate in the Q-weighted variational loss.

Each transform maps q (..., K) -> w (...), the weight of the best of the K candidates (selection
happens in the agent; every transform weights the best candidate, as the reference code does).
The leading dimensions are (seeds, states). Names and forms follow the reference code's
(wadx2019/qvpo@40a1974 agent/q_transform.py; docs/paper-notes.md#q-weight-transforms).
"""

from __future__ import annotations

import gin
import torch
from torch import nn

from qvpo.errors import require


class QWeight(nn.Module):
    """Base class: transforms are modules so running statistics are saved with the agent."""

    def reset(self, num_seeds: int) -> None:
        """Called by the agent once it knows how many seeds it trains (for per-seed statistics)."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def metrics(self) -> dict[str, torch.Tensor]:
        """Metrics of the last call, logged with the update's (e.g. MPO's temperature); none here."""
        return {}


@gin.configurable
class QAdv(QWeight):
    """qadv (QVPO default): w = max(Q(s, a*) - V(s), 0), V(s) = mean of Q over the N candidates."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (q.max(dim=-1).values - q.mean(dim=-1)).clamp(min=0.0)


@gin.configurable
class QCut(QWeight):
    """qcut: w = max(Q(s, a*), c), a clip at c (not a shift). c = 1.0 in the reference code."""

    def __init__(self, c: float = 1.0):
        super().__init__()
        self.c = c

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.max(dim=-1).values.clamp(min=self.c)


@gin.configurable
class QReLU(QWeight):
    """qrelu: w = max(Q(s, a*), -q_neg) + q_neg, the shift of Q to non-negative values."""

    def __init__(self, q_neg: float = 0.0):
        super().__init__()
        require(q_neg >= 0, f"QReLU.q_neg must be >= 0, got {q_neg}")
        self.q_neg = q_neg

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.max(dim=-1).values.clamp(min=-self.q_neg) + self.q_neg


@gin.configurable
class QExp(QWeight):
    """qexp (code name qexpn): w = exp(beta * clip((Q(s, a*) - mu) / sigma, -8, 8)).

    mu, sigma are running mean / std of the candidates' Q values (exponential moving averages
    with rate `momentum`, per seed), so the weight is scale-free. Differences from the reference
    qexpn: we average the variance (not the std), start from the first batch's statistics (not
    0 and 1) and use the biased variance. beta = 1.0 is the reference's parser default (`--beta`;
    docs/paper-notes.md#q-weight-transforms).
    """

    def __init__(self, beta: float = 1.0, momentum: float = 0.001, clip: float = 8.0):  # 0.001: reference alpha_mean/alpha_std
        super().__init__()
        require(beta > 0, f"QExp.beta must be > 0, got {beta}")
        require(0 < momentum <= 1, f"QExp.momentum must be in (0, 1], got {momentum}")
        self.beta, self.momentum, self.clip = beta, momentum, clip
        self.reset(1)

    def reset(self, num_seeds: int) -> None:
        # per-seed running statistics, shape (N, 1) to broadcast over (N, B)
        self.register_buffer("mean", torch.zeros(num_seeds, 1))
        self.register_buffer("var", torch.ones(num_seeds, 1))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = q.reshape(q.shape[0], -1)
            m, v = flat.mean(dim=1, keepdim=True), flat.var(dim=1, unbiased=False, keepdim=True)
            # first call: take the batch statistics as they are (no host sync: torch.where)
            k = torch.where(self.initialised, self.momentum, 1.0)
            self.mean.lerp_(m, k)
            self.var.lerp_(v, k)
            self.initialised.fill_(True)
        z = (q.max(dim=-1).values - self.mean) / self.var.clamp(min=1e-8).sqrt()
        return torch.exp(self.beta * z.clamp(-self.clip, self.clip))


@gin.configurable
class QExpAdv(QWeight):
    """Exponentiated advantage, as advantage-weighted regression and MPO weight their targets
    (Peng et al. 2019, "AWR", eq. 7; Abdolmaleki et al. 2018, "MPO", E-step):
    w = min(exp((Q(s, a*) - V(s)) / (beta * sd(s))), max_weight), with V and sd the mean and std of
    the Nd candidates' Q at s, so beta is in units of the candidates' spread (scale-free: raw Q
    grows with the return). max_weight = 20 is AWR's weight clip; beta = 1 is ours (the QVPO
    paper names this combination as an open question, not its values).
    """

    def __init__(self, beta: float = 1.0, max_weight: float = 20.0):
        super().__init__()
        require(beta > 0, f"QExpAdv.beta must be > 0, got {beta}")
        require(max_weight > 0, f"QExpAdv.max_weight must be > 0, got {max_weight}")
        self.beta, self.max_weight = beta, max_weight

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        adv = q.max(dim=-1).values - q.mean(dim=-1)
        scale = self.beta * q.std(dim=-1, unbiased=False).clamp(min=1e-6)
        return torch.exp(adv / scale).clamp(max=self.max_weight)


@gin.configurable
class Uniform(QWeight):
    """w = 1: no Q-weighting (selection of the best candidate is kept). For ablations."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.ones(q.shape[:-1], device=q.device, dtype=q.dtype)

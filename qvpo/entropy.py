"""Differential entropy of a policy from its samples: the Kozachenko-Leonenko k-NN estimator.

QVPO already draws Nd candidates per state for its policy step; their k-nearest-neighbour
distances give an estimate of the entropy of the policy at that state, with no extra sampling
(used by qvpo.research.adaptive_entropy.AdaptiveEntropyWeight and logged as `entropy/estimate`).
"""

from __future__ import annotations

import math

import torch

from qvpo.errors import require


def _digamma(x: int) -> float:
    return float(torch.special.digamma(torch.tensor(float(x), dtype=torch.float64)))


def log_unit_ball_volume(d: int) -> float:
    """log V_d, V_d = pi^(d/2) / Gamma(d/2 + 1): the volume of the Euclidean unit ball in R^d."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def kl_entropy(samples: torch.Tensor, k: int = 1, min_distance: float = 1e-6) -> torch.Tensor:
    """Kozachenko-Leonenko estimate of differential entropy in nats, one per sample set.

    samples (..., n, d) -> (...): the n rows of each set are i.i.d. draws of one d-dim density p.

        H_hat = psi(n) - psi(k) + log V_d + (d / n) * sum_i log r_i

    r_i = Euclidean distance from sample i to its k-th nearest neighbour among the other n - 1,
    V_d = pi^(d/2) / Gamma(d/2 + 1), psi = digamma. Kozachenko & Leonenko (1987), "Sample estimate
    of the entropy of a random vector", Probl. Peredachi Inf. 23(2); in the form of Kraskov,
    Stoegbauer & Grassberger (2004), "Estimating mutual information", Phys. Rev. E 69, eq. (20)
    (there with eps_i = 2 r_i and c_d = V_d / 2^d, the same number). Asymptotically unbiased; at
    small n it is biased upwards for densities with hard boundaries (a cube) and its variance
    grows with d.

    Distances below `min_distance` are raised to it: QVPO clamps actions to [-1, 1], so
    candidates saturated at a corner coincide and log 0 would give -inf. The estimate of a
    collapsed set is then log(min_distance) * d + const: very low, finite.
    Computed in float32 (float64 kept); the all-pairs distance is exact (no matmul
    expansion, which loses the small distances to cancellation).
    """
    require(samples.dim() >= 2, f"kl_entropy needs samples (..., n, d), got shape {tuple(samples.shape)}")
    n, d = samples.shape[-2], samples.shape[-1]
    require(1 <= k < n, f"kl_entropy needs 1 <= k < n, got k={k}, n={n}")
    x = samples if samples.dtype in (torch.float32, torch.float64) else samples.float()  # bf16 sampler: upcast
    lead = x.shape[:-2]
    x = x.reshape(-1, n, d)
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (M, n, n)
    dist = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype, device=dist.device))
    r = dist.topk(k, dim=-1, largest=False).values[..., k - 1].clamp(min=min_distance)  # (M, n)
    const = _digamma(n) - _digamma(k) + log_unit_ball_volume(d)
    return (const + d * r.log().mean(dim=-1)).reshape(lead)

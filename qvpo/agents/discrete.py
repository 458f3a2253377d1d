"""Categorical policies on the discrete relaxation: what SAC's and PPO's discrete forms share.

A task with n discrete actions is relaxed to [-1, 1]^n and the env plays the argmax of the vector
(qvpo.envs.DiscreteRelaxation, docs/environments.md#discrete-actions). An agent with a categorical
policy over the n actions hands the env the index i as the vector `to_vector(i)`: +1 at i, -1
elsewhere, whose argmax is i; replay buffers and rollouts store that vector, and `to_index` (the
argmax, ties to the lowest index as the env's) recovers i from it, or from any vector the env
played (the warm-up's uniform samples of the box). docs/algorithms.md#discrete-actions.

Sampling draws from the agent's per-seed streams (qvpo.rng.SeedRNG), one uniform per row, by the
inverse CDF, so a seed's draws are the same trained alone or with other seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvpo.rng import SeedRNG


def to_vector(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (...) -> their vectors in [-1, 1]^n (...,  n): +1 at the index, -1 elsewhere."""
    return F.one_hot(index, n).float() * 2.0 - 1.0


def to_index(vector: torch.Tensor) -> torch.Tensor:
    """Vectors (..., n) -> the discrete action the env plays for each, argmax (...) (torch.argmax
    returns the first maximal index: ties go to the lowest, as DiscreteRelaxation's)."""
    return vector.argmax(dim=-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf_{i-1} <= u < cdf_i for probabilities (..., n) and uniforms u (..., 1) in
    [0, 1): P(i) = probs_i exactly (an action of probability 0 is never drawn). The last index
    also takes u >= cdf_n, where the float sum of the probabilities falls short of 1."""
    cdf = probs.cumsum(dim=-1)
    return (cdf <= u).sum(dim=-1).clamp(max=probs.shape[-1] - 1)


def sample_index(logits: torch.Tensor, rng: SeedRNG) -> torch.Tensor:
    """One draw per row from the categorical with these logits (N, M, n) -> indices (N, M), with
    one uniform per row from each seed's stream."""
    return inverse_cdf(logits.softmax(dim=-1), rng.rand(logits.shape[1], 1))


def log_prob_entropy(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(index) (...) and the entropy -sum_a pi(a) log pi(a) (...) of the categorical with
    these logits (..., n)."""
    log_p = logits.log_softmax(dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return log_p.gather(-1, index[..., None]).squeeze(-1), entropy

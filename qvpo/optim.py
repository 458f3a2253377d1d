"""Optimisers as gin configurables.

`adam` carries the reference code's Adam settings as its defaults (eps 1e-5), so an agent that
is built without any gin file still runs the paper's configuration. torch's own optimisers are
registered too (`@torch.optim.AdamW`, ...) for users who want them; we register them ourselves
because `gin.torch` imports distutils, which Python 3.12 no longer has.
"""

from __future__ import annotations

import gin
import torch

for _cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop):
    gin.external_configurable(_cls, module="torch.optim")


@gin.configurable
def adam(params, lr: float, eps: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam with the QVPO reference code's eps = 1e-5 (QVPO.md, networks section)."""
    return torch.optim.Adam(params, lr=lr, eps=eps, betas=tuple(betas), weight_decay=weight_decay)


def soft_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau online, for all parameters at once."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_norm: float | None) -> torch.Tensor:
    """Clip the gradient norm (if max_norm) and step; returns the pre-clip norm (a tensor, no sync)."""
    params = list(params)
    if max_norm is not None and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    optimizer.step()
    return norm

"""Optimisers as gin configurables.

`adam` carries the reference code's Adam settings as its defaults (eps 1e-5), so an agent that
is built without any gin file still runs the paper's configuration. torch's own optimisers are
registered too (`@torch.optim.AdamW`, ...) for users who want them; we register them ourselves
because `gin.torch` imports distutils, which Python 3.12 no longer has.
"""

from __future__ import annotations

from contextlib import contextmanager

import gin
import torch

for _cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop):
    gin.external_configurable(_cls, module="torch.optim")


@gin.configurable
def adam(params, lr: float, eps: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam with the QVPO reference code's eps = 1e-5 (docs/paper-notes.md#diffusion-model-and-networks)."""
    # foreach: one multi-tensor kernel per step instead of one per parameter (same maths)
    return torch.optim.Adam(params, lr=lr, eps=eps, betas=tuple(betas), weight_decay=weight_decay,
                            foreach=True)


@contextmanager
def frozen(module: torch.nn.Module):
    """No parameter gradients for `module` inside the block; gradients still flow through it."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


def soft_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau online, for all parameters at once."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float | None,
                  norms: bool = True) -> torch.Tensor | None:
    """Clip each seed's gradient norm to max_norm (if given), step, return the pre-clip norms (N,).

    The parameters are the optimiser's own (no module traversal per step). They carry a leading
    seed dimension; the norm of seed k runs over its slices only, as
    torch.nn.utils.clip_grad_norm_ would in a run of that seed alone (same 1e-6 guard).
    norms=False with no clipping skips the norm computation and returns None.
    """
    clip = max_norm is not None and max_norm > 0
    if not clip and not norms:
        optimizer.step()
        return None
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    sq = torch.stack([g.pow(2).flatten(1).sum(dim=1) for g in grads]).sum(dim=0)  # (N,)
    norm = sq.sqrt()
    if clip:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    optimizer.step()
    return norm

"""Noise schedules, the loss, and what sampling promises about seeds and bounds. The sampler's
paths against its specification (ddpm_sample_reference): tests/test_sampler_spec.py."""

import math

import gin
import numpy as np
import pytest
import torch
from torch import nn

from qvpo.diffusion import DiffusionPolicy, NoiseSchedule, cosine_beta_schedule
from qvpo.rng import SeedRNG, init_generators


def test_cosine_schedule_matches_closed_form():
    T, s = 5, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = np.array([f(t) / f(0) for t in range(1, T + 1)])
    betas_closed = np.minimum(1 - np.array([f(t) / f(t - 1) for t in range(1, T + 1)]), 0.999)
    betas = cosine_beta_schedule(T).numpy()
    np.testing.assert_allclose(betas, betas_closed, rtol=1e-6)
    sch = NoiseSchedule(T, "cosine")
    # with the last beta clipped, the schedule's alpha_bar is the product of (1 - clipped beta)
    np.testing.assert_allclose(sch.alpha_bar.numpy(), np.cumprod(1 - betas_closed), rtol=1e-4)
    np.testing.assert_allclose(sch.alpha_bar.numpy()[:-1], alpha_bar[:-1], rtol=1e-5)
    assert betas[-1] == np.float32(0.999)  # the cosine schedule's last beta is 1, clipped


def test_posterior_constants_closed_form():
    T = 4
    sch = NoiseSchedule(T, "cosine")
    b = cosine_beta_schedule(T).double().numpy()
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(sch.posterior_c0.numpy(), b * np.sqrt(ab_prev) / (1 - ab), rtol=1e-5)
    np.testing.assert_allclose(sch.posterior_ct.numpy(), (1 - ab_prev) * np.sqrt(1 - b) / (1 - ab), rtol=1e-5)
    var = b * (1 - ab_prev) / (1 - ab)
    np.testing.assert_allclose(sch.posterior_std.numpy()[1:], np.sqrt(var[1:]), rtol=1e-5)
    assert sch.posterior_std[0] < 1e-9  # no noise at the last step


class ZeroDenoiser(nn.Module):
    def forward(self, a_t, t, s, T):
        return torch.zeros_like(a_t)


class IdentityDenoiser(nn.Module):
    def forward(self, a_t, t, s, T):
        return a_t


def gens(n=1, seed=0):
    return init_generators(list(range(seed, seed + n)))


def test_weighted_loss_hand_computed(tiny):
    pol = DiffusionPolicy(state_dim=3, action_dim=2, generators=None, denoiser=ZeroDenoiser())
    eps = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    w = torch.tensor([[0.5, 2.0]])
    states, actions = torch.zeros(1, 2, 3), torch.zeros(1, 2, 2)
    t = torch.tensor([[0, 2]])
    # rows: mean_d eps^2 = 2.5 and 4.5; weighted mean over rows = (0.5*2.5 + 2*4.5) / 2
    loss = pol.loss(states, actions, w, t=t, eps=eps)
    assert loss.shape == (1,) and loss.item() == 5.125
    assert pol.loss(states, actions, None, t=t, eps=eps).item() == 3.5


def test_loss_is_per_seed(tiny):
    pol = DiffusionPolicy(state_dim=3, action_dim=2, generators=None, denoiser=ZeroDenoiser())
    eps = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])
    loss = pol.loss(torch.zeros(2, 1, 3), torch.zeros(2, 1, 2), torch.ones(2, 1), t=torch.zeros(2, 1, dtype=torch.long), eps=eps)
    torch.testing.assert_close(loss, torch.tensor([2.5, 4.5]))


def test_loss_noises_actions_with_alpha_bar(tiny):
    pol = DiffusionPolicy(state_dim=1, action_dim=1, generators=None, denoiser=IdentityDenoiser())
    ab = pol.schedule.alpha_bar
    a, e, t = torch.tensor([[[0.5]]]), torch.tensor([[[-1.0]]]), torch.tensor([[1]])
    # prediction = a_t = sqrt(ab) a + sqrt(1 - ab) e; loss = (a_t - e)^2
    expected = (ab[1].sqrt() * 0.5 + (1 - ab[1]).sqrt() * -1.0 + 1.0) ** 2
    assert torch.isclose(pol.loss(torch.zeros(1, 1, 1), a, torch.ones(1, 1), t=t, eps=e)[0], expected)


def test_samples_in_bounds_and_differ_across_candidates(tiny):
    pol = DiffusionPolicy(state_dim=4, action_dim=3, generators=gens())
    a = pol.sample(torch.randn(1, 6, 4), 5, SeedRNG([0], "cpu"))
    assert a.shape == (1, 6, 5, 3)
    assert a.abs().max() <= 1.0
    assert (a[:, :, 0] - a[:, :, 1]).abs().max() > 1e-3  # independent chains


def test_seed_streams_give_each_seed_its_own_samples(tiny):
    """Seed k's samples in a batch of seeds equal those of seed k alone (same weights, stream)."""
    both = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(2, seed=5))
    alone = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(1, seed=6))
    for p_alone, p_both in zip(alone.parameters(), both.parameters()):
        torch.testing.assert_close(p_alone[0], p_both[1])  # same init for seed 6
    states = torch.randn(2, 3, 4)
    a2 = both.sample(states, 4, SeedRNG([5, 6], "cpu"))
    a1 = alone.sample(states[1:], 4, SeedRNG([6], "cpu"))
    torch.testing.assert_close(a2[1:], a1, rtol=1e-5, atol=1e-6)
    assert (a2[0] - a2[1]).abs().max() > 1e-3


def test_samples_of_a_seed_do_not_depend_on_blocking_or_kernels(tiny):
    """The noise is drawn for all rows and steps at once: a seed's samples are the same with the
    native kernels or torch ops and with any block size (so a missing compiler changes speed,
    not results)."""
    torch.manual_seed(0)
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(2))
    states = torch.randn(2, 40, 4)
    runs = []
    for native, block_rows in [(True, None), (False, None), (True, 7), (False, 64), (True, 100_000)]:
        pol.native, pol.block_rows = native, block_rows
        runs.append(pol.sample(states, 8, SeedRNG([0, 1], "cpu")))
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-5, atol=1e-5)


def test_denoiser_and_step_are_not_gin_parameters(tiny):
    """They are objects an agent passes, not settings: binding them is refused, and a policy
    built from gin leaves them out of the operative config (which the run identity hashes)."""
    for param in ("denoiser", "eps_step"):
        with pytest.raises(ValueError, match=param):
            gin.bind_parameter(f"DiffusionPolicy.{param}", None)
    DiffusionPolicy(state_dim=3, action_dim=2, generators=gens())
    operative = gin.operative_config_str()
    assert "DiffusionPolicy.clip_x0 = True" in operative  # it was recorded
    assert "denoiser" not in operative.replace("Denoiser", "") and "eps_step" not in operative

import math

import numpy as np
import pytest
import torch
from torch import nn

from qvpo.diffusion import DiffusionPolicy, NoiseSchedule, cosine_beta_schedule
from qvpo.rng import SeedRNG, init_generators
from conftest import fused_or_skip, num_threads, spy_calls


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
    pol = DiffusionPolicy(state_dim=3, action_dim=2, generators=gens())
    pol.denoiser = ZeroDenoiser()
    eps = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    w = torch.tensor([[0.5, 2.0]])
    states, actions = torch.zeros(1, 2, 3), torch.zeros(1, 2, 2)
    t = torch.tensor([[0, 2]])
    # rows: mean_d eps^2 = 2.5 and 4.5; weighted mean over rows = (0.5*2.5 + 2*4.5) / 2
    loss = pol.loss(states, actions, w, t=t, eps=eps)
    assert loss.shape == (1,) and loss.item() == 5.125
    assert pol.loss(states, actions, None, t=t, eps=eps).item() == 3.5


def test_loss_is_per_seed(tiny):
    pol = DiffusionPolicy(state_dim=3, action_dim=2, generators=gens(2))
    pol.denoiser = ZeroDenoiser()
    eps = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])
    loss = pol.loss(torch.zeros(2, 1, 3), torch.zeros(2, 1, 2), torch.ones(2, 1), t=torch.zeros(2, 1, dtype=torch.long), eps=eps)
    torch.testing.assert_close(loss, torch.tensor([2.5, 4.5]))


def test_loss_noises_actions_with_alpha_bar(tiny):
    pol = DiffusionPolicy(state_dim=1, action_dim=1, generators=gens())
    pol.denoiser = IdentityDenoiser()
    ab = pol.schedule.alpha_bar
    a, e, t = torch.tensor([[[0.5]]]), torch.tensor([[[-1.0]]]), torch.tensor([[1]])
    # prediction = a_t = sqrt(ab) a + sqrt(1 - ab) e; loss = (a_t - e)^2
    expected = (ab[1].sqrt() * 0.5 + (1 - ab[1]).sqrt() * -1.0 + 1.0) ** 2
    assert torch.isclose(pol.loss(torch.zeros(1, 1, 1), a, torch.ones(1, 1), t=t, eps=e)[0], expected)


def reference_sample(pol: DiffusionPolicy, states, n, noise):
    """A plain DDPM sampler written from the formulas, one full denoiser call per step."""
    sch, T = pol.schedule, pol.T
    N, B, _ = states.shape
    s = states.repeat_interleave(n, dim=1)
    x = noise[:, 0]
    for i in reversed(range(T)):
        t = torch.full(x.shape[:2], i, dtype=torch.long)
        eps = pol.denoiser(x, t, s, T)
        ab, ab_prev, beta = sch.alpha_bar[i], (sch.alpha_bar[i - 1] if i > 0 else torch.tensor(1.0)), sch.betas[i]
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x0 = x0.clamp(-1, 1)
        mean = beta * ab_prev.sqrt() / (1 - ab) * x0 + (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab) * x
        if i > 0:
            mean = mean + (beta * (1 - ab_prev) / (1 - ab)).sqrt() * noise[:, T - i]
        x = mean
    return x.clamp(-1, 1).view(N, B, n, -1)


@pytest.mark.parametrize("block_rows", [2048, 7, 15, 1])  # one block; a state per block; 2 per block; 1
@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("native", [True, False])  # the C kernels of qvpo/native, or torch ops
def test_sampler_matches_plain_reference(tiny, block_rows, seeds, native):
    """The fast sampler (split first layer, cache blocks, fused Mish) = the plain DDPM loop."""
    import gin
    gin.bind_parameter("DiffusionPolicy.block_rows", block_rows)
    gin.bind_parameter("DiffusionPolicy.native", native)
    torch.manual_seed(0)
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(seeds))
    states = torch.randn(seeds, 5, 4)
    noise = torch.randn(seeds, pol.T, 5 * 7, 2)
    fast = pol.sample(states, 7, noise=noise)
    slow = reference_sample(pol, states, 7, noise)
    assert fast.shape == (seeds, 5, 7, 2)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [(16,), (24, 16, 20), (40, 40)])  # no hidden matmul; mixed widths; tails
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("A", [3, 1])  # Hopper's actions; Pendulum's single one
def test_sampler_matches_plain_reference_for_other_depths(tiny, hidden, native, A):
    """Each kernel arrangement (first layer straight into the output layer; bias+Mish between
    hidden layers; the last one fused with the output layer) against the plain loop."""
    import gin
    gin.bind_parameter("Denoiser.hidden", hidden)
    gin.bind_parameter("DiffusionPolicy.native", native)
    torch.manual_seed(1)
    pol = DiffusionPolicy(state_dim=4, action_dim=A, generators=gens(2))
    states = torch.randn(2, 6, 4)
    noise = torch.randn(2, pol.T, 6 * 5, A)
    torch.testing.assert_close(pol.sample(states, 5, noise=noise), reference_sample(pol, states, 5, noise),
                               rtol=1e-5, atol=1e-5)


def test_bf16_sampler_close_to_fp32(tiny):
    torch.manual_seed(0)
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens())
    states, noise = torch.randn(1, 16, 4), torch.randn(1, pol.T, 16 * 8, 2)
    fp32 = pol.sample(states, 8, noise=noise)
    pol.precision = "bf16"
    bf16 = pol.sample(states, 8, noise=noise)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.05  # bfloat16 keeps 8 mantissa bits
    assert (bf16 - fp32).abs().max() > 0     # and it did run in reduced precision


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


def test_compiled_sampler_matches_eager(tiny):
    """DiffusionPolicy.compile = True (torch.compile of the denoising step) keeps the maths."""
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(2))
    states, noise = torch.randn(2, 3, 4), torch.randn(2, pol.T, 3 * 5, 2)
    eager = pol.sample(states, 5, noise=noise)
    pol.compile = True
    compiled = pol.sample(states, 5, noise=noise)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


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



@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden,A,seeds,threads,B,n", [
    ((64, 64, 64), 3, 2, 1, 7, 9),     # 63 rows: blocks that do not divide them
    ((64, 64, 64), 3, 2, 2, 7, 9),     # the same on two threads (several blocks per thread)
    ((32, 32), 1, 1, 2, 1, 4),         # one AMX/FMA layer; a behaviour action's 4 rows
    ((32, 32, 32, 32), 6, 2, 2, 8, 4),  # three layers; an evaluation action's 32 rows, 2 seeds
])
def test_fused_sampler_matches_unfused_and_plain_sampler(tiny, monkeypatch, precision, hidden, A, seeds,
                                                         threads, B, n):
    """The whole-chain sampler in one native call (fp32: AVX-512 FMA, bf16: AMX) against the
    per-layer path (torch matmuls + kernels) and the plain float32 loop: one or three hidden
    layers, row counts that are not a multiple of its blocks, one or two seeds with their own
    biases, one or two threads."""
    fused_or_skip(precision)
    from qvpo import native
    import gin
    gin.bind_parameter("Denoiser.hidden", hidden)
    calls = spy_calls(monkeypatch, native, "sample_fused")
    torch.manual_seed(2)
    pol = DiffusionPolicy(state_dim=5, action_dim=A, generators=gens(seeds), precision=precision)
    with torch.no_grad():  # biases that are not zero and differ per seed (the init's are zero)
        for lin in pol.denoiser.linears:
            lin.bias.add_(0.1 * torch.randn_like(lin.bias))
    states = torch.randn(seeds, B, 5)
    noise = torch.randn(seeds, pol.T, B * n, A)
    with num_threads(threads):
        fused = pol.sample(states, n, noise=noise)
    assert calls == [1]  # it did run
    pol.fused = False
    unfused = pol.sample(states, n, noise=noise)
    assert calls == [1]
    plain = reference_sample(pol, states, n, noise)
    assert fused.shape == (seeds, B, n, A) and fused.abs().max() <= 1.0
    if precision == "fp32":  # the same maths, summed in another order
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    else:
        # bf16 rounding: fused vs per-layer bf16 up to 5e-4 here, either vs fp32 up to 5e-3; a 2%
        # error in one posterior coefficient gives 1.3e-2
        assert (fused - unfused).abs().max() < 2e-3 and (fused - plain).abs().max() < 1e-2
        assert (fused - plain).abs().max() > 0  # bf16 did run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_sampler_leaves_unsupported_widths_to_the_per_layer_path(tiny, monkeypatch, precision):
    """Widths the fused kernel does not take (not a multiple of 32, unequal) fall back to the
    per-layer path, with the plain loop's result."""
    fused_or_skip(precision)
    from qvpo import native
    import gin
    gin.bind_parameter("Denoiser.hidden", (40, 40))
    monkeypatch.setattr(native, "sample_fused", lambda *a, **k: pytest.fail("fused path taken"))
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(), precision=precision)
    states, noise = torch.randn(1, 3, 4), torch.randn(1, pol.T, 3 * 4, 2)
    torch.testing.assert_close(pol.sample(states, 4, noise=noise), reference_sample(pol, states, 4, noise),
                               rtol=0, atol=1e-5 if precision == "fp32" else 0.05)

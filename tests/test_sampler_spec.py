"""The sampler's specification, qvpo.diffusion.ddpm_sample_reference (DDPM's Algorithm 2 as a
plain loop), checked by hand; then every way DiffusionPolicy.sample computes actions against it
on tiny shapes with fixed noise: torch ops in cache blocks, the native per-layer kernels, the
fused native sampler (fp32: AVX-512, bf16: AMX; skipped on CPUs without them), torch.compile,
CUDA (skipped without a GPU), and the general path (QSM's ScoreNet and EpsStep).

Tolerances: 1e-5 where the same float32 maths is summed in another order (the spec uses host
float constants, the fast paths float32 ones); bf16 ones are explained where used.
"""

import math

import gin
import pytest
import torch
from torch import nn

from qvpo import native
from qvpo.agents.qsm import ScoreNet
from qvpo.diffusion import DiffusionPolicy, EpsStep, NoiseSchedule, ddpm_sample_reference
from qvpo.nets import Denoiser
from qvpo.rng import SeedRNG, init_generators
from conftest import fused_or_skip, num_threads, spy_calls


def gens(n=1, seed=0):
    return init_generators(list(range(seed, seed + n)))


def spec(pol: DiffusionPolicy, states, n, noise):
    """The specification with the policy's own denoiser, schedule and step."""
    return ddpm_sample_reference(pol.denoiser, pol.schedule, states, n, noise, pol.clip_x0, pol.eps_step)


class ConstantEps(nn.Module):
    """eps_theta = c for every row; records each call's step and states."""

    def __init__(self, c: float):
        super().__init__()
        self.c, self.calls = c, []

    def forward(self, a_t, t, s, T):
        self.calls.append((t, s.clone(), T))
        return torch.full_like(a_t, self.c)


# ---------------------------------------------------------------- the specification itself

def test_spec_noise_terms_hand_computed():
    """T = 2, eps_theta = 0, x_T = 0, step noise z at t = 1 only. Default step: x_1 = 0 + std~_1 z
    with the posterior std~_1^2 = beta_1 (1 - ab_0) / (1 - ab_1), then x_0 = x0-prediction of x_1 =
    x_1 / sqrt(ab_0) (the posterior at t = 0 is x0 itself). EpsStep: x_1 = sqrt(beta_1) temp z,
    x_0 = x_1 / sqrt(alpha_0), then M = 2 more t = 0 steps divide by sqrt(alpha_0) twice more."""
    sch = NoiseSchedule(2, "linear")
    b = sch.betas.double().tolist()
    ab0, ab1 = 1 - b[0], (1 - b[0]) * (1 - b[1])  # in float64: b[0] = 1e-4 (see the spec's docstring)
    z = torch.tensor([[[0.3, -0.2]]]) * 1e-3  # small: nothing reaches a clamp
    noise = torch.cat([torch.zeros(1, 1, 1, 2), z[:, None]], dim=1)  # (N, T, R, A): x_T = 0, then z
    states = torch.zeros(1, 1, 3)
    got = ddpm_sample_reference(ConstantEps(0.0), sch, states, 1, noise)
    want = math.sqrt(b[1] * (1 - ab0) / (1 - ab1)) * z.double() / math.sqrt(ab0)
    torch.testing.assert_close(got.view(1, 1, 2).double(), want, rtol=1e-6, atol=0)
    got = ddpm_sample_reference(ConstantEps(0.0), sch, states, 1, noise, clip_x0=False,
                                eps_step=EpsStep(temperature=0.5, repeat_last_step=2))
    want = math.sqrt(b[1]) * 0.5 * z.double() / math.sqrt(1 - b[0]) ** 3
    torch.testing.assert_close(got.view(1, 1, 2).double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "vp"])  # (cosine's last alpha, 0.001, amplifies rounding 30x)
def test_spec_steps_share_their_mean(kind):
    """Without noise and clamps, the x0 form (eq. 15, then the posterior mean of eq. 7) and
    Algorithm 2's line 4 are the same map x_t -> x_{t-1}: (x - beta / sqrt(1 - ab) eps) / sqrt(alpha)
    = c0 x0 + ct x. A wrong coefficient in either breaks it. eps_theta here is a real Denoiser,
    so eps differs per row and step."""
    torch.manual_seed(0)
    sch = NoiseSchedule(4, kind)
    den = Denoiser(3, 2, gens(2), hidden=(16,), time_dim=8, time_hidden=16)
    with torch.no_grad():  # vp's alpha_4 = 0.11: keep eps and x_T small so that most x stay in [-1, 1]
        den.linears[-1].weight.mul_(0.1)
    states = torch.randn(2, 3, 3)
    noise = torch.zeros(2, 4, 3 * 2, 2)
    noise[:, 0] = 0.05 * torch.randn(2, 6, 2)
    x0_form = ddpm_sample_reference(den, sch, states, 2, noise, clip_x0=False)
    eps_form = ddpm_sample_reference(den, sch, states, 2, noise, clip_x0=False, eps_step=EpsStep(clip_x=False))
    assert (x0_form.abs() < 1).float().mean() > 0.5  # the final clamp leaves most to compare
    torch.testing.assert_close(x0_form, eps_form, rtol=1e-5, atol=1e-6)


def test_spec_calls_the_denoiser_per_step_with_each_candidates_state():
    """The denoiser contract: one call per step with t = T-1 .. 0 as an int (then the M repeated
    t = 0 steps), the state of row b*n + j being state b, and T."""
    den = ConstantEps(0.1)
    states = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    ddpm_sample_reference(den, NoiseSchedule(3, "cosine"), states, 4, torch.zeros(2, 3, 12, 1))
    assert [t for t, _, _ in den.calls] == [2, 1, 0] and all(T == 3 for _, _, T in den.calls)
    assert all(type(t) is int for t, _, _ in den.calls)
    for _, s, _ in den.calls:
        torch.testing.assert_close(s.view(2, 3, 4, 2), states[:, :, None].expand(2, 3, 4, 2), rtol=0, atol=0)
    den.calls.clear()
    ddpm_sample_reference(den, NoiseSchedule(3, "cosine"), states, 1, torch.zeros(2, 3, 3, 1), clip_x0=False,
                          eps_step=EpsStep(repeat_last_step=2))
    assert [t for t, _, _ in den.calls] == [2, 1, 0, 0, 0]


@pytest.mark.parametrize("net", ["denoiser", "scorenet"])
def test_int_step_is_every_row_at_that_step(net):
    """The contract's two forms of t give the same noise prediction: an int (the sampler's) and
    an (N, R) tensor (the loss's)."""
    torch.manual_seed(0)
    g = gens(2)
    den = (Denoiser(3, 2, g, hidden=(16,), time_dim=8, time_hidden=16) if net == "denoiser"
           else ScoreNet(3, 2, g, hidden=(16,), time_dim=8, time_hidden=(16,)))
    a, s = torch.randn(2, 5, 2), torch.randn(2, 5, 3)
    for t in (0, 3):
        torch.testing.assert_close(den(a, t, s, 4), den(a, torch.full((2, 5), t), s, 4), rtol=1e-6, atol=1e-6)
    assert (den(a, 0, s, 4) - den(a, 3, s, 4)).abs().max() > 1e-4  # the step does matter


# ---------------------------------------------------------------- DiffusionPolicy's paths against it

@pytest.mark.parametrize("block_rows", [2048, 7, 15, 1])  # one block; a state per block; 2 per block; 1
@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("native", [True, False])  # the C kernels of qvpo/native, or torch ops
def test_sampler_matches_spec(tiny, block_rows, seeds, native):
    """The per-layer sampler (split first layer, cache blocks, fused Mish) = the specification."""
    gin.bind_parameter("DiffusionPolicy.block_rows", block_rows)
    gin.bind_parameter("DiffusionPolicy.native", native)
    torch.manual_seed(0)
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(seeds))
    states = torch.randn(seeds, 5, 4)
    noise = torch.randn(seeds, pol.T, 5 * 7, 2)
    fast = pol.sample(states, 7, noise=noise)
    assert fast.shape == (seeds, 5, 7, 2)
    torch.testing.assert_close(fast, spec(pol, states, 7, noise), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [(16,), (24, 16, 20), (40, 40)])  # no hidden matmul; mixed widths; tails
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("A", [3, 1])  # Hopper's actions; Pendulum's single one
def test_sampler_matches_spec_for_other_depths(tiny, hidden, native, A):
    """Each kernel arrangement (first layer straight into the output layer; bias+Mish between
    hidden layers; the last one fused with the output layer) against the specification."""
    gin.bind_parameter("Denoiser.hidden", hidden)
    gin.bind_parameter("DiffusionPolicy.native", native)
    torch.manual_seed(1)
    pol = DiffusionPolicy(state_dim=4, action_dim=A, generators=gens(2))
    states = torch.randn(2, 6, 4)
    noise = torch.randn(2, pol.T, 6 * 5, A)
    torch.testing.assert_close(pol.sample(states, 5, noise=noise), spec(pol, states, 5, noise), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden,A,seeds,threads,B,n", [
    ((64, 64, 64), 3, 2, 1, 7, 9),     # 63 rows: blocks that do not divide them
    ((64, 64, 64), 3, 2, 2, 7, 9),     # the same on two threads (several blocks per thread)
    ((32, 32), 1, 1, 2, 1, 4),         # one AMX/FMA layer; a behaviour action's 4 rows
    ((32, 32, 32, 32), 6, 2, 2, 8, 4),  # three layers; an evaluation action's 32 rows, 2 seeds
])
def test_fused_sampler_matches_unfused_and_spec(tiny, monkeypatch, precision, hidden, A, seeds, threads, B, n):
    """The whole-chain sampler in one native call (fp32: AVX-512 FMA, bf16: AMX) against the
    per-layer path (torch matmuls + kernels) and the float32 specification: one or three hidden
    layers, row counts that are not a multiple of its blocks, one or two seeds with their own
    biases, one or two threads."""
    fused_or_skip(precision)
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
    plain = spec(pol, states, n, noise)
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
    per-layer path, with the specification's result."""
    fused_or_skip(precision)
    gin.bind_parameter("Denoiser.hidden", (40, 40))
    monkeypatch.setattr(native, "sample_fused", lambda *a, **k: pytest.fail("fused path taken"))
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(), precision=precision)
    states, noise = torch.randn(1, 3, 4), torch.randn(1, pol.T, 3 * 4, 2)
    torch.testing.assert_close(pol.sample(states, 4, noise=noise), spec(pol, states, 4, noise),
                               rtol=0, atol=1e-5 if precision == "fp32" else 0.05)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_sampler_close_to_spec(tiny, native):
    """precision = 'bf16' (hidden layers in bfloat16, per-layer path here: 16-wide layers are
    not fused) stays within bfloat16 rounding of the float32 specification."""
    torch.manual_seed(0)
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(), precision="bf16", native=native)
    states, noise = torch.randn(1, 16, 4), torch.randn(1, pol.T, 16 * 8, 2)
    bf16 = pol.sample(states, 8, noise=noise)
    assert bf16.dtype == torch.float32
    diff = (bf16 - spec(pol, states, 8, noise)).abs().max()
    assert diff < 0.05  # bfloat16 keeps 8 mantissa bits
    assert diff > 0     # and it did run in reduced precision


def test_compiled_sampler_matches_spec(tiny):
    """DiffusionPolicy.compile = True (torch.compile of the denoising step) keeps the maths."""
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(2), compile=True)
    states, noise = torch.randn(2, 3, 4), torch.randn(2, pol.T, 3 * 5, 2)
    torch.testing.assert_close(pol.sample(states, 5, noise=noise), spec(pol, states, 5, noise), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a GPU")
def test_cuda_sampler_matches_spec(tiny):
    """On CUDA the sampler takes torch ops in one block; the specification runs on CPU."""
    torch.manual_seed(0)
    pol = DiffusionPolicy(state_dim=4, action_dim=2, generators=gens(2))
    states, noise = torch.randn(2, 5, 4), torch.randn(2, pol.T, 5 * 7, 2)
    want = spec(pol, states, 7, noise)
    got = pol.to("cuda").sample(states.cuda(), 7, noise=noise.cuda())
    # TF32 matmuls are off by default for float32 in torch; the same tolerance as on CPU
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- other denoisers and QSM's step

def score_net(seeds=2):
    return ScoreNet(3, 2, gens(seeds), hidden=(16, 16), time_dim=8, time_hidden=(16,))


@pytest.mark.parametrize("eps_step", [None, EpsStep(temperature=0.7, clip_x=True, repeat_last_step=1)])
def test_other_denoisers_sample_by_the_spec(eps_step):
    """A denoiser that is not a Denoiser (QSM's ScoreNet) samples by the specification itself,
    whatever the speed settings say."""
    torch.manual_seed(0)
    pol = DiffusionPolicy(3, 2, None, T=4, schedule="vp", clip_x0=eps_step is None, native=True, fused=True,
                          block_rows=2, denoiser=score_net(), eps_step=eps_step)
    states, noise = torch.randn(2, 3, 3), torch.randn(2, 4, 3 * 5, 2)
    got = pol.sample(states, 5, noise=noise)
    assert got.shape == (2, 3, 5, 2) and got.abs().max() <= 1
    assert torch.equal(got, ddpm_sample_reference(pol.denoiser, pol.schedule, states, 5, noise, eps_step is None,
                                                  eps_step))


def test_eps_step_draws_its_noise_one_step_at_a_time():
    """With EpsStep, sample(rng) uses the noise of T draws of randn(R, A) in turn (QSM's reference
    order): exactly the spec fed that noise. For R * A not a multiple of 16, one randn(T, R, A)
    call gives other numbers, so the order is a real choice."""
    pol = DiffusionPolicy(3, 2, None, T=3, schedule="vp", clip_x0=False, denoiser=score_net(),
                          eps_step=EpsStep())
    states = torch.randn(2, 3, 3)
    got = pol.sample(states, 1, SeedRNG([4, 5], "cpu"))
    rng = SeedRNG([4, 5], "cpu")
    per_step = torch.stack([rng.randn(3, 2) for _ in range(3)], dim=1)
    assert torch.equal(got, ddpm_sample_reference(pol.denoiser, pol.schedule, states, 1, per_step, False, EpsStep()))
    assert not torch.equal(per_step, SeedRNG([4, 5], "cpu").randn(3, 3, 2))


def test_eps_step_needs_clip_x0_off():
    """EpsStep has no x0 to clamp: clip_x0=True with it is refused rather than ignored."""
    from qvpo.errors import ConfigError
    with pytest.raises(ConfigError, match="clip_x0"):
        DiffusionPolicy(3, 2, None, T=3, denoiser=score_net(), eps_step=EpsStep())

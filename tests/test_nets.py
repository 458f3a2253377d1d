import math

import pytest
import torch
import torch.nn.functional as F

from qvpo.nets import Denoiser, SeedLinear, TwinQ, init_linear, mish, mish_torch, sinusoidal_embedding
from qvpo.rng import init_generators
from conftest import fused_or_skip, num_threads, spy_calls


def _mish64(x: torch.Tensor) -> torch.Tensor:
    """Mish from its definition in float64: x tanh(softplus(x)), the reference every fast form meets."""
    return x * torch.tanh(F.softplus(x))


@pytest.mark.parametrize("grad", [False, True])
def test_fast_mish_is_exact(grad):
    """The float32 paths (native kernels, the one-exp form, and their backward under autograd)
    against the definition in float64: values and first derivatives to float32 rounding."""
    x = torch.cat([torch.linspace(-30, 30, 100001), torch.randn(50000) * 3])  # large: the fast paths
    x64 = x.double().requires_grad_(True)
    ref = _mish64(x64)
    (g_ref,) = torch.autograd.grad(ref.sum(), x64)
    x32 = x.clone().requires_grad_(grad)
    y = mish(x32)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-6, atol=2e-7)
    if grad:
        (g,) = torch.autograd.grad(y.sum(), x32)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mish_torch(x).double(), ref.detach(), rtol=2e-6, atol=2e-7)  # the torch-ops form


def test_reference_init_std():
    q = TwinQ(100, 28, init_generators([0]), hidden=(256, 256))
    first = q.q1[0]
    assert first.in_features == 128 and first.weight.shape == (1, 128, 256)
    assert abs(first.weight.std().item() - 1 / (2 * math.sqrt(128))) < 0.002
    assert first.bias.abs().max() == 0


def test_torch_init_matches_pytorch_default_bounds():
    import gin
    gin.parse_config("init_linear.scheme = 'torch'")
    q = TwinQ(100, 28, init_generators([0]), hidden=(256,))
    w, b = q.q1[0].weight, q.q1[0].bias
    bound = 1 / math.sqrt(128)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # U(-1/sqrt(fan_in), +)
    assert b.abs().max() > 0


def test_seed_linear_is_n_independent_linears():
    lin = SeedLinear(3, 4, 5)
    init_linear(lin, init_generators([0, 1, 2]))
    x = torch.randn(3, 7, 4)
    out = lin(x)
    for k in range(3):
        torch.testing.assert_close(out[k], x[k] @ lin.weight[k] + lin.bias[k])
    assert not torch.equal(lin.weight[0], lin.weight[1])  # each seed its own init


def test_sinusoidal_embedding_values():
    e = sinusoidal_embedding(torch.tensor([0, 3]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(torch.arange(4) * -(math.log(10000.0) / 3))
    torch.testing.assert_close(e[1], torch.cat([(3 * freqs).sin(), (3 * freqs).cos()]))


def test_denoiser_shapes():
    d = Denoiser(5, 2, init_generators([0, 1]), hidden=(16,), time_dim=8, time_hidden=16)
    out = d(torch.randn(2, 7, 2), torch.randint(0, 3, (2, 7)), torch.randn(2, 7, 5), T=3)
    assert out.shape == (2, 7, 2)
    assert d.body[0].in_features == 2 + 8 + 5  # [a_t, time embedding, s]


@pytest.mark.parametrize("hidden", [(16, 16), (24,), (20, 16, 12)])
@pytest.mark.parametrize("A", [3, 1])
def test_q_min_candidates_equals_q_min_on_repeated_states(hidden, A):
    """The candidate-scoring path (state part once per state, native kernels where built) gives
    the Q values of the plain networks."""
    torch.manual_seed(0)
    critic = TwinQ(5, A, init_generators([0, 1]), hidden=hidden)
    s, a = torch.randn(2, 7, 5), torch.rand(2, 7, 4, A) * 2 - 1
    got = critic.q_min_candidates(s, a)
    want = critic.q_min(s.repeat_interleave(4, dim=1), a.flatten(1, 2)).view(2, 7, 4)
    assert got.shape == (2, 7, 4) and not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden,A,rows,min_rows,threads", [
    ((32, 32, 32), 3, (7, 9), 1, 1),     # 63 rows per seed: blocks that do not divide them
    ((64, 64), 1, (1, 4), 1, 2),         # one fused layer, 4 rows, two threads
    ((32, 32, 32), 6, (16, 64), None, 2),  # 1024 rows: the default threshold takes the fused path
])
def test_q_min_candidates_fused_matches_layer_by_layer(monkeypatch, precision, hidden, A, rows, min_rows, threads):
    """Each critic network in one native call (qvpo_mlp_fused: float32 FMA or bf16 AMX) gives the
    per-layer path's Q values (float32: the plain networks' within 1e-5)."""
    from qvpo import native

    fused_or_skip(precision)
    if min_rows is not None:
        monkeypatch.setattr(native, "FUSED_MLP_MIN_ROWS", min_rows)
    calls = spy_calls(monkeypatch, native, "mlp_fused")
    torch.manual_seed(3)
    critic = TwinQ(5, A, init_generators([0, 1]), hidden=hidden, scoring_precision=precision)
    with torch.no_grad():  # Q values of order 1 and biases that are not zero (as after training)
        for p in critic.parameters():
            p.mul_(3.0).add_(0.1 * torch.randn_like(p))
    B, k = rows
    s, a = torch.randn(2, B, 5), torch.rand(2, B, k, A) * 2 - 1
    with num_threads(threads):
        fused = critic.q_min_candidates(s, a)
    assert calls == [1, 1]  # one call per network
    critic.fused = False
    per_layer = critic.q_min_candidates(s, a)
    plain = critic.q_min(s.repeat_interleave(k, dim=1), a.flatten(1, 2)).view(2, B, k).detach()
    assert fused.shape == (2, B, k) and len(calls) == 2
    if precision == "fp32":
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    else:  # bf16 activations: within bf16 rounding of the per-layer bf16 path and of fp32 (single
        # values differ by up to 4% of the mean |Q| here, as the per-layer path does from fp32)
        scale = plain.abs().mean()
        assert (fused - per_layer).abs().max() < 0.06 * scale and (fused - plain).abs().mean() < 0.02 * scale
        assert (fused - plain).abs().max() > 0

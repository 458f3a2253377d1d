import math

import torch
import torch.nn.functional as F

from qvpo.nets import Denoiser, TwinQ, init_linear, mish, sinusoidal_embedding


def test_fast_mish_is_exact():
    x = torch.linspace(-30, 30, 10001)
    torch.testing.assert_close(mish(x), F.mish(x), rtol=1e-5, atol=5e-6)
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    (g_fast,) = torch.autograd.grad(mish(x).sum(), x)
    (g_ref,) = torch.autograd.grad(F.mish(x).sum(), x)
    torch.testing.assert_close(g_fast, g_ref)


def test_reference_init_std():
    torch.manual_seed(0)
    q = TwinQ(100, 28, hidden=(256, 256))
    first = q.q1[0]
    assert first.in_features == 128
    assert abs(first.weight.std().item() - 1 / (2 * math.sqrt(128))) < 0.002
    assert first.bias.abs().max() == 0


def test_torch_init_keeps_pytorch_default():
    import gin
    gin.parse_config("init_linear.scheme = 'torch'")
    torch.manual_seed(0)
    q = TwinQ(100, 28, hidden=(256,))
    assert q.q1[0].bias.abs().max() > 0  # PyTorch's default bias init is not zero


def test_sinusoidal_embedding_values():
    e = sinusoidal_embedding(torch.tensor([0, 3]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(torch.arange(4) * -(math.log(10000.0) / 3))
    torch.testing.assert_close(e[1], torch.cat([(3 * freqs).sin(), (3 * freqs).cos()]))


def test_denoiser_shapes():
    d = Denoiser(5, 2, hidden=(16,), time_dim=8, time_hidden=16)
    out = d(torch.randn(7, 2), torch.randint(0, 3, (7,)), torch.randn(7, 5))
    assert out.shape == (7, 2)
    assert d.body[0].in_features == 2 + 8 + 5  # [a_t, time embedding, s]

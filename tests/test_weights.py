import math

import pytest
import torch

from qvpo.schedules import Constant, LinearDecay
from qvpo.weights import QAdv, QCut, QExp, QReLU, Uniform

Q = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [-1.0, -4.0, -1.0]])


def test_qadv_weights_best_minus_mean_clipped_at_zero():
    # best minus mean: 3 - 2 = 1; 5 - 5 = 0; -1 - (-2) = 1
    torch.testing.assert_close(QAdv()(Q), torch.tensor([1.0, 0.0, 1.0]))
    assert (QAdv()(torch.randn(64, 16)) >= 0).all()


def test_qcut_is_a_clip_not_a_shift():
    torch.testing.assert_close(QCut(c=1.0)(Q), torch.tensor([3.0, 5.0, 1.0]))


def test_qrelu_shifts_to_non_negative():
    torch.testing.assert_close(QReLU(q_neg=2.0)(Q), torch.tensor([5.0, 7.0, 1.0]))


def test_qexp_uses_running_stats_per_seed_and_clips():
    w = QExp(beta=1.0, momentum=1.0)
    w.reset(2)
    q = torch.stack([Q, 10 * Q])  # (seeds, states, candidates)
    out = w(q)
    for k in range(2):
        mean, std = q[k].mean(), q[k].var(unbiased=False).sqrt()
        torch.testing.assert_close(out[k], torch.exp((q[k].max(1).values - mean) / std))
    torch.testing.assert_close(out[0], out[1])  # scale-free
    big = torch.tensor([[[1e9, 0.0]]])
    w2 = QExp(beta=1.0, momentum=1.0)
    assert w2(big).item() <= torch.exp(torch.tensor(8.0)).item() + 1e-3


def test_uniform_weight():
    torch.testing.assert_close(Uniform()(Q), torch.ones(3))


def test_linear_decay_matches_reference_formula():
    s = LinearDecay(initial=0.02, final=0.002)
    assert s(0, 1000) == 0.02
    assert abs(s(500, 1000) - 0.01) < 1e-12
    assert s(950, 1000) == 0.002  # floor
    assert s(2000, 1000) == 0.002
    assert Constant(0.01)(123, 1000) == 0.01


def test_qexpadv_exponentiates_the_scaled_advantage_and_clips():
    from qvpo.weights import QExpAdv

    q = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 30.0]]])  # (seeds, states, candidates)
    w = QExpAdv(beta=2.0, max_weight=20.0)(q)
    # state 0: A = 3 - 2 = 1, sd = sqrt(2/3): exp(1 / (2 sqrt(2/3)))
    assert w[0, 0].item() == pytest.approx(math.exp(1.0 / (2.0 * math.sqrt(2.0 / 3.0))), rel=1e-5)
    # state 1: A = 20, sd = sqrt(200): exp(20 / (2 * 14.14)) = exp(0.707)
    assert w[0, 1].item() == pytest.approx(math.exp(20.0 / (2.0 * math.sqrt(200.0))), rel=1e-5)
    # scale-free: multiplying every Q by 100 leaves the weights alone
    torch.testing.assert_close(QExpAdv(beta=2.0)(100.0 * q), w)
    assert QExpAdv(beta=0.01, max_weight=20.0)(q).max().item() == 20.0  # AWR's clip

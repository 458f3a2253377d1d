import math

import gin
import pytest
import torch

from qvpo.agents.base import AgentContext
from qvpo.agents.qvpo import QVPO
from qvpo.entropy import kl_entropy
from qvpo.errors import ConfigError
from qvpo.research.adaptive_entropy import AdaptiveEntropyWeight
from qvpo.schedules import Constant, LinearDecay
from helpers import filled_buffers

# ---------------------------------------------------------------- the estimator on closed forms
# n = 2000 samples per set, 8 sets (a leading batch dim) averaged: the estimator's sd per set is
# about 0.03-0.05 nats here, so the mean's is about 0.02; tolerance 0.1 nats. The uniform on a
# cube is checked for d <= 3 only: the estimator is biased upwards at the boundary, +0.06 nats at
# d = 3 and +0.47 at d = 6 with n = 2000 (shown below as a one-sided check).
N_SAMPLES, SETS, TOL = 2000, 8, 0.1


@pytest.mark.parametrize("d", [1, 2, 3])
def test_uniform_cube_entropy_is_d_log_2(d):
    g = torch.Generator().manual_seed(d)
    x = torch.rand(SETS, N_SAMPLES, d, generator=g) * 2 - 1
    h = kl_entropy(x)
    assert h.shape == (SETS,)
    assert abs(h.mean().item() - d * math.log(2)) < TOL


@pytest.mark.parametrize("d,sigma", [(1, 1.0), (2, 0.5), (3, 0.1), (6, 0.3)])
def test_gaussian_entropy_is_half_d_log_2_pi_e_sigma2(d, sigma):
    g = torch.Generator().manual_seed(10 + d)
    x = torch.randn(SETS, N_SAMPLES, d, generator=g) * sigma
    h = kl_entropy(x)
    assert abs(h.mean().item() - 0.5 * d * math.log(2 * math.pi * math.e * sigma ** 2)) < TOL


def test_batched_over_leading_dims_and_k():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 500, 2, generator=g)
    h = kl_entropy(x, k=3)
    assert h.shape == (2, 3, 4)
    torch.testing.assert_close(h[1, 2, 3], kl_entropy(x[1, 2, 3], k=3))  # each set on its own
    assert abs(h.mean().item() - math.log(2 * math.pi * math.e)) < TOL


def test_qvpo_sized_sets_rank_spreads_and_survive_coincident_points():
    """Nd = 64 candidates in A = 6: a narrower policy scores lower; a collapsed one stays finite."""
    g = torch.Generator().manual_seed(1)
    wide = torch.rand(32, 64, 6, generator=g) * 2 - 1
    narrow = wide * 0.2
    h_wide, h_narrow = kl_entropy(wide), kl_entropy(narrow)
    torch.testing.assert_close(h_wide - h_narrow, torch.full((32,), 6 * math.log(5.0)))  # scaling law
    assert h_wide.mean() > 6 * math.log(2)  # the boundary bias at small n is upwards
    corner = torch.ones(1, 64, 6)  # every candidate clamped to the same corner
    h = kl_entropy(corner)
    assert torch.isfinite(h).all() and h.item() < -50


# ---------------------------------------------------------------- the controller
def test_controller_raises_omega_below_target_and_lowers_it_above():
    c = AdaptiveEntropyWeight(target=-1.0, lr=0.1, initial=0.01, min_weight=1e-3, max_weight=0.1)
    c.reset(num_seeds=2, action_dim=3)  # target -3 nats
    assert c.target == -3.0
    torch.testing.assert_close(c(0, 10), torch.full((2,), 0.01))
    c.observe(torch.tensor([-5.0, -1.0]))  # seed 0 below target, seed 1 above
    w = c(1, 10)
    assert w[0] > 0.01 > w[1]
    torch.testing.assert_close(w, 0.01 * torch.exp(torch.tensor([0.2, -0.2])))  # lr * gap
    c.observe(torch.tensor([-3.0, -3.0]))  # on target: no change
    torch.testing.assert_close(c(2, 10), w)


def test_controller_stays_within_bounds():
    c = AdaptiveEntropyWeight(target=0.0, lr=1.0, initial=0.01, min_weight=0.005, max_weight=0.05)
    c.reset(num_seeds=2, action_dim=1)
    for _ in range(20):
        c.observe(torch.tensor([-10.0, 10.0]))
    torch.testing.assert_close(c(0, 1), torch.tensor([0.05, 0.005]))


def test_controller_rejects_bad_bounds():
    with pytest.raises(ConfigError):
        AdaptiveEntropyWeight(initial=0.5, max_weight=0.1)


def test_fixed_schedules_unchanged():
    assert Constant()(5, 10) == 0.01
    assert LinearDecay()(0, 100) == 0.02 and LinearDecay()(99, 100) == 0.002


# ---------------------------------------------------------------- in QVPO
KW = dict(batch_size=8, train_candidates=6, uniform_samples=2, target_candidates=2, grad_clip=0.5)


def adaptive(lr=0.05):
    return AdaptiveEntropyWeight(target=0.0, lr=lr, initial=0.01, min_weight=1e-4, max_weight=1.0)


def test_qvpo_default_logs_the_estimate_with_the_reference_decay(tiny):
    agent = QVPO(AgentContext(3, 2), **KW)
    m = agent.update(filled_buffers(), step=0)
    assert isinstance(agent.entropy_weight, LinearDecay) and m["entropy/weight"] == 0.02
    assert m["entropy/estimate"].shape == (1,) and torch.isfinite(m["entropy/estimate"]).all()
    assert "entropy/estimate" not in QVPO(AgentContext(3, 2), estimate_entropy=False, **KW).update(filled_buffers(), 1)


def test_qvpo_adaptive_moves_omega_and_uses_it_per_seed(tiny):
    agent = QVPO(AgentContext(3, 2, seeds=(0, 1)), entropy_weight=adaptive(), **KW)
    buffers = filled_buffers((0, 1))
    seen = {}
    real_loss = agent.policy.loss

    def spy(states, actions, weights, rng=None, **kw):
        seen["weights"] = weights
        return real_loss(states, actions, weights, rng, **kw)

    agent.policy.loss = spy
    weights = []
    for step in range(1, 4):
        m = agent.update(buffers, step)
        assert m["entropy/weight"].shape == (2,) and m["entropy/estimate"].shape == (2,)
        # the uniform rows of seed i carry omega_i * w(s)
        B, Ne = KW["batch_size"], KW["uniform_samples"]
        w = seen["weights"][:, :B]
        torch.testing.assert_close(seen["weights"][:, B:], (m["entropy/weight"][:, None] * w).repeat_interleave(Ne, 1))
        weights.append(m["entropy/weight"])
        # the next omega is one dual step from this one: target 0 nats, lr 0.05
        expected = m["entropy/weight"] * torch.exp(-0.05 * m["entropy/estimate"])
        torch.testing.assert_close(agent.entropy_weight(step, 1), expected)
    assert (weights[-1] != weights[0]).all()


def test_adaptive_from_gin_needs_the_estimate(tiny):
    gin.parse_config(["QVPO.entropy_weight = @AdaptiveEntropyWeight()", "QVPO.estimate_entropy = False"])
    with pytest.raises(ConfigError, match="estimate_entropy"):
        QVPO(AgentContext(3, 2))


def test_low_precision_input_is_upcast():
    x = torch.randn(4, 64, 3, generator=torch.Generator().manual_seed(2))
    h = kl_entropy(x.bfloat16())
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, kl_entropy(x.bfloat16().float()))

"""The opt-in bf16 mode (sampler, and optionally candidate scoring) does not change what QVPO
learns from, on the same inputs: the chosen candidates' Q values and the Q-weighted loss agree
with fp32 within stated tolerances."""

import pytest
import torch

from qvpo.agents.base import AgentContext
from qvpo import native

from qvpo.agents.qvpo import QVPO
from qvpo.rng import SeedRNG

Q_TOL = 0.02     # mean over states |Q(chosen, bf16) - Q(chosen, fp32)| / mean |Q(chosen, fp32)|
LOSS_TOL = 0.02  # relative difference of the Q-weighted loss


def choose(agent, states, noise):
    cands = agent.policy.sample(states, noise.shape[2] // states.shape[1], noise=noise)
    N, B, K, A = cands.shape
    q = agent.critic.q_min_candidates(states, cands)  # as QVPO scores them
    best = torch.gather(cands, 2, q.argmax(-1)[..., None, None].expand(-1, -1, 1, A))[:, :, 0]
    return best, q


@pytest.mark.parametrize("scoring", ["fp32", "bf16"])  # TwinQ.scoring_precision
@pytest.mark.parametrize("kernels", [True, False])    # native kernels, or torch ops (autocast)
def test_bf16_sampler_keeps_chosen_q_and_loss(monkeypatch, scoring, kernels):
    if not kernels:
        monkeypatch.setattr(native, "usable", lambda t: False)
    torch.manual_seed(0)
    agent = QVPO(AgentContext(11, 3, seeds=(0,)), batch_size=64)  # paper-size networks, Hopper dimensions
    # give the critic a Q landscape with real structure over actions (random init is nearly flat)
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.mul_(3.0)
    states = torch.randn(1, 64, 11)
    noise = torch.randn(1, agent.policy.T, 64 * 16, 3)
    best32, q32 = choose(agent, states, noise)
    agent.policy.precision, agent.critic.scoring_precision = "bf16", scoring
    best16, q16 = choose(agent, states, noise)
    agent.policy.precision, agent.critic.scoring_precision = "fp32", "fp32"

    chosen32, chosen16 = q32.max(-1).values, q16.max(-1).values
    rel_q = ((chosen16 - chosen32).abs().mean() / chosen32.abs().mean()).item()
    print(f"bf16 (scoring {scoring}, kernels {kernels}) vs fp32: chosen-Q relative difference {rel_q:.2e}")
    assert rel_q < Q_TOL, rel_q
    # the chosen Q is far above a typical candidate's in both modes: selection still works
    assert (chosen16 - q16.mean(-1)).mean() > 0.5 * (chosen32 - q32.mean(-1)).mean()

    w32 = agent.q_weight(q32)
    w16 = agent.q_weight(q16)
    rng_state = SeedRNG([0], "cpu")
    t = rng_state.randint(agent.policy.T, 64)
    eps = rng_state.randn(64, 3)
    l32 = agent.policy.loss(states, best32, w32, t=t, eps=eps)
    l16 = agent.policy.loss(states, best16, w16, t=t, eps=eps)
    rel_l = ((l16 - l32).abs() / l32.abs()).item()
    print(f"bf16 (scoring {scoring}, kernels {kernels}) vs fp32: Q-weighted loss relative difference {rel_l:.2e}")
    assert rel_l < LOSS_TOL, rel_l
    assert (best16 - best32).abs().max() > 0  # bf16 did run


@pytest.mark.parametrize("kernels", [True, False])
def test_bf16_scoring_ranks_like_fp32(monkeypatch, kernels):
    """TwinQ.scoring_precision = 'bf16' on the same candidates: on average a state's pick is a
    candidate whose float32 Q is within Q_TOL (relative) of the best one's, and the Q values agree
    within Q_TOL (mean |difference| over mean |Q|)."""
    if not kernels:
        monkeypatch.setattr(native, "usable", lambda t: False)
    torch.manual_seed(1)
    agent = QVPO(AgentContext(11, 3, seeds=(0,)), batch_size=64)
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.mul_(3.0)
    states, cands = torch.randn(1, 64, 11), torch.rand(1, 64, 32, 3) * 2 - 1
    q32 = agent.critic.q_min_candidates(states, cands)
    agent.critic.scoring_precision = "bf16"
    q16 = agent.critic.q_min_candidates(states, cands)
    assert q16.dtype == torch.float32 and q16.shape == q32.shape
    scale = q32.abs().mean()
    rel = ((q16 - q32).abs().mean() / scale).item()
    assert 0 < rel < Q_TOL  # reduced precision, and close (the measure of the chosen-Q check above)
    picked = torch.gather(q32, 2, q16.argmax(-1, keepdim=True))[..., 0]  # fp32 Q of the bf16 pick
    regret = (q32.max(-1).values - picked).mean() / scale
    print(f"bf16 scoring (kernels {kernels}): mean |dQ| / mean |Q| {rel:.2e}, "
          f"mean regret of its picks {regret:.2e}")
    assert regret < Q_TOL


def test_scoring_precision_is_checked():
    from qvpo.errors import ConfigError
    from qvpo.nets import TwinQ
    from qvpo.rng import init_generators
    with pytest.raises(ConfigError, match="scoring_precision must be 'fp32' or 'bf16'"):
        TwinQ(3, 1, init_generators([0]), hidden=(8,), scoring_precision="fp16")

"""The opt-in bf16 sampler does not change what QVPO learns from, on the same inputs: the chosen
candidates' Q values and the Q-weighted loss agree with fp32 within stated tolerances."""

import torch

from qvpo.agents.qvpo import QVPO
from qvpo.rng import SeedRNG

Q_TOL = 0.02     # mean over states |Q(chosen, bf16) - Q(chosen, fp32)| / mean |Q(chosen, fp32)|
LOSS_TOL = 0.02  # relative difference of the Q-weighted loss


def choose(agent, states, noise):
    cands = agent.policy.sample(states, noise.shape[2] // states.shape[1], noise=noise)
    N, B, K, A = cands.shape
    q = agent.critic.q_min(states.repeat_interleave(K, dim=1), cands.flatten(1, 2)).view(N, B, K)
    best = torch.gather(cands, 2, q.argmax(-1)[..., None, None].expand(-1, -1, 1, A))[:, :, 0]
    return best, q


def test_bf16_sampler_keeps_chosen_q_and_loss():
    torch.manual_seed(0)
    agent = QVPO(11, 3, seeds=(0,), batch_size=64)  # paper-size networks, Hopper dimensions
    # give the critic a Q landscape with real structure over actions (random init is nearly flat)
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.mul_(3.0)
    states = torch.randn(1, 64, 11)
    noise = torch.randn(1, agent.policy.T, 64 * 16, 3)
    best32, q32 = choose(agent, states, noise)
    agent.policy.precision = "bf16"
    best16, q16 = choose(agent, states, noise)
    agent.policy.precision = "fp32"

    chosen32, chosen16 = q32.max(-1).values, q16.max(-1).values
    rel_q = ((chosen16 - chosen32).abs().mean() / chosen32.abs().mean()).item()
    print(f"bf16 vs fp32: chosen-Q relative difference {rel_q:.2e}")
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
    print(f"bf16 vs fp32: Q-weighted loss relative difference {rel_l:.2e}")
    assert rel_l < LOSS_TOL, rel_l
    assert (best16 - best32).abs().max() > 0  # bf16 did run

import pytest
import torch

from qvpo.agents.base import AgentContext
from qvpo.agents.qvpo import QVPO, best_of_candidates
from qvpo.buffers import Batch
from qvpo.errors import ConfigError
from qvpo.schedules import Constant
from helpers import filled_buffers


class FixedPolicy:
    """Returns given candidates (N, B, K, A) for every call (to check what the agent does with them)."""

    def __init__(self, candidates):
        self.candidates = candidates

    def sample(self, states, n, rng=None):
        return self.candidates[:, : states.shape[1], :n]


class SumCritic:
    def q_min_candidates(self, s, a):  # a (N, B, k, A)
        return a.sum(-1)


def test_best_of_k_picks_the_argmax():
    cands = torch.tensor([[[[0.1, 0.2], [0.9, 0.5], [-1.0, 0.3]],
                           [[0.5, 0.5], [0.0, 0.0], [0.6, 0.6]]]])
    best, q = best_of_candidates(FixedPolicy(cands), SumCritic(), torch.zeros(1, 2, 4), 3)
    torch.testing.assert_close(best, torch.tensor([[[0.9, 0.5], [0.6, 0.6]]]))
    torch.testing.assert_close(q, cands.sum(-1))


def test_policy_loss_gets_best_candidates_qadv_weights_and_entropy_rows(tiny):
    B, Nd, Ne, A = 4, 5, 3, 2
    agent = QVPO(AgentContext(3, A), batch_size=B, train_candidates=Nd, uniform_samples=Ne, entropy_weight=Constant(0.05), target_candidates=1)
    cands = torch.rand(1, B, Nd, A) * 2 - 1
    seen = {}
    real_loss = agent.policy.loss

    def spy(states, actions, weights, rng=None, **kw):
        seen.update(states=states, actions=actions, weights=weights)
        return real_loss(states, actions, weights, rng, **kw)

    agent.policy.sample = FixedPolicy(cands).sample  # online policy's candidates
    agent.critic.q_min_candidates = SumCritic().q_min_candidates  # Q(s, a) = sum(a), for selection only
    agent.policy.loss = spy
    metrics = agent.update(filled_buffers(), step=10)

    q = cands.sum(-1)[0]
    w = (q.max(1).values - q.mean(1)).clamp(min=0)
    best = cands[0, torch.arange(B), q.argmax(1)]
    acts, wts, sts = seen["actions"][0], seen["weights"][0], seen["states"][0]
    assert acts.shape == (B + B * Ne, A)
    torch.testing.assert_close(acts[:B], best)
    torch.testing.assert_close(wts[:B], w)
    # the uniform block: Ne rows per state, each weighted omega_ent * w(s), actions in [-1, 1]
    torch.testing.assert_close(wts[B:], (0.05 * w).repeat_interleave(Ne))
    uni = acts[B:]
    assert uni.abs().max() <= 1 and uni.std() > 0.3
    torch.testing.assert_close(sts[B:], sts[:B].repeat_interleave(Ne, 0))
    assert metrics["entropy/weight"] == 0.05
    torch.testing.assert_close(metrics["qweight/mean"], w.mean()[None])


def test_termination_stops_bootstrap_truncation_does_not(tiny):
    agent = QVPO(AgentContext(3, 2), batch_size=2, target_candidates=2, gamma=0.9)
    s2 = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))  # not the global stream: order-independent
    batch = Batch(obs=torch.zeros(1, 2, 3), action=torch.zeros(1, 2, 2), reward=torch.tensor([[1.0, 1.0]]),
                  next_obs=s2, terminal=torch.tensor([[1.0, 0.0]]))
    state = agent.rng.state_dict()
    y = agent.td_target(batch)
    agent.rng.load_state_dict(state)  # the same target-policy candidates
    a2, _ = best_of_candidates(agent.policy_target, agent.critic_target, s2, 2, agent.rng)
    q_next = agent.critic_target.q_min(s2, a2)
    assert y[0, 0].item() == 1.0  # terminated: r only
    torch.testing.assert_close(y[0, 1], 1.0 + 0.9 * q_next[0, 1])  # truncated / running: bootstrap
    assert q_next[0, 1].abs() > 1e-4


def test_update_changes_params_and_moves_targets_slowly(tiny):
    agent = QVPO(AgentContext(3, 2), batch_size=8, train_candidates=4, tau=0.1)
    before = [p.clone() for p in agent.policy.parameters()]
    tgt_before = [p.clone() for p in agent.policy_target.parameters()]
    m = agent.update(filled_buffers(), step=1)
    after = list(agent.policy.parameters())
    assert any((a - b).abs().max() > 0 for a, b in zip(after, before))
    for tb, ta, on in zip(tgt_before, agent.policy_target.parameters(), after):
        torch.testing.assert_close(ta, 0.9 * tb + 0.1 * on)
    for k in ("loss/critic", "loss/actor", "q/mean", "qweight/frac_zero", "entropy/weight"):
        assert k in m
    assert agent.act(torch.randn(1, 5, 3), explore=True).shape == (1, 5, 2)


def test_random_selection_trains_on_a_random_candidate_not_the_best():
    """train_selection='random' (component isolation): `pick` returns the indexed candidates."""
    from qvpo.agents.qvpo import pick

    candidates = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2)
    index = torch.tensor([[0, 3, 1], [2, 2, 0]])
    out = pick(candidates, index)
    for n in range(2):
        for b in range(3):
            torch.testing.assert_close(out[n, b], candidates[n, b, index[n, b]])
    agent = QVPO(AgentContext(3, 2, seeds=(0,)), batch_size=8, train_candidates=4, train_selection="random")
    m = agent.update(filled_buffers((0,)), step=1)
    assert torch.isfinite(m["loss/actor"]).all()
    with pytest.raises(ConfigError, match="train_selection"):
        QVPO(AgentContext(3, 2), train_selection="worst")

import torch

from qvpo.agents.qvpo import QVPO, best_of_candidates
from qvpo.buffers import Batch, ReplayBuffer
from qvpo.schedules import Constant


class FixedPolicy:
    """Returns given candidates for every call (to check what the agent does with them)."""

    def __init__(self, candidates):
        self.candidates = candidates

    def sample(self, states, n):
        return self.candidates[: states.shape[0], :n]


class SumCritic:
    def q_min(self, s, a):
        return a.sum(-1)


def test_best_of_k_picks_the_argmax():
    cands = torch.tensor([[[0.1, 0.2], [0.9, 0.5], [-1.0, 0.3]],
                          [[0.5, 0.5], [0.0, 0.0], [0.6, 0.6]]])
    best, q = best_of_candidates(FixedPolicy(cands), SumCritic(), torch.zeros(2, 4), 3)
    torch.testing.assert_close(best, torch.tensor([[0.9, 0.5], [0.6, 0.6]]))
    torch.testing.assert_close(q, cands.sum(-1))


def filled_buffer(obs_dim=3, act_dim=2, n=64):
    buf = ReplayBuffer(obs_dim, act_dim, capacity=n)
    buf.seed(0)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        buf.add(torch.randn(obs_dim, generator=g), torch.rand(act_dim, generator=g) * 2 - 1,
                1.0, torch.randn(obs_dim, generator=g), False)
    return buf


def test_policy_loss_gets_best_candidates_qadv_weights_and_entropy_rows(tiny):
    torch.manual_seed(0)
    B, Nd, Ne, A = 4, 5, 3, 2
    agent = QVPO(3, A, batch_size=B, train_candidates=Nd, uniform_samples=Ne,
                 entropy_weight=Constant(0.05), target_candidates=1)
    cands = torch.rand(B, Nd, A) * 2 - 1
    seen = {}
    real_loss = agent.policy.loss

    def spy(states, actions, weights, **kw):
        seen.update(states=states, actions=actions, weights=weights)
        return real_loss(states, actions, weights, **kw)

    agent.policy.sample = FixedPolicy(cands).sample  # online policy's candidates
    agent.critic.q_min = SumCritic().q_min           # Q(s, a) = sum(a), used for selection only
    agent.policy.loss = spy
    metrics = agent.update(filled_buffer(), step=10)

    q = cands.sum(-1)
    w = (q.max(1).values - q.mean(1)).clamp(min=0)
    best = cands[torch.arange(B), q.argmax(1)]
    assert seen["actions"].shape == (B + B * Ne, A)
    torch.testing.assert_close(seen["actions"][:B], best)
    torch.testing.assert_close(seen["weights"][:B], w)
    # the uniform block: Ne rows per state, each weighted omega_ent * w(s), actions in [-1, 1]
    torch.testing.assert_close(seen["weights"][B:], (0.05 * w).repeat_interleave(Ne))
    uni = seen["actions"][B:]
    assert uni.abs().max() <= 1 and uni.std() > 0.3
    torch.testing.assert_close(seen["states"][B:], seen["states"][:B].repeat_interleave(Ne, 0))
    assert metrics["entropy/weight"] == 0.05
    torch.testing.assert_close(metrics["qweight/mean"], w.mean())


def test_termination_stops_bootstrap_truncation_does_not(tiny):
    torch.manual_seed(0)
    agent = QVPO(3, 2, batch_size=2, target_candidates=2, gamma=0.9)
    s2 = torch.randn(2, 3)
    batch = Batch(obs=torch.zeros(2, 3), action=torch.zeros(2, 2), reward=torch.tensor([1.0, 1.0]),
                  next_obs=s2, terminal=torch.tensor([1.0, 0.0]))
    torch.manual_seed(1)
    y = agent.td_target(batch)
    torch.manual_seed(1)  # the same target-policy candidates
    a2, _ = best_of_candidates(agent.policy_target, agent.critic_target, s2, 2)
    q_next = agent.critic_target.q_min(s2, a2)
    assert y[0].item() == 1.0  # terminated: r only
    torch.testing.assert_close(y[1], 1.0 + 0.9 * q_next[1])  # truncated / running: bootstrap
    assert q_next[1].abs() > 1e-4


def test_update_changes_params_and_moves_targets_slowly(tiny):
    torch.manual_seed(0)
    agent = QVPO(3, 2, batch_size=8, train_candidates=4, tau=0.1)
    before = [p.clone() for p in agent.policy.parameters()]
    tgt_before = [p.clone() for p in agent.policy_target.parameters()]
    m = agent.update(filled_buffer(), step=1)
    after = list(agent.policy.parameters())
    assert any((a - b).abs().max() > 0 for a, b in zip(after, before))
    for tb, ta, on in zip(tgt_before, agent.policy_target.parameters(), after):
        torch.testing.assert_close(ta, 0.9 * tb + 0.1 * on)
    for k in ("loss/critic", "loss/actor", "q/mean", "qweight/frac_zero", "entropy/weight"):
        assert k in m
    assert agent.act(torch.randn(5, 3), explore=True).shape == (5, 2)


def test_state_dict_round_trip(tiny):
    torch.manual_seed(0)
    a = QVPO(3, 2, batch_size=8, train_candidates=4)
    a.update(filled_buffer(), step=1)
    b = QVPO(3, 2, batch_size=8, train_candidates=4)
    b.load_state_dict(a.state_dict())
    s = torch.randn(4, 3)
    torch.manual_seed(5)
    x = a.act(s, explore=False)
    torch.manual_seed(5)
    torch.testing.assert_close(b.act(s, explore=False), x)

"""The discrete forms of SAC (SAC-Discrete) and PPO (a categorical policy) on tasks relaxed to
[-1, 1]^n: SAC-Discrete's target and losses by hand on a tiny table, the categorical sampling per
seed, PPO's categorical log-prob / entropy and one update written out with torch.distributions,
and both learning CartPole-v1 (docs/algorithms.md#discrete-actions)."""

import copy
import math

import gin
import pytest
import torch
from torch import nn
from torch.distributions import Categorical

from qvpo.agents import discrete
from qvpo.agents.base import AgentContext
from qvpo.agents.ppo import PPO, CategoricalPolicyValue
from qvpo.agents.sac import SAC, CategoricalActor, DiscreteTwinQ
from qvpo.buffers import Batch
from qvpo.rng import SeedRNG
from qvpo.rollout import gae
from qvpo.train import Trainer
from test_learning import random_policy_return
from helpers import synthetic_rollout


# ------------------------------------------------------------------ SAC-Discrete by hand
class Table(nn.Module):
    """A network that is a lookup table: one-hot states (1, B, S) -> rows of W (1, B, n)."""

    def __init__(self, rows):
        super().__init__()
        self.W = nn.Parameter(torch.tensor([rows], dtype=torch.float32))

    def forward(self, x):
        return x @ self.W


class FixedBatch:
    def __init__(self, batch):
        self.batch = batch

    def sample(self, batch_size):
        return self.batch


# 3 states (one-hot observations), 2 actions
LOGITS = [[0.0, math.log(3.0)], [0.0, 0.0], [math.log(4.0), 0.0]]  # pi: (1/4, 3/4), (1/2, 1/2), (4/5, 1/5)
PI = [[0.25, 0.75], [0.5, 0.5], [0.8, 0.2]]
Q1, Q2 = [[0.0, 1.0], [3.0, 0.0], [-1.0, 0.5]], [[0.5, 2.0], [1.0, 1.0], [2.0, 0.0]]
Q1_TARGET, Q2_TARGET = [[9.0, 9.0], [2.0, 5.0], [1.0, 0.0]], [[9.0, 9.0], [3.0, 4.0], [-1.0, 2.0]]
ALPHA, GAMMA = 0.5, 0.9
# transitions (s, a, r, s', terminal); a is stored as a vector whose argmax is the action (the
# second a warm-up style sample of the box)
TRANSITIONS = [(0, [-1.0, 1.0], 1.0, 1, 0.0), (1, [0.3, -0.5], -2.0, 2, 0.0), (2, [1.0, -1.0], 0.5, 0, 1.0)]


def _sac_on_tables():
    agent = SAC(AgentContext(3, 2, seeds=(0,), discrete_actions=2), hidden=(8,), init_alpha=ALPHA,
                gamma=GAMMA, batch_size=3)
    agent.actor.net = Table(LOGITS)
    agent.critic.q1, agent.critic.q2 = Table(Q1), Table(Q2)
    agent.critic_target.q1, agent.critic_target.q2 = Table(Q1_TARGET), Table(Q2_TARGET)
    eye = torch.eye(3)
    s, a, r, s2, term = zip(*TRANSITIONS)
    batch = Batch(eye[list(s)][None], torch.tensor([a]), torch.tensor([r]), eye[list(s2)][None], torch.tensor([term]))
    return agent, batch


def test_sac_discrete_target_and_losses_by_hand():
    agent, batch = _sac_on_tables()
    assert isinstance(agent.actor, CategoricalActor) and isinstance(agent.critic, DiscreteTwinQ)
    assert agent.target_entropy == pytest.approx(0.98 * math.log(2))  # the paper's default for n = 2
    metrics = agent.update(FixedBatch(batch), step=1)

    def soft_value(s):  # sum_a pi(a|s) [min Q'(s, a) - alpha log pi(a|s)]
        return sum(p * (min(Q1_TARGET[s][a], Q2_TARGET[s][a]) - ALPHA * math.log(p)) for a, p in enumerate(PI[s]))

    y = [r + GAMMA * (1 - term) * soft_value(s2) for _, _, r, s2, term in TRANSITIONS]
    assert y[0] == pytest.approx(1 + GAMMA * (3 + 0.5 * math.log(2)))  # V'(s1) = 3 + alpha log 2
    actions = [max(range(2), key=lambda i: a[i]) for _, a, _, _, _ in TRANSITIONS]
    critic_loss = sum((Q[s][act] - y_i) ** 2 for Q in (Q1, Q2)
                      for (s, *_), act, y_i in zip(TRANSITIONS, actions, y)) / 3
    min_q = [[min(Q1[s][a], Q2[s][a]) for a in range(2)] for s in range(3)]
    actor_loss = sum(p * (ALPHA * math.log(p) - min_q[s][a]) for s in range(3) for a, p in enumerate(PI[s])) / 3
    entropy = [-sum(p * math.log(p) for p in PI[s]) for s in range(3)]
    alpha_loss = -math.log(ALPHA) * sum(-h + 0.98 * math.log(2) for h in entropy) / 3
    expected = {"q/target_mean": sum(y) / 3, "loss/critic": critic_loss, "loss/actor": actor_loss,
                "entropy/estimate": sum(entropy) / 3, "loss/alpha": alpha_loss, "entropy/alpha": ALPHA,
                "q/mean": sum(Q1[s][act] for (s, *_), act in zip(TRANSITIONS, actions)) / 3}
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_sac_discrete_policy_gradient_by_hand():
    """d/dz_j of sum_a pi_a (alpha log pi_a - Q_a) = pi_j (f_j - sum_a pi_a f_a), f = alpha log pi - Q
    (Q held fixed: no gradient reaches the critic)."""
    agent, batch = _sac_on_tables()
    alpha = torch.full((1, 1), ALPHA)
    loss, logp = agent.actor.policy_loss(batch.obs, agent.critic, alpha, agent.rng)
    loss.sum().backward()
    min_q = [[min(Q1[s][a], Q2[s][a]) for a in range(2)] for s in range(3)]
    grad = []
    for s in range(3):
        f = [ALPHA * math.log(p) - min_q[s][a] for a, p in enumerate(PI[s])]
        mean_f = sum(p * fa for p, fa in zip(PI[s], f))
        grad.append([PI[s][j] * (f[j] - mean_f) / 3 for j in range(2)])
    torch.testing.assert_close(agent.actor.net.W.grad, torch.tensor([grad]))
    assert agent.critic.q1.W.grad is None and agent.critic.q2.W.grad is None
    torch.testing.assert_close(logp, torch.tensor([[sum(p * math.log(p) for p in PI[s]) for s in range(3)]]))


def test_sac_discrete_acts_with_vectors_and_estimates_q_at_the_argmax():
    agent, batch = _sac_on_tables()
    obs = torch.eye(3)[None]
    evaluation = agent.act(obs, explore=False)  # argmax pi: actions 1, 0 (tie: lowest), 0
    torch.testing.assert_close(evaluation, torch.tensor([[[-1.0, 1.0], [1.0, -1.0], [1.0, -1.0]]]))
    explore = agent.act(obs.expand(1, 3, 3).repeat(1, 100, 1), explore=True)
    assert set(explore.unique().tolist()) == {-1.0, 1.0} and (explore == 1).sum(-1).eq(1).all()
    assert agent.has_q_critic
    q = agent.q_estimate(batch.obs, batch.action)  # min(Q1, Q2) at the played actions 1, 0, 0
    torch.testing.assert_close(q, torch.tensor([[1.0, 1.0, -1.0]]))


def test_target_entropy_defaults_and_override():
    assert SAC(AgentContext(3, 4, discrete_actions=4), hidden=(8,)).target_entropy == pytest.approx(0.98 * math.log(4))
    assert SAC(AgentContext(3, 4), hidden=(8,)).target_entropy == -4.0
    assert SAC(AgentContext(3, 4, discrete_actions=4), hidden=(8,), target_entropy=0.5).target_entropy == 0.5


# ------------------------------------------------------------------ categorical sampling
def test_categorical_sampling_matches_pi_per_seed_and_seeds_are_independent():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.0, 0.5]])  # seed 0, seed 1 (an impossible action)
    M = 20000
    logits = probs.clamp(min=1e-30).log()[:, None, :].expand(2, M, 3)
    rng = SeedRNG([0, 1], "cpu")
    idx = discrete.sample_index(logits, rng)
    assert idx.shape == (2, M)
    for k in range(2):
        freq = torch.bincount(idx[k], minlength=3).float() / M
        torch.testing.assert_close(freq, probs[k], atol=0.015, rtol=0)  # ~4 standard errors
    assert (idx[1] == 1).sum() == 0
    # each seed's draws are those it makes alone
    for k, seed in enumerate((0, 1)):
        alone = discrete.sample_index(logits[k:k + 1], SeedRNG([seed], "cpu"))
        assert torch.equal(alone[0], idx[k])
    # two seeds with the same policy draw independently: they agree with probability sum p^2
    same = discrete.sample_index(torch.zeros(2, M, 2), SeedRNG([0, 1], "cpu"))
    assert abs((same[0] == same[1]).float().mean().item() - 0.5) < 0.02


def test_inverse_cdf_edges():
    probs = torch.tensor([0.0, 0.5, 0.5])
    u = torch.tensor([[0.0], [0.4999], [0.5], [0.9999999]])
    assert discrete.inverse_cdf(probs.expand(4, 3), u).tolist() == [1, 1, 2, 2]
    short = torch.tensor([[0.3, 0.3, 0.3]])  # a float sum below 1: u beyond it takes the last index
    assert discrete.inverse_cdf(short, torch.tensor([[0.95]])).tolist() == [2]
    v = discrete.to_vector(torch.tensor([0, 2]), 3)
    assert v.tolist() == [[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]] and discrete.to_index(v).tolist() == [0, 2]
    assert discrete.to_index(torch.tensor([0.5, 0.5, -1.0])).item() == 0  # ties: the lowest, as the env


# ------------------------------------------------------------------ PPO's categorical policy
def _discrete_ppo(**kw):
    return PPO(AgentContext(3, 4, seeds=(0,), discrete_actions=4), rollout_steps=8, minibatch_size=4,
               actor_hidden=(8,), critic_hidden=(8,), **kw)


def test_ppo_categorical_log_prob_and_entropy_match_torch():
    agent = _discrete_ppo()
    assert isinstance(agent.net, CategoricalPolicyValue)
    with torch.no_grad():  # away from the near-uniform init (output gain 0.01)
        agent.net.actor_logits[-1].weight.mul_(300.0)
    obs = torch.randn(1, 16, 3)
    actions = torch.rand(1, 16, 4) * 2 - 1  # any vectors: the action is their argmax
    log_prob, entropy, logits = agent.net.log_prob_entropy(obs, actions)
    dist = Categorical(logits=agent.net.actor_logits(obs))
    torch.testing.assert_close(log_prob, dist.log_prob(actions.argmax(-1)))
    torch.testing.assert_close(entropy, dist.entropy())
    assert entropy.std() > 0.05  # not the uniform policy everywhere


def test_ppo_discrete_starts_near_uniform_and_explores_with_vectors():
    agent = _discrete_ppo()
    out = agent.explore(torch.randn(1, 3))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"env_action": (1, 4), "obs": (1, 3), "action": (1, 4),
                                                         "log_prob": (1,), "value": (1,)}
    assert torch.equal(out["env_action"], out["action"]) and (out["action"] == 1).sum() == 1
    assert set(out["action"].unique().tolist()) == {-1.0, 1.0}
    dist = Categorical(logits=agent.net.actor_logits(out["obs"][:, None]))
    torch.testing.assert_close(out["log_prob"], dist.log_prob(out["action"].argmax(-1)[:, None])[:, 0])
    assert out["log_prob"].item() == pytest.approx(-math.log(4), abs=0.05)  # gain 0.01: nearly uniform
    obs = torch.randn(1, 6, 3)
    evaluation = agent.act(obs, explore=False)  # argmax pi
    logits = agent.net.actor_logits(agent._normalize(obs, update=False))
    torch.testing.assert_close(evaluation, discrete.to_vector(logits.argmax(-1), 4))


def test_one_discrete_ppo_update_equals_the_loss_written_out():
    """As tests/test_ppo.py's continuous check: one epoch, one minibatch, one Adam step on the
    clipped surrogate + 0.5 clipped value loss, with torch.distributions.Categorical."""
    agent = PPO(AgentContext(3, 2, seeds=(0,), discrete_actions=2), rollout_steps=8, minibatch_size=8, epochs=1,
                actor_hidden=(8,), critic_hidden=(8,), normalize_reward=False, max_grad_norm=None, anneal_lr=False,
                entropy_coef=0.01)
    net = copy.deepcopy(agent.net)
    ro = synthetic_rollout((0,))  # random actions (N, T, 2): the action is their argmax
    metrics = agent.update(ro, step=8)
    assert "ppo/policy_std" not in metrics

    adv = gae(ro.reward, ro.value, ro.next_value, ro.terminal, ro.done, 0.99, 0.95)
    ret = adv + ro.value
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    dist = Categorical(logits=net.actor_logits(ro.obs))
    ratio = (dist.log_prob(ro.action.argmax(-1)) - ro.log_prob).exp()
    surrogate = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    v = net.critic(ro.obs).squeeze(-1)
    v_clip = ro.value + (v - ro.value).clamp(-0.2, 0.2)
    value_loss = 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2).mean()
    opt = torch.optim.Adam(net.parameters(), lr=3e-4, eps=1e-5)
    (-surrogate + 0.5 * value_loss - 0.01 * dist.entropy().mean()).backward()
    opt.step()
    for p_agent, p_hand in zip(agent.net.parameters(), net.parameters()):
        torch.testing.assert_close(p_agent, p_hand, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ learning CartPole
CARTPOLE = ["Trainer.env_id = 'CartPole-v1'", "Trainer.eval_episodes = 10", "Trainer.progress = False",
            "Trainer.seed = 0"]


def _train(bindings):
    gin.parse_config(CARTPOLE + bindings)
    trainer = Trainer()
    [result] = trainer.run()
    trainer.close()
    return result


def test_ppo_discrete_learns_cartpole():
    """PPO's categorical form on CartPole-v1, 10k env steps (about 15 s). Measured while building
    it (seeds 0 and 3, evaluations every 2k steps): 129, 193, 212, 305, 500 and 62, 140, 237, 482, 500
    (500 is the time limit); a random policy scores about 22."""
    random_return = random_policy_return(env_id="CartPole-v1")
    result = _train(["Trainer.agent = @PPO", "Trainer.total_steps = 10000", "Trainer.eval_every = 2000",
                     "PPO.rollout_steps = 512", "PPO.minibatch_size = 128", "PPO.lr = 0.001"])
    print(f"random {random_return:.0f}; PPO evaluations {[round(e.mean) for e in result.evaluations]}")
    assert random_return < 40
    assert result.final_eval > max(200.0, 5 * random_return)


def test_sac_discrete_learns_cartpole():
    """SAC-Discrete on CartPole-v1, 5k env steps after a 1k warm-up (about 25 s). Measured while
    building it (seeds 0, 1, 2, evaluations every 1k steps): 20, 43, 405, 303, 290 / 9, 83, 331,
    225, 260 / 9, 31, 101, 263, 245; a random policy scores about 22."""
    random_return = random_policy_return(env_id="CartPole-v1")
    result = _train(["Trainer.agent = @SAC", "Trainer.total_steps = 5000", "Trainer.eval_every = 1000",
                     "SAC.warmup_steps = 1000", "SAC.batch_size = 64", "SAC.hidden = (64, 64)",
                     "ReplayBuffer.capacity = 10000"])
    print(f"random {random_return:.0f}; SAC evaluations {[round(e.mean) for e in result.evaluations]}")
    assert random_return < 40
    assert result.final_eval > max(120.0, 5 * random_return)

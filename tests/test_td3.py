import torch

from qvpo.agents.base import AgentContext
from qvpo.agents.td3 import TD3
from test_learning import random_policy_return, train_on_pendulum
from helpers import filled_buffers


def test_target_policy_smoothing_is_clipped():
    agent = TD3(AgentContext(3, 2, seeds=(0, 1)), hidden=(8,), policy_noise=5.0, noise_clip=0.3)
    s2 = torch.randn(2, 500, 3)
    base = agent.actor_target(s2)
    a2 = agent.target_action(s2)
    assert ((a2 - base).abs() <= 0.3 + 1e-6).all()     # noise clipped at noise_clip
    assert a2.abs().max() <= 1.0                        # action clipped to the box
    assert (a2 - base).abs().max() > 0.29               # large noise hits the clip
    agent.noise_clip = 0.0
    torch.testing.assert_close(agent.target_action(s2), base)  # no smoothing: the target policy


def test_actor_and_targets_update_every_policy_delay_steps():
    agent = TD3(AgentContext(3, 2), hidden=(8,), batch_size=8, policy_delay=2)
    buf = filled_buffers()
    actor0 = [p.clone() for p in agent.actor.parameters()]
    critic0 = [p.clone() for p in agent.critic.parameters()]
    target0 = [p.clone() for p in agent.critic_target.parameters()]
    m1 = agent.update(buf, 1)
    assert all(torch.equal(a, b) for a, b in zip(actor0, agent.actor.parameters()))      # delayed
    assert all(torch.equal(a, b) for a, b in zip(target0, agent.critic_target.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, agent.critic.parameters()))  # critic every step
    assert "loss/actor" not in m1
    m2 = agent.update(buf, 2)
    assert any(not torch.equal(a, b) for a, b in zip(actor0, agent.actor.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(target0, agent.critic_target.parameters()))
    assert m2["loss/actor"].shape == (1,)


def test_exploration_noise_and_eval_action():
    agent = TD3(AgentContext(3, 2, seeds=(0,)), hidden=(8,), exploration_noise=0.1)
    obs = torch.randn(1, 1000, 3)
    det = agent.act(obs, explore=False)
    noisy = agent.act(obs, explore=True)
    torch.testing.assert_close(det, agent.actor(obs))
    d = (noisy - det)[(det.abs() < 0.7)]
    assert 0.08 < d.std() < 0.12  # N(0, 0.1) away from the clip


def test_td3_learns_pendulum():
    """TD3 at small settings on Pendulum-v1 ends well above a random policy (about 30 s).

    Measured while building it (seeds 0, 1, 2 at these settings): final evaluation -229, -265, -265;
    a random policy scores about -1270, a good one about -150.
    """
    random_return = random_policy_return()
    result = train_on_pendulum([
        "Trainer.agent = @TD3",
        "Trainer.total_steps = 6000",  # env steps
        "TD3.batch_size = 128", "TD3.hidden = (128, 128)",  # smaller than the reference's 256 / (256, 256)
        "TD3.actor_lr = 1e-3", "TD3.critic_lr = 1e-3",      # the TD3 paper's Table 3 (reference: 3e-4)
    ])
    print(f"random {random_return:.0f}; TD3 evaluations {[round(e.mean) for e in result.evaluations]}")
    assert random_return < -1100
    assert result.final_eval > -500

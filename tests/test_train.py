import gin
import numpy as np
import pytest
import torch

from qvpo.train import MetricAccumulator, Trainer

NO_UPDATES = ["Trainer.progress = False", "Trainer.eval_episodes = 1", "ReplayBuffer.capacity = 100",
              "QVPO.batch_size = 4", "QVPO.T = 2", "Denoiser.hidden = (8,)", "TwinQ.hidden = (8,)"]


def build(*extra):
    gin.parse_config(NO_UPDATES + list(extra))
    return Trainer()


def record_env(t):
    """Log what the training env really returned: per step (obs, action, reward, next_obs)."""
    env, log, cur = t.envs[0], [], {}
    reset, step = env.reset, env.step

    def rec_reset(*args, **kwargs):
        out = reset(*args, **kwargs)
        cur["obs"] = out[0]
        return out

    def rec_step(action):
        out = step(action)
        log.append((cur["obs"], np.asarray(action), out[1], out[0]))
        cur["obs"] = out[0]
        return out

    env.reset, env.step = rec_reset, rec_step
    return log


def f32(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def terminal_flags(buffer, n):
    """The stored terminal flag of each of the first n added transitions."""
    return [float(buffer.transition(i).terminal) for i in range(n)]


def test_truncation_bootstraps_by_default():
    t = build("Trainer.env_id = 'Pendulum-v1'", "make_env.max_episode_steps = 5",
              "Trainer.total_steps = 20", "Trainer.warmup_steps = 20", "Trainer.eval_every = 100")
    log = record_env(t)
    [res] = t.run()
    b = t.buffers[0]
    assert [s for s, _ in res.episodes] == [5, 10, 15, 20]
    assert len(b) == 20 and len(log) == 20
    assert terminal_flags(b, 20) == [0.0] * 20  # Pendulum only truncates: every transition bootstraps
    # the stored next observation at a truncation is the real last one, not the reset's
    assert not torch.allclose(b.transition(4).next_obs, b.transition(5).obs)
    torch.testing.assert_close(b.transition(3).next_obs, b.transition(4).obs)
    for i, (obs, action, reward, next_obs) in enumerate(log):  # every stored transition is exact
        tr = b.transition(i)
        assert torch.equal(tr.obs, f32(obs)) and torch.equal(tr.next_obs, f32(next_obs))
        assert torch.equal(tr.action, f32(action)) and tr.reward.item() == np.float32(reward)
    t.close()


def test_truncation_as_terminal_reproduces_the_reference():
    gin.clear_config()
    import qvpo.config  # noqa: F401
    t = build("Trainer.env_id = 'Pendulum-v1'", "make_env.max_episode_steps = 5",
              "Trainer.total_steps = 20", "Trainer.warmup_steps = 20", "Trainer.eval_every = 100",
              "Trainer.truncation_is_terminal = True")
    t.run()
    flags = terminal_flags(t.buffers[0], 20)
    assert [i for i, f in enumerate(flags) if f] == [4, 9, 14, 19]
    assert set(flags) == {0.0, 1.0}
    t.close()


def test_termination_is_terminal():
    t = build("Trainer.env_id = 'InvertedPendulum-v5'", "Trainer.total_steps = 60",
              "Trainer.warmup_steps = 60", "Trainer.eval_every = 1000")
    [res] = t.run()
    ends = [s for s, _ in res.episodes]
    assert len(ends) >= 2  # random actions topple the pole within a few dozen steps
    flags = terminal_flags(t.buffers[0], 60)
    assert [i for i, f in enumerate(flags) if f] == [s - 1 for s in ends]
    assert set(flags) <= {0.0, 1.0}
    t.close()


def test_metric_accumulator_averages_tensors_and_floats():
    acc = MetricAccumulator()
    acc.add({"a": torch.tensor([1.0, 10.0]), "b": 2.0})
    acc.add({"a": torch.tensor([3.0, 30.0]), "b": 4.0})
    assert acc.pop(2) == [{"a": 2.0, "b": 3.0}, {"a": 20.0, "b": 3.0}]
    assert acc.pop(2) == [{}, {}]


def test_same_seed_same_run():
    runs = []
    for _ in range(2):
        gin.clear_config()
        import qvpo.config  # noqa: F401
        t = build("Trainer.env_id = 'Pendulum-v1'", "Trainer.total_steps = 40", "Trainer.warmup_steps = 20",
                  "Trainer.eval_every = 40", "make_env.max_episode_steps = 10", "Trainer.seed = 3")
        [res] = t.run()
        runs.append((res.episodes, [e.returns for e in res.evaluations],
                     [p.detach().clone() for p in t.agent.policy.parameters()]))
        t.close()
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)
    assert np.isfinite(runs[0][1][0]).all()


def test_seeds_per_process_match_separate_trainers():
    """Seed k of a 2-seed process trains like a 1-seed process started with seed k."""
    common = ["Trainer.env_id = 'Pendulum-v1'", "Trainer.total_steps = 60", "Trainer.warmup_steps = 30",
              "Trainer.eval_every = 60", "make_env.max_episode_steps = 15"]
    gin.clear_config()
    import qvpo.config  # noqa: F401
    t2 = build(*common, "Trainer.seed = 4", "Trainer.seeds_per_process = 2")
    both = t2.run()
    p2 = [p.detach().clone() for p in t2.agent.policy.parameters()]
    t2.close()
    assert len(both) == 2 and both[0].episodes != both[1].episodes  # different env streams
    for k, seed in enumerate((4, 5)):
        gin.clear_config()
        t1 = build(*common, f"Trainer.seed = {seed}")
        [alone] = t1.run()
        assert [s for s, _ in alone.episodes] == [s for s, _ in both[k].episodes]
        np.testing.assert_allclose([r for _, r in alone.episodes], [r for _, r in both[k].episodes], rtol=1e-4)
        np.testing.assert_allclose(alone.evaluations[0].returns, both[k].evaluations[0].returns, rtol=1e-3)
        for a, b in zip(t1.agent.policy.parameters(), p2):
            torch.testing.assert_close(a[0], b[k], rtol=1e-4, atol=1e-5)
        t1.close()


def test_q_overestimation_against_hand_computed_returns():
    """q/overestimation = mean_t Q(s_t, a_t) - G_t over the states whose Monte-Carlo return is
    complete, on a hand-computed episode."""
    import math

    import numpy as np
    import torch

    from qvpo.observers import discounted_returns, mc_horizon, q_bias_states

    np.testing.assert_allclose(discounted_returns(np.array([1.0, 2.0, 3.0]), 0.5), [1 + 0.5 * (2 + 0.5 * 3), 2 + 1.5, 3.0])
    assert mc_horizon(0.5) == 7 and mc_horizon(0.99) == 459  # 0.5^7 < 0.01 <= 0.5^6
    assert q_bias_states(10, True, 0.5) == 10 and q_bias_states(10, False, 0.5) == 3
    assert q_bias_states(200, False, 0.99) == 0

    gin.parse_config(["Trainer.env_id = 'Pendulum-v1'", "Trainer.agent = @SAC", "Trainer.progress = False",
                      "Trainer.seeds_per_process = 2", "SAC.gamma = 0.5", "SAC.hidden = (8,)"])
    trainer = Trainer()
    seen = {}

    def fake_q(obs, act):
        seen["obs"] = obs.clone()
        return torch.full(obs.shape[:2], 5.0)

    trainer.agent.q_estimate = fake_q
    rewards = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    trainer.observers[0].episode[1] = ([np.full(3, t, np.float32) for t in range(10)], [np.zeros(1, np.float32)] * 10,
                                rewards)
    out = trainer.observers[0].on_episode_end(trainer, 1, terminated=False)  # truncated: the first 10 - 7 = 3 states count
    g = discounted_returns(np.array(rewards), 0.5)[:3]
    assert out["q/overestimation"] == pytest.approx(5.0 - g.mean())
    assert out["q/mc_return"] == pytest.approx(g.mean())
    assert seen["obs"].shape == (2, 3, 3) and seen["obs"][1, 2, 0] == 2.0 and seen["obs"][0].abs().sum() == 0
    assert trainer.observers[0].episode[1] == ([], [], [])
    trainer.close()
    assert math.isfinite(out["q/overestimation"])


def test_q_overestimation_is_logged_at_episode_ends():
    gin.parse_config(["Trainer.env_id = 'Pendulum-v1'", "Trainer.agent = @SAC", "Trainer.progress = False",
                      "Trainer.total_steps = 400", "Trainer.warmup_steps = 100", "Trainer.eval_every = 400",
                      "Trainer.eval_episodes = 1", "SAC.gamma = 0.5", "SAC.batch_size = 16", "SAC.hidden = (8,)"])
    logged = []
    trainer = Trainer()
    trainer.run(lambda m, step: logged.append((step, m)) if "q/overestimation" in m else None)
    trainer.close()
    assert [s for s, _ in logged] == [200, 400]  # Pendulum: 200-step episodes, truncated


def test_a_watching_observer_is_logged_but_never_reaches_the_agent():
    """A user's observer returning a name the trainer measures (q/overestimation, which adaptive
    Kt reads) neither overrides the trainer's value in the log nor what the agent is shown; its
    own metrics are logged; a checkpoint without its state leaves it as it was."""
    from qvpo.observers import Observer

    class Meddler(Observer):
        def __init__(self):
            self.episodes = 0

        def on_episode_end(self, trainer, k, terminated):
            self.episodes += 1
            return {"q/overestimation": 999.0, "test/episodes": float(self.episodes)}

        def state_dict(self):
            return self.episodes

        def load_state_dict(self, state):
            self.episodes = state

    gin.parse_config(["Trainer.env_id = 'Pendulum-v1'", "Trainer.agent = @SAC", "Trainer.progress = False",
                      "Trainer.total_steps = 400", "Trainer.warmup_steps = 100", "Trainer.eval_every = 400",
                      "Trainer.eval_episodes = 1", "SAC.gamma = 0.5", "SAC.batch_size = 16", "SAC.hidden = (8,)"])
    trainer = Trainer()
    fresh_state = trainer.state_dict()  # before the observer: no state for it
    trainer.add_observer(Meddler())
    shown, logged = [], []
    trainer.agent.observe_episode = lambda k, metrics: shown.append(dict(metrics))
    trainer.run(lambda m, step: logged.append(m) if "train/episode_return" in m else None)
    assert [m["test/episodes"] for m in logged] == [1.0, 2.0]
    assert all(m["q/overestimation"] != 999.0 for m in logged + shown)
    assert all("test/episodes" not in m for m in shown) and len(shown) == 2
    trainer.load_state_dict(fresh_state)
    assert trainer.observers[-1].episodes == 2  # nothing saved for it: kept, not set to None
    trainer.close()


def test_evaluation_seeds_are_independent_across_training_seeds():
    """No two training seeds share an evaluation episode's seed (with seed + 10000 + i, seed 0's
    env 1 was seed 1's env 0), and the trainer's evaluation envs use exactly these seeds."""
    from qvpo.rng import eval_env_seeds

    seeds = [x for s in range(200) for x in eval_env_seeds(s, 10)]
    assert len(set(seeds)) == len(seeds)
    assert eval_env_seeds(3, 10) == eval_env_seeds(3, 10) and eval_env_seeds(3, 4) == eval_env_seeds(3, 10)[:4]
    t = build("Trainer.env_id = 'Pendulum-v1'", "Trainer.total_steps = 1", "Trainer.eval_episodes = 3",
              "Trainer.seeds_per_process = 2", "Trainer.seed = 5")
    import gymnasium as gym
    for k, s in enumerate((5, 6)):
        for env, e in zip(t.eval_envs[k], eval_env_seeds(s, 3)):
            fresh = gym.make("Pendulum-v1")
            fresh.reset(seed=e)  # the trainer's env was reset once with its seed, and only that
            assert env.unwrapped.np_random.bit_generator.state == fresh.unwrapped.np_random.bit_generator.state
    t.close()

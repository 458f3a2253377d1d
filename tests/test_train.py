import gin
import numpy as np
import torch

from qvpo.train import MetricAccumulator, Trainer

NO_UPDATES = ["Trainer.progress = False", "Trainer.eval_episodes = 1", "ReplayBuffer.capacity = 100",
              "QVPO.batch_size = 4", "DiffusionPolicy.T = 2", "Denoiser.hidden = (8,)", "TwinQ.hidden = (8,)"]


def build(*extra):
    gin.parse_config(NO_UPDATES + list(extra))
    return Trainer()


def test_truncation_bootstraps_by_default():
    t = build("Trainer.env_id = 'Pendulum-v1'", "make_env.max_episode_steps = 5",
              "Trainer.total_steps = 20", "Trainer.warmup_steps = 20", "Trainer.eval_every = 100")
    res = t.run()
    b = t.buffer
    assert [s for s, _ in res.episodes] == [5, 10, 15, 20]
    assert b.terminal[:20].sum() == 0  # Pendulum only truncates: every transition bootstraps
    # the stored next observation at a truncation is the real last one, not the reset's
    assert not torch.allclose(b.next_obs[4], b.obs[5])
    torch.testing.assert_close(b.next_obs[3], b.obs[4])
    t.close()


def test_truncation_as_terminal_reproduces_the_reference():
    gin.clear_config()
    import qvpo.config  # noqa: F401
    t = build("Trainer.env_id = 'Pendulum-v1'", "make_env.max_episode_steps = 5",
              "Trainer.total_steps = 20", "Trainer.warmup_steps = 20", "Trainer.eval_every = 100",
              "Trainer.truncation_is_terminal = True")
    t.run()
    assert t.buffer.terminal[:20].nonzero().flatten().tolist() == [4, 9, 14, 19]
    t.close()


def test_termination_is_terminal():
    t = build("Trainer.env_id = 'InvertedPendulum-v5'", "Trainer.total_steps = 60",
              "Trainer.warmup_steps = 60", "Trainer.eval_every = 1000")
    res = t.run()
    ends = [s for s, _ in res.episodes]
    assert len(ends) >= 2  # random actions topple the pole within a few dozen steps
    term = t.buffer.terminal[:60].nonzero().flatten().tolist()
    assert term == [s - 1 for s in ends]
    t.close()


def test_metric_accumulator_averages_tensors_and_floats():
    acc = MetricAccumulator()
    acc.add({"a": torch.tensor(1.0), "b": 2.0})
    acc.add({"a": torch.tensor(3.0), "b": 4.0})
    assert acc.pop() == {"a": 2.0, "b": 3.0}
    assert acc.pop() == {}


def test_same_seed_same_run():
    runs = []
    for _ in range(2):
        gin.clear_config()
        import qvpo.config  # noqa: F401
        t = build("Trainer.env_id = 'Pendulum-v1'", "Trainer.total_steps = 40", "Trainer.warmup_steps = 20",
                  "Trainer.eval_every = 40", "make_env.max_episode_steps = 10", "Trainer.seed = 3")
        res = t.run()
        runs.append((res.episodes, [e.returns for e in res.evaluations],
                     [p.detach().clone() for p in t.agent.policy.parameters()]))
        t.close()
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)
    assert np.isfinite(runs[0][1][0]).all()

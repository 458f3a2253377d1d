"""Training throughput against stable-baselines3, same machine, same process, same settings.

Each benchmark trains for a fixed number of Hopper-v5 env steps, from scratch, on the CPU, with
the same hyperparameters on both sides (the shapes that decide the cost: batch, networks,
updates per env step, rollout length, epochs). Env steps per second = env_steps / time;
`benchmarks/table.py` prints our rate over SB3's for each algorithm (target: >= 1).

stable-baselines3 is an optional benchmark dependency (`make bench` installs it with torch
pinned); without it these benchmarks are skipped.
"""

import gin
import pytest
import torch

from qvpo.envs import make_env
from qvpo.train import Trainer

sb3 = pytest.importorskip("stable_baselines3")
from stable_baselines3.common.noise import NormalActionNoise  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize  # noqa: E402

ENV = "Hopper-v5"
OFF_POLICY_WARMUP, OFF_POLICY_STEPS = 1_000, 2_000   # env steps: 1,000 gradient updates each
PPO_STEPS = 4_096                                     # env steps: two rollouts of 2,048, 10 epochs each


def _ours(algo: str, steps: int, warmup: int, extra: list[str] = ()) -> None:
    gin.clear_config()
    gin.parse_config([f"Trainer.agent = @{algo}", f"Trainer.env_id = '{ENV}'", f"Trainer.total_steps = {steps}",
                      f"Trainer.warmup_steps = {warmup}", f"Trainer.eval_every = {steps}",
                      "Trainer.eval_episodes = 1", "Trainer.progress = False", "Trainer.device = 'cpu'",
                      "ReplayBuffer.capacity = 1000000", *extra])
    trainer = Trainer()
    trainer.run()
    trainer.close()


def _sb3_off_policy(cls, steps: int, warmup: int, **kw) -> None:
    model = cls("MlpPolicy", make_env(ENV, seed=0), learning_starts=warmup, batch_size=256, buffer_size=1_000_000,
                train_freq=1, gradient_steps=1, device="cpu", seed=0, verbose=0, **kw)
    model.learn(total_timesteps=steps)


def _record(benchmark, lib: str, algo: str, steps: int) -> None:
    benchmark.extra_info.update({"what": f"{lib} {algo} on {ENV}: {steps} env steps of training",
                                 "env_steps": steps, "library": lib, "algo": algo, "threads": torch.get_num_threads()})


@pytest.mark.parametrize("lib", ["qvpo", "sb3"])
def test_sac_training_throughput(benchmark, lib):
    """SAC: batch 256, 2 x 256 ReLU, one update per env step, automatic temperature."""
    _record(benchmark, lib, "SAC", OFF_POLICY_STEPS)
    if lib == "qvpo":
        fn = lambda: _ours("SAC", OFF_POLICY_STEPS, OFF_POLICY_WARMUP)  # noqa: E731
    else:
        fn = lambda: _sb3_off_policy(sb3.SAC, OFF_POLICY_STEPS, OFF_POLICY_WARMUP,  # noqa: E731
                                     policy_kwargs=dict(net_arch=[256, 256]))
    benchmark.pedantic(fn, rounds=3, iterations=1)


@pytest.mark.parametrize("lib", ["qvpo", "sb3"])
def test_td3_training_throughput(benchmark, lib):
    """TD3: batch 256, 2 x 256 ReLU (SB3's default is 400-300: set to ours), policy delay 2,
    Gaussian exploration noise 0.1."""
    _record(benchmark, lib, "TD3", OFF_POLICY_STEPS)
    if lib == "qvpo":
        fn = lambda: _ours("TD3", OFF_POLICY_STEPS, OFF_POLICY_WARMUP)  # noqa: E731
    else:
        fn = lambda: _sb3_off_policy(  # noqa: E731
            sb3.TD3, OFF_POLICY_STEPS, OFF_POLICY_WARMUP, policy_kwargs=dict(net_arch=[256, 256]),
            action_noise=NormalActionNoise(mean=torch.zeros(3).numpy(), sigma=0.1 * torch.ones(3).numpy()))
    benchmark.pedantic(fn, rounds=3, iterations=1)


def _sb3_ppo(steps: int) -> None:
    env = VecNormalize(DummyVecEnv([lambda: make_env(ENV, seed=0)]), gamma=0.99)  # as our PPO normalises
    model = sb3.PPO("MlpPolicy", env, n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4,
                    gae_lambda=0.95, gamma=0.99, clip_range=0.2, max_grad_norm=0.5, device="cpu", seed=0,
                    verbose=0)
    model.learn(total_timesteps=steps)


@pytest.mark.parametrize("lib", ["qvpo", "sb3"])
def test_ppo_training_throughput(benchmark, lib):
    """PPO: rollouts of 2048 steps, 10 epochs of minibatches of 64, 64-64 tanh networks,
    observation and reward normalisation (VecNormalize on the SB3 side)."""
    _record(benchmark, lib, "PPO", PPO_STEPS)
    fn = (lambda: _ours("PPO", PPO_STEPS, 0)) if lib == "qvpo" else (lambda: _sb3_ppo(PPO_STEPS))  # noqa: E731
    benchmark.pedantic(fn, rounds=3, iterations=1)

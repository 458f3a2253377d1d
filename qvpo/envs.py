"""Environments: Gymnasium tasks with actions rescaled to [-1, 1].

Agents act in [-1, 1]^A (the diffusion policy's support); RescaleAction maps that to the env's
bounds. Gymnasium separates `terminated` (a true end: no bootstrap) from `truncated` (the time
limit: bootstrap from the real next observation, which plain env.step returns).
"""

from __future__ import annotations

import gin
import gymnasium as gym
import numpy as np

from qvpo.errors import ConfigError

# the five tasks of the paper's Table 1 (paper: -v3 on mujoco-py; we run Gymnasium -v5)
MUJOCO_TASKS = ("Hopper-v5", "Walker2d-v5", "Ant-v5", "HalfCheetah-v5", "Humanoid-v5")


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless Gymnasium knows env_id (cheap: looks up the registry only)."""
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise ConfigError(f"unknown env id {env_id!r} ({type(e).__name__}); try one of "
                          f"{', '.join(MUJOCO_TASKS)}, Pendulum-v1 or InvertedPendulum-v5") from None


@gin.configurable
def make_env(env_id: str, seed: int, max_episode_steps: int | None = None) -> gym.Env:
    """Build env_id with actions in [-1, 1] and seed its reset and action-space RNGs.

    Args:
      max_episode_steps: override the task's time limit (None = Gymnasium's, 1000 for MuJoCo).
    """
    check_env_id(env_id)
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:  # e.g. DependencyNotInstalled
        raise ConfigError(f"cannot make env {env_id!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"env {env_id!r} has a {type(env.action_space).__name__} action space; "
                          "the agents here need a continuous (Box) action space")
    shape, dtype = env.action_space.shape, env.action_space.dtype
    env = gym.wrappers.RescaleAction(env, min_action=np.full(shape, -1.0, dtype=dtype),
                                     max_action=np.full(shape, 1.0, dtype=dtype))
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def env_dims(env: gym.Env) -> tuple[int, int]:
    return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))

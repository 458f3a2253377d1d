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


# ---------------------------------------------------------------------- exact env state
# A checkpoint taken in the middle of an episode must let the episode continue exactly: the
# simulator state, the time-limit counter and the random generators (reset noise, action-space
# sampling). The observation and the running episode return are kept by the trainer.

DERIVED_MJDATA = ("xpos", "xquat", "xmat", "xipos", "ximat", "subtree_com", "cvel", "cinert", "cfrc_ext")


def _wrappers(env: gym.Env):
    while isinstance(env, gym.Wrapper):
        yield env
        env = env.env


def get_env_state(env: gym.Env) -> dict:
    """The env's exact state: MuJoCo's full integration state (qpos, qvel, act, time, warm-start,
    controls, ...; mj_getState), or a classic-control task's `state` / `last_u`; the time-limit
    counter; the reset and action-space RNG states."""
    import copy

    u = env.unwrapped
    state: dict = {"env_id": env.spec.id if env.spec else type(u).__name__}
    if hasattr(u, "model") and hasattr(u, "data"):
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        sim = np.empty(mujoco.mj_stateSize(u.model, spec))
        mujoco.mj_getState(u.model, u.data, sim, spec)
        state["mujoco"] = sim
        # after mj_step, MjData's positional quantities still describe the state *before* the
        # last integration step, and some tasks read them before stepping (Ant's x_velocity uses
        # body xpos, Humanoid's its xipos): keep them as they are, not as mj_forward would make them
        state["derived"] = {k: getattr(u.data, k).copy() for k in DERIVED_MJDATA}
    else:
        attrs = {k: copy.deepcopy(getattr(u, k)) for k in ("state", "last_u") if hasattr(u, k)}
        if "state" not in attrs:
            raise NotImplementedError(f"cannot checkpoint the state of {type(u).__name__} mid-episode "
                                      "(only MuJoCo and classic-control tasks are supported)")
        state["attrs"] = attrs
    for w in _wrappers(env):
        if isinstance(w, gym.wrappers.TimeLimit):
            state["elapsed_steps"] = w._elapsed_steps
    state["np_random"] = u.np_random.bit_generator.state
    state["action_space"] = env.action_space.np_random.bit_generator.state
    return state


def set_env_state(env: gym.Env, state: dict) -> None:
    u = env.unwrapped
    if "mujoco" in state:
        import mujoco

        mujoco.mj_setState(u.model, u.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(u.model, u.data)  # every derived quantity consistent with the state ...
        for k, v in state["derived"].items():  # ... except those an uninterrupted run has stale
            getattr(u.data, k)[...] = v
    else:
        for k, v in state["attrs"].items():
            setattr(u, k, v)
    for w in _wrappers(env):
        if isinstance(w, gym.wrappers.TimeLimit):
            w._elapsed_steps = state["elapsed_steps"]
    u.np_random.bit_generator.state = state["np_random"]
    env.action_space.np_random.bit_generator.state = state["action_space"]

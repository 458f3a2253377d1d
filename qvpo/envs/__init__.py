"""Environments: Gymnasium tasks, and tasks of other families behind the same Gymnasium API, all
with actions in [-1, 1]^A (docs/environments.md).

Agents act in [-1, 1]^A (the diffusion policy's support). `make_env` puts each family behind that:
a Box action space is rescaled to the task's bounds (RescaleAction); a Discrete(n) one is relaxed
to [-1, 1]^n, the action being the argmax (DiscreteRelaxation); a Dict observation is flattened
into one vector (FlattenDictObservation). Gymnasium separates `terminated` (a true end: no
bootstrap) from `truncated` (the time limit: bootstrap from the real next observation, which
plain env.step returns).

Families (FAMILIES): Gymnasium's MuJoCo, classic-control and Box2D tasks; the DeepMind Control
Suite through Shimmy (`dm_control/<domain>-<task>-v0`, extra `dmc`); Gymnasium-Robotics' Fetch
tasks (extra `robotics`). Box2D needs the extra `box2d`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from dataclasses import dataclass

import gin
import gymnasium as gym
import numpy as np

from qvpo.envs.wrappers import (DiscreteRelaxation, DMControlRandomState, FlattenDictObservation,
                                RandomStateWithBitGenerator, SuccessOnTermination)
from qvpo.errors import ConfigError

__all__ = ["MUJOCO_TASKS", "FAMILIES", "EnvFamily", "EnvStateNotRestorable", "check_env_id", "make_env",
           "env_family", "env_dims", "discrete_actions", "observation_layout", "get_env_state", "set_env_state",
           "DiscreteRelaxation", "FlattenDictObservation", "SuccessOnTermination", "RandomStateWithBitGenerator"]

# the five tasks of the paper's Table 1 (paper: -v3 on mujoco-py; we run Gymnasium -v5)
MUJOCO_TASKS = ("Hopper-v5", "Walker2d-v5", "Ant-v5", "HalfCheetah-v5", "Humanoid-v5")


@dataclass(frozen=True)
class EnvFamily:
    """A family of tasks: the optional extra that installs it (None: the base install) and whether
    `set_env_state` restores its tasks' state exactly mid-episode."""
    name: str
    extra: str | None
    restores_exactly: bool
    examples: tuple[str, ...]


FAMILIES = {f.name: f for f in (
    EnvFamily("mujoco", None, True, MUJOCO_TASKS),
    EnvFamily("classic", None, True, ("Pendulum-v1", "MountainCarContinuous-v0", "CartPole-v1", "Acrobot-v1")),
    EnvFamily("box2d", "box2d", False, ("LunarLander-v3",)),
    EnvFamily("dmc", "dmc", True, ("dm_control/humanoid-run-v0", "dm_control/dog-run-v0")),
    EnvFamily("robotics", "robotics", True, ("FetchReach-v4", "FetchPush-v4")),
    EnvFamily("gymnasium", None, False, ()),  # any other registered id: restores what it can
)}

# Gymnasium-Robotics' goal-conditioned tasks: the flattened observation is these keys, in order
# (achieved_goal is left out: for Fetch it is part of `observation`, the gripper or object position)
GOAL_OBSERVATION_KEYS = ("observation", "desired_goal")
# tasks whose termination is reaching the goal: info["is_success"] = terminated
# (Gymnasium docs: MountainCar's car reaches the flag, Acrobot's free end the target height)
SUCCESS_ON_TERMINATION = ("MountainCarContinuous-v0", "MountainCar-v0", "Acrobot-v1")


class EnvStateNotRestorable(RuntimeError):
    """set_env_state cannot restore this env's simulator state exactly (e.g. a Box2D world). The
    env's random generators and time-limit counter were restored; the caller restarts the episode
    (env.reset()) instead of continuing it."""


def env_family(env_id: str) -> str:
    """The FAMILIES key of env_id (by its id, and for Gymnasium's ids by its entry point)."""
    if env_id.startswith("dm_control/"):
        return "dmc"
    if env_id.startswith("Fetch"):
        return "robotics"
    try:
        entry = gym.spec(env_id).entry_point
    except gym.error.Error:
        return "gymnasium"
    module = entry if isinstance(entry, str) else getattr(entry, "__module__", "")
    for name, prefix in (("mujoco", "gymnasium.envs.mujoco"), ("classic", "gymnasium.envs.classic_control"),
                         ("box2d", "gymnasium.envs.box2d")):
        if module.startswith(prefix):
            return name
    return "gymnasium"


_LOADED: set[str] = set()


def _load_family(family: str, env_id: str) -> None:
    """Import (and register with Gymnasium) what the family's extra installs; ConfigError naming the
    extra when it is not installed."""
    extra = FAMILIES[family].extra
    if extra is None or family in _LOADED:
        return
    try:
        if family == "dmc":
            with warnings.catch_warnings():  # glfw, imported for rendering, warns without a display
                warnings.filterwarnings("ignore", message=".*DISPLAY.*")
                import dm_control  # noqa: F401

                from qvpo.envs.compat import patch_dm_control

                patch_dm_control()
                import shimmy
            gym.register_envs(shimmy)
        elif family == "robotics":
            with contextlib.redirect_stderr(io.StringIO()):  # its import prints a note on Adroit tasks
                import gymnasium_robotics
            from qvpo.envs.compat import patch_gymnasium_robotics

            patch_gymnasium_robotics()
            gym.register_envs(gymnasium_robotics)
        elif family == "box2d":
            import Box2D  # noqa: F401

            with contextlib.redirect_stdout(io.StringIO()):  # pygame prints a banner on import
                import pygame  # noqa: F401 - gymnasium.envs.box2d imports it (CarRacing)
    except ImportError as e:
        raise ConfigError(f"env {env_id!r} needs the optional extra {extra!r} (cannot import "
                          f"{e.name or e}): pip install \"qvpo[{extra}]\"") from None
    _LOADED.add(family)


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless env_id is a known task whose family is installed (imports the
    family's package where it has one; builds nothing)."""
    if not isinstance(env_id, str):
        raise ConfigError(f"env id must be a string, got {env_id!r}")
    _load_family(env_family(env_id), env_id)
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise ConfigError(f"unknown env id {env_id!r} ({type(e).__name__}); try one of "
                          f"{', '.join(MUJOCO_TASKS)}, Pendulum-v1 or InvertedPendulum-v5, or another family "
                          "(docs/environments.md: dm_control/humanoid-run-v0, FetchReach-v4, CartPole-v1)") from None


@gin.configurable
def make_env(env_id: str, seed: int, max_episode_steps: int | None = None) -> gym.Env:
    """Build env_id with actions in [-1, 1] and seed its reset and action-space RNGs.

    Box actions are rescaled to the task's bounds; Discrete(n) actions become [-1, 1]^n with the
    argmax as the action (`discrete_actions(env)` gives n); a Dict observation is flattened
    (`observation_layout(env)` gives each key's slice); tasks that define success report
    info["is_success"] (docs/environments.md).

    Args:
      max_episode_steps: override the task's time limit (None = the task's own: 1000 for
        Gymnasium's MuJoCo tasks and the DeepMind Control Suite, 50 for Fetch, ...).
    """
    check_env_id(env_id)
    family = env_family(env_id)
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:  # e.g. DependencyNotInstalled
        raise ConfigError(f"cannot make env {env_id!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if family == "dmc":
        env = DMControlRandomState(env)
    if isinstance(env.observation_space, gym.spaces.Dict):
        spaces = env.observation_space.spaces
        keys = GOAL_OBSERVATION_KEYS if family == "robotics" else tuple(spaces)  # Dict keys: sorted by name
        if not all(isinstance(spaces[k], gym.spaces.Box) for k in keys if k in spaces):
            env.close()
            raise ConfigError(f"env {env_id!r}: only Dict observations of Box entries are flattened")
        env = FlattenDictObservation(env, keys)
    if env_id in SUCCESS_ON_TERMINATION:
        env = SuccessOnTermination(env)
    if isinstance(env.action_space, gym.spaces.Discrete):
        env = DiscreteRelaxation(env)
    elif isinstance(env.action_space, gym.spaces.Box):
        shape, dtype = env.action_space.shape, env.action_space.dtype
        env = gym.wrappers.RescaleAction(env, min_action=np.full(shape, -1.0, dtype=dtype),
                                         max_action=np.full(shape, 1.0, dtype=dtype))
    else:
        env.close()
        raise ConfigError(f"env {env_id!r} has a {type(env.action_space).__name__} action space; the agents "
                          "here need a continuous (Box) or a Discrete one (relaxed to [-1, 1]^n)")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def env_dims(env: gym.Env) -> tuple[int, int]:
    return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))


def _wrappers(env: gym.Env):
    while isinstance(env, gym.Wrapper):
        yield env
        env = env.env


def discrete_actions(env: gym.Env) -> int | None:
    """n for a Discrete(n) task relaxed to [-1, 1]^n (DiscreteRelaxation), None for a continuous one."""
    return next((w.discrete_n for w in _wrappers(env) if isinstance(w, DiscreteRelaxation)), None)


def observation_layout(env: gym.Env) -> dict[str, slice] | None:
    """For a flattened Dict observation, the slice of the vector each key fills (in order); else None."""
    return next((dict(w.layout) for w in _wrappers(env) if isinstance(w, FlattenDictObservation)), None)


# ---------------------------------------------------------------------- exact env state
# A checkpoint taken in the middle of an episode must let the episode continue exactly: the
# simulator state, the time-limit counter and the random generators (reset noise, action-space
# sampling). The observation and the running episode return are kept by the trainer.

DERIVED_MJDATA = ("xpos", "xquat", "xmat", "xipos", "ximat", "subtree_com", "cvel", "cinert", "cfrc_ext")
CLASSIC_ATTRS = ("state", "last_u", "steps_beyond_terminated")  # what a classic-control task keeps
GOAL_ATTRS = ("goal",)  # what a Gymnasium-Robotics task keeps besides its MuJoCo state


def _rng_state(rng):
    return rng.get_state(legacy=False) if isinstance(rng, np.random.RandomState) else rng.bit_generator.state


def _set_rng_state(rng, state) -> None:
    if isinstance(rng, np.random.RandomState):
        rng.set_state(state)
    else:
        rng.bit_generator.state = state


def _dm_control_env(u):
    """The dm_control.rl.control.Environment under a Shimmy env (None for anything else)."""
    shimmy_dmc = sys.modules.get("shimmy.dm_control_compatibility")
    control = sys.modules.get("dm_control.rl.control")
    if shimmy_dmc is None or control is None or not isinstance(u, shimmy_dmc.DmControlCompatibilityV0):
        return None
    return u._env if isinstance(u._env, control.Environment) else None


def _mujoco_integration_state(model, data) -> np.ndarray:
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    sim = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, sim, spec)
    return sim


def get_env_state(env: gym.Env) -> dict:
    """The env's exact state: MuJoCo's full integration state (qpos, qvel, act, time, warm-start,
    controls, ...; mj_getState) with a Fetch task's goal, a dm_control task's physics, step counter
    and task attributes, or a classic-control task's `state` / `last_u`; the time-limit counter;
    the reset and action-space RNG states. For an env whose simulator state cannot be captured
    (Box2D), the RNG states and `restorable: False` (set_env_state then raises EnvStateNotRestorable)."""
    u = env.unwrapped
    state: dict = {"env_id": env.spec.id if env.spec else type(u).__name__}
    dmc = _dm_control_env(u)
    if dmc is not None:
        physics = dmc.physics
        state["dm_control"] = {
            "physics": _mujoco_integration_state(physics.model.ptr, physics.data.ptr),
            "step_count": dmc._step_count, "reset_next_step": dmc._reset_next_step,
            # the task's per-episode numbers (e.g. the dog's stand height), not its RandomState
            "task": {k: copy.deepcopy(v) for k, v in vars(dmc.task).items()
                     if isinstance(v, (bool, int, float, np.ndarray, np.generic))},
        }
    elif hasattr(u, "model") and hasattr(u, "data"):
        state["mujoco"] = _mujoco_integration_state(u.model, u.data)
        # after mj_step, MjData's positional quantities still describe the state *before* the
        # last integration step, and some tasks read them before stepping (Ant's x_velocity uses
        # body xpos, Humanoid's its xipos): keep them as they are, not as mj_forward would make them
        state["derived"] = {k: getattr(u.data, k).copy() for k in DERIVED_MJDATA}
        attrs = {k: copy.deepcopy(getattr(u, k)) for k in GOAL_ATTRS if hasattr(u, k)}
        if attrs:
            state["attrs"] = attrs
    elif hasattr(u, "state"):
        state["attrs"] = {k: copy.deepcopy(getattr(u, k)) for k in CLASSIC_ATTRS if hasattr(u, k)}
    else:
        state["restorable"] = False
    for w in _wrappers(env):
        if isinstance(w, gym.wrappers.TimeLimit):
            state["elapsed_steps"] = w._elapsed_steps
    state["np_random"] = _rng_state(u.np_random)
    state["action_space"] = env.action_space.np_random.bit_generator.state
    return state


def set_env_state(env: gym.Env, state: dict) -> None:
    """Restore a get_env_state state into an env built the same way (make_env, same id).

    Raises EnvStateNotRestorable when the state has no simulator state (Box2D): the RNGs and the
    time-limit counter are restored all the same, and the caller restarts the episode."""
    u = env.unwrapped
    for w in _wrappers(env):
        if isinstance(w, gym.wrappers.TimeLimit) and "elapsed_steps" in state:
            w._elapsed_steps = state["elapsed_steps"]
    _set_rng_state(u.np_random, state["np_random"])
    env.action_space.np_random.bit_generator.state = state["action_space"]
    if state.get("restorable", True) is False:
        raise EnvStateNotRestorable(f"{state['env_id']} cannot restore its simulator state exactly")
    if "dm_control" in state:
        import mujoco

        s, dmc = state["dm_control"], _dm_control_env(u)
        physics = dmc.physics
        mujoco.mj_setState(physics.model.ptr, physics.data.ptr, s["physics"], mujoco.mjtState.mjSTATE_INTEGRATION)
        # dm_control steps end with mj_step1 (positions and velocities up to date), so mj_forward
        # gives back every quantity the next step reads
        physics.forward()
        dmc._step_count, dmc._reset_next_step = s["step_count"], s["reset_next_step"]
        for k, v in s["task"].items():
            setattr(dmc.task, k, copy.deepcopy(v))
    elif "mujoco" in state:
        import mujoco

        mujoco.mj_setState(u.model, u.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(u.model, u.data)  # every derived quantity consistent with the state ...
        for k, v in state["derived"].items():  # ... except those an uninterrupted run has stale
            getattr(u.data, k)[...] = v
    for k, v in state.get("attrs", {}).items():
        setattr(u, k, copy.deepcopy(v))

"""The env families behind make_env (docs/environments.md): reset, step, seeding, exact
mid-episode state restore, the discrete relaxation, flattened Dict observations, success flags.

Families from optional extras skip when the extra is not installed (`pip install "qvpo[dmc]"`,
`"qvpo[robotics]"`, `"qvpo[box2d]"`)."""

from __future__ import annotations

import sys

import gin
import gymnasium as gym
import numpy as np
import pytest
import torch

import qvpo.envs as envs
from qvpo.envs import (DiscreteRelaxation, EnvStateNotRestorable, discrete_actions, env_dims, get_env_state,
                       make_env, observation_layout, set_env_state)
from qvpo.errors import ConfigError


def needs(module: str, extra: str):
    return pytest.importorskip(module, reason=f"optional extra not installed: pip install \"qvpo[{extra}]\"")


def steps(env, actions):
    """(obs, reward, terminated, truncated, is_success) per step; a finished episode is reset
    (its first observation recorded), as the trainer does."""
    out = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs.copy(), float(r), bool(term), bool(trunc), info.get("is_success")))
        if term or trunc:
            out.append((env.reset()[0].copy(), 0.0, False, False, "reset"))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])  # bit for bit
        assert x[1:] == y[1:]


def check_family(env_id: str, k: int, m: int, **kwargs):
    """reset and step give the declared spaces; same seed, same first observation, other seeds
    differ; a state saved after k steps and restored in a fresh env continues for m steps (across
    an episode end when k + m passes the time limit) exactly as the original env does."""
    env = make_env(env_id, seed=3, **kwargs)
    obs_dim, act_dim = env_dims(env)
    assert env.action_space.shape == (act_dim,)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(env.action_space.high, 1.0)

    first = [make_env(env_id, seed=s, **kwargs).reset(seed=s)[0] for s in (7, 7, 8)]
    assert first[0].shape == (obs_dim,) and env.observation_space.contains(first[0].astype(env.observation_space.dtype))
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])

    actions = np.random.default_rng(0).uniform(-1, 1, (k + m, act_dim)).astype(env.action_space.dtype)
    env.reset(seed=5)
    steps(env, actions[:k])
    state = get_env_state(env)
    # the env's own random draws from here on (action sampling, reset noise) are part of the state
    expected = steps(env, actions[k:]), env.action_space.sample(), env.reset()[0]
    fresh = make_env(env_id, seed=99, **kwargs)
    set_env_state(fresh, state)
    got = steps(fresh, actions[k:]), fresh.action_space.sample(), fresh.reset()[0]
    assert_same(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    np.testing.assert_array_equal(expected[2], got[2])
    return env


# ---------------------------------------------------------------------- errors
def test_unknown_id_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown env id 'Hoper-v5'"):
        make_env("Hoper-v5", seed=0)


@pytest.mark.parametrize("env_id, modules, extra", [
    ("dm_control/humanoid-run-v0", ("dm_control", "shimmy"), "dmc"),
    ("FetchReach-v4", ("gymnasium_robotics",), "robotics"),
    ("LunarLander-v3", ("Box2D",), "box2d"),
])
def test_a_missing_extra_names_its_install_line(monkeypatch, env_id, modules, extra):
    monkeypatch.setattr(envs, "_LOADED", set())
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as when not installed
    with pytest.raises(ConfigError) as e:
        envs.check_env_id(env_id)
    assert f'pip install "qvpo[{extra}]"' in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------- classic control
@pytest.mark.parametrize("env_id, n", [("CartPole-v1", 2), ("Acrobot-v1", 3)])
def test_discrete_tasks_restore_exactly(env_id, n):
    env = check_family(env_id, k=7, m=40)
    assert discrete_actions(env) == n and env_dims(env)[1] == n


def test_mountain_car_continuous_restores_exactly():
    env = check_family("MountainCarContinuous-v0", k=10, m=20)
    assert discrete_actions(env) is None


def test_continuous_tasks_have_no_discrete_size():
    assert discrete_actions(make_env("Pendulum-v1", seed=0)) is None
    assert observation_layout(make_env("Pendulum-v1", seed=0)) is None


class _Recorder(gym.Env):
    """A Discrete(3, start=-1) task that remembers the action it was given."""
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,))
    action_space = gym.spaces.Discrete(3, start=-1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.last = action
        return np.zeros(1, np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("vector, action", [
    ([0.9, -0.2, 0.3], -1), ([-1.0, 1.0, 0.0], 0), ([0.1, 0.2, 0.3], 1),
    ([0.5, 0.5, 0.1], -1),  # a tie goes to the lowest index
    ([-1.0, 1.0, 1.0], 0), ([0.0, 0.0, 0.0], -1),
])
def test_the_relaxation_takes_the_argmax_ties_to_the_lowest_index(vector, action):
    env = DiscreteRelaxation(_Recorder())
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (3,), np.float32) and env.discrete_n == 3
    env.reset()
    env.step(np.asarray(vector, np.float32))
    assert env.unwrapped.last == action
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(2, np.float32))


def test_the_relaxation_steps_the_task_with_the_argmax():
    relaxed, raw = make_env("CartPole-v1", seed=4), gym.make("CartPole-v1")
    o1, o2 = relaxed.reset(seed=4)[0], raw.reset(seed=4)[0]
    np.testing.assert_array_equal(o1, o2)
    for vector, action in [([0.2, 0.2], 0), ([-0.5, 0.3], 1), ([0.9, -1.0], 0), ([1.0, 1.0], 0)]:
        a, b = relaxed.step(np.asarray(vector, np.float32)), raw.step(action)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:4] == b[1:4]


def test_uniform_relaxed_actions_are_uniform_discrete_actions():
    env = make_env("Acrobot-v1", seed=0)
    picks = np.argmax([env.action_space.sample() for _ in range(30_000)], axis=1)
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / len(picks), 1 / 3, atol=0.015)


def test_mountain_car_success_is_reaching_the_flag():
    env = make_env("MountainCarContinuous-v0", seed=0)
    obs, _ = env.reset(seed=0)
    flags = []
    for _ in range(999):  # push along the velocity: the car swings up and reaches the flag
        obs, r, term, trunc, info = env.step(np.array([1.0 if obs[1] >= 0 else -1.0]))
        flags.append(info["is_success"])
        if term or trunc:
            break
    assert term and flags[-1] == 1.0 and set(flags[:-1]) == {0.0}
    env = make_env("MountainCarContinuous-v0", seed=0, max_episode_steps=3)
    env.reset(seed=0)
    out = [env.step(np.zeros(1, np.float32)) for _ in range(3)]
    assert out[-1][3] and not out[-1][2] and out[-1][4]["is_success"] == 0.0  # a time-out is no success


def test_acrobot_reports_success_cartpole_does_not():
    env = make_env("Acrobot-v1", seed=0)
    _, _, term, _, info = env.step(env.action_space.sample())
    assert info["is_success"] == float(term)
    assert "is_success" not in make_env("CartPole-v1", seed=0).step(np.zeros(2, np.float32))[4]


# ---------------------------------------------------------------------- Box2D
def test_box2d_signals_that_it_cannot_restore():
    needs("Box2D", "box2d")
    env = make_env("LunarLander-v3", seed=1)
    assert discrete_actions(env) == 4 and env_dims(env) == (8, 4)
    for a in np.random.default_rng(0).uniform(-1, 1, (5, 4)):
        env.step(a)
    state = get_env_state(env)
    assert state["restorable"] is False
    expected_reset, expected_sample = env.reset()[0], env.action_space.sample()
    fresh = make_env("LunarLander-v3", seed=2)
    with pytest.raises(EnvStateNotRestorable, match="LunarLander-v3"):
        set_env_state(fresh, state)
    # the random streams are restored all the same: the restarted episode is reproducible
    np.testing.assert_array_equal(fresh.reset()[0], expected_reset)
    np.testing.assert_array_equal(fresh.action_space.sample(), expected_sample)


def trainer(*bindings):
    """tests/test_train.py's tiny trainer, with two evaluation episodes (a success rate over two)."""
    from test_train import build
    return build("Trainer.eval_episodes = 2", *bindings)


def test_the_trainer_restarts_an_episode_it_cannot_restore(capsys):
    needs("Box2D", "box2d")
    config = ("Trainer.env_id = 'LunarLander-v3'", "Trainer.total_steps = 12", "Trainer.warmup_steps = 12",
              "Trainer.eval_every = 1000")
    t = trainer(*config, "Trainer.total_steps = 7")
    t.run()
    assert t.ep_len == [7]
    state = t.state_dict()
    t.close()
    t2, before = trainer(*config), state["obs"].copy()
    t2.load_state_dict(state)
    assert capsys.readouterr().out.strip() == ("qvpo: LunarLander-v3 cannot restore its simulator state exactly; "
                                               "the episode restarts")
    assert t2.step == 7 and t2.ep_len == [0] and t2.ep_return == [0.0]
    assert not np.array_equal(t2.obs[0], before[0])  # a new episode's first observation
    t2.run()  # and training goes on
    assert t2.step == 12
    t2.close()


def test_the_trainer_logs_success_where_the_task_defines_it():
    logged = []
    t = trainer("Trainer.env_id = 'MountainCarContinuous-v0'", "make_env.max_episode_steps = 5",
                "Trainer.total_steps = 10", "Trainer.warmup_steps = 10", "Trainer.eval_every = 10")
    t.run(lambda metrics, step: logged.append((step, metrics)))
    t.close()
    assert [(s, m["train/success"]) for s, m in logged if "train/success" in m] == [(5, 0.0), (10, 0.0)]
    assert [(s, m["eval/success_rate"]) for s, m in logged if "eval/success_rate" in m] == [(10, 0.0)]
    logged.clear()
    t = trainer("Trainer.env_id = 'Pendulum-v1'", "make_env.max_episode_steps = 5",
                "Trainer.total_steps = 10", "Trainer.warmup_steps = 10", "Trainer.eval_every = 10")
    t.run(lambda metrics, step: logged.append((step, metrics)))
    t.close()
    assert not any("train/success" in m or "eval/success_rate" in m for _, m in logged)


# ---------------------------------------------------------------------- DeepMind Control Suite
@pytest.mark.parametrize("env_id, dims, keys", [
    ("dm_control/humanoid-run-v0", (67, 21),
     ("com_velocity", "extremities", "head_height", "joint_angles", "torso_vertical", "velocity")),
    ("dm_control/dog-run-v0", (223, 38),
     ("actuator_state", "foot_forces", "inertial_sensors", "joint_angles", "joint_velocites", "torso_com_velocity",
      "torso_pelvis_height", "touch_sensors", "z_projection")),
])
def test_dm_control_tasks(env_id, dims, keys):
    needs("dm_control", "dmc")
    needs("shimmy", "dmc")
    env = check_family(env_id, k=12, m=12)
    assert env_dims(env) == dims and discrete_actions(env) is None
    assert tuple(observation_layout(env)) == keys  # sorted by name: the order of Shimmy's Dict space


def test_dm_control_restores_across_an_episode_end():
    needs("dm_control", "dmc")
    needs("shimmy", "dmc")
    # a 15-step limit: the continuation resets mid-way, from the restored task RandomState
    check_family("dm_control/humanoid-run-v0", k=10, m=12, max_episode_steps=15)


def test_dm_control_flattens_each_entry_in_place():
    needs("dm_control", "dmc")
    needs("shimmy", "dmc")
    env = make_env("dm_control/humanoid-run-v0", seed=0)
    flat, _ = env.reset(seed=0)
    dmc = env.unwrapped._env
    raw = dmc.task.get_observation(dmc.physics)
    for key, s in observation_layout(env).items():
        np.testing.assert_array_equal(flat[s], np.asarray(raw[key], np.float64).ravel())


def test_dm_control_unknown_task_is_a_config_error():
    needs("dm_control", "dmc")
    needs("shimmy", "dmc")
    with pytest.raises(ConfigError, match="unknown env id 'dm_control/humanoid-fly-v0'"):
        make_env("dm_control/humanoid-fly-v0", seed=0)


# ---------------------------------------------------------------------- Gymnasium-Robotics (Fetch)
@pytest.mark.parametrize("env_id, dims, k, m", [("FetchReach-v4", (13, 4), 10, 45),  # across an episode end
                                                ("FetchPush-v4", (28, 4), 20, 20)])
def test_fetch_tasks(env_id, dims, k, m):
    needs("gymnasium_robotics", "robotics")
    env = check_family(env_id, k=k, m=m)
    assert env_dims(env) == dims and env.spec.max_episode_steps == 50
    layout = observation_layout(env)
    assert list(layout) == ["observation", "desired_goal"]
    assert layout["desired_goal"] == slice(dims[0] - 3, dims[0])
    flat, _ = env.reset(seed=0)
    raw = env.unwrapped._get_obs()
    np.testing.assert_array_equal(flat, np.concatenate([raw["observation"], raw["desired_goal"]]))
    for a in np.random.default_rng(1).uniform(-1, 1, (10, 4)):
        _, r, _, _, info = env.step(a)
        assert r in (-1.0, 0.0) and r == info["is_success"] - 1.0  # sparse: 0 at the goal, -1 elsewhere


def test_fetch_reach_success_flag():
    needs("gymnasium_robotics", "robotics")
    env = make_env("FetchReach-v4", seed=0)
    obs, _ = env.reset(seed=0)
    layout = observation_layout(env)
    for _ in range(50):  # move the gripper straight at the goal: success
        grip, goal = obs[0:3], obs[layout["desired_goal"]]
        obs, r, term, trunc, info = env.step(np.append(np.clip(10 * (goal - grip), -1, 1), 0.0))
        if info["is_success"]:
            break
    assert info["is_success"] == 1.0 and r == 0.0


# ---------------------------------------------------------------------- the shipped env configs
@pytest.mark.parametrize("name, module, extra", [
    ("dmc_humanoid_run.gin", "shimmy", "dmc"), ("dmc_dog_run.gin", "shimmy", "dmc"),
    ("fetch_reach.gin", "gymnasium_robotics", "robotics"), ("fetch_push.gin", "gymnasium_robotics", "robotics"),
    ("mountain_car_continuous.gin", None, None), ("cartpole.gin", None, None), ("acrobot.gin", None, None),
    ("lunar_lander.gin", "Box2D", "box2d"),
])
def test_env_configs_name_a_task_with_its_own_time_limit(name, module, extra):
    from pathlib import Path

    import qvpo
    if module:
        needs(module, extra)
    gin.parse_config_file(str(Path(qvpo.__file__).parent / "gin" / "envs" / name))
    env_id, limit = gin.query_parameter("Trainer.env_id"), gin.query_parameter("make_env.max_episode_steps")
    envs.check_env_id(env_id)
    registered = gym.spec(env_id).max_episode_steps
    assert limit == (registered if registered is not None else 1000)  # dm_control's: 1000 steps (its gin cites it)
    assert gin.query_parameter("Trainer.total_steps") > 0


@pytest.mark.parametrize("env_id, module, extra", [("dm_control/humanoid-run-v0", "dm_control", "dmc"),
                                                   ("FetchReach-v4", "gymnasium_robotics", "robotics")])
def test_a_trainer_resumed_on_these_families_continues_exactly(tmp_path, env_id, module, extra):
    """A run that dies right after its checkpoint at step 9 of 14 and is resumed from the file
    (simulator state, replay buffer, agent, RNG streams) ends where the uninterrupted run ends:
    the same observation, returns and parameters after 8 updates, 5 of them after the resume."""
    from qvpo import checkpoint
    from qvpo.train import Checkpointer

    needs(module, extra)
    config = (f"Trainer.env_id = {env_id!r}", "Trainer.warmup_steps = 6", "Trainer.eval_every = 1000",
              "Trainer.total_steps = 14", "Trainer.checkpoint_every = 9",
              "QVPO.train_candidates = 4", "QVPO.behavior_candidates = 2", "QVPO.target_candidates = 2")
    ref = trainer(*config)
    ref.run()

    class Crash(Exception):
        pass

    def die(step):
        raise Crash

    first = trainer(*config)
    with pytest.raises(Crash):
        first.run(checkpointer=Checkpointer(tmp_path / "state.pt", committed=die))
    first.close()
    resumed = trainer(*config)
    resumed.load_state_dict(checkpoint.load(tmp_path / "state.pt")["trainer"])
    assert resumed.step == 9
    resumed.run()
    assert resumed.step == ref.step == 14 and np.array_equal(resumed.obs, ref.obs)
    assert resumed.ep_return == ref.ep_return
    for net in ("policy", "critic"):
        pairs = list(zip(getattr(resumed.agent, net).parameters(), getattr(ref.agent, net).parameters()))
        assert pairs and all(torch.equal(a, b) for a, b in pairs)
    ref.close()
    resumed.close()

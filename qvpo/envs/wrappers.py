"""The wrappers `make_env` puts around the env families (docs/environments.md)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class FlattenDictObservation(gym.ObservationWrapper):
    """A Dict observation as one float64 vector: the entries of `keys`, in that order, each
    flattened (C order). `layout` names the slice each key fills."""

    def __init__(self, env: gym.Env, keys):
        super().__init__(env)
        spaces = env.observation_space.spaces
        missing = [k for k in keys if k not in spaces]
        if missing:
            raise KeyError(f"observation has no {missing} (it has {list(spaces)})")
        self.keys = tuple(keys)
        self.layout: dict[str, slice] = {}
        lows, highs, start = [], [], 0
        for k in self.keys:
            box = spaces[k]
            size = int(np.prod(box.shape))
            self.layout[k] = slice(start, start + size)
            start += size
            lows.append(np.broadcast_to(box.low, box.shape).ravel())
            highs.append(np.broadcast_to(box.high, box.shape).ravel())
        self.observation_space = gym.spaces.Box(np.concatenate(lows).astype(np.float64),
                                                np.concatenate(highs).astype(np.float64), dtype=np.float64)

    def observation(self, observation):
        return np.concatenate([np.asarray(observation[k], dtype=np.float64).ravel() for k in self.keys])


class DiscreteRelaxation(gym.ActionWrapper):
    """A Discrete(n) task for agents acting in [-1, 1]^n: the action is the argmax of the vector
    (ties go to the lowest index; `start + argmax` for a Discrete space with an offset).

    A uniform sample of [-1, 1]^n picks each discrete action with probability 1/n (the argmax
    cells are congruent by symmetry). `discrete_n` keeps n for agents with a discrete form."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.action_space
        assert isinstance(space, gym.spaces.Discrete)
        self.discrete_n, self._start = int(space.n), int(space.start)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.discrete_n,), dtype=np.float32)

    def action(self, action):
        a = np.asarray(action)
        if a.shape != (self.discrete_n,):
            raise ValueError(f"expected an action of shape ({self.discrete_n},), got {a.shape}")
        return self._start + int(np.argmax(a))  # np.argmax: the first maximum


class SuccessOnTermination(gym.Wrapper):
    """info["is_success"] = 1.0 at a step that terminates the episode (the task's goal was
    reached: MountainCar's flag, Acrobot's height), 0.0 otherwise; the episode's success is the
    value at its last step."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "is_success": float(terminated)}


class _FullRNGState:
    """`rng.bit_generator.state` for a legacy RandomState, with its cached Gaussian (which the bit
    generator's own state leaves out, so restoring that alone can shift the next randn())."""

    def __init__(self, rng: np.random.RandomState):
        self._rng = rng

    @property
    def state(self) -> dict:
        return self._rng.get_state(legacy=False)

    @state.setter
    def state(self, value: dict) -> None:
        self._rng.set_state(value)


class RandomStateWithBitGenerator(np.random.RandomState):
    """A RandomState whose `bit_generator.state` is its complete state, as for a Generator: dm_control
    tasks draw from a RandomState, and code that saves `env.unwrapped.np_random.bit_generator.state`
    (qvpo.train's evaluation envs) then works for them too."""

    @property
    def bit_generator(self):  # type: ignore[override]
        return _FullRNGState(self)

    @classmethod
    def copy_of(cls, rng: np.random.RandomState) -> "RandomStateWithBitGenerator":
        new = cls(0)
        new.set_state(rng.get_state(legacy=False))
        return new


class DMControlRandomState(gym.Wrapper):
    """After each seeded reset, swaps the dm_control task's RandomState (which Shimmy creates anew
    from the seed) for a RandomStateWithBitGenerator in the same state: the same random stream."""

    def reset(self, *, seed=None, options=None):
        out = self.env.reset(seed=seed, options=options)
        u = self.env.unwrapped
        if not isinstance(u.np_random, RandomStateWithBitGenerator):
            u.np_random = RandomStateWithBitGenerator.copy_of(u.np_random)
        return out

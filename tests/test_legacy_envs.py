"""The legacy-d4rl fallback, with stand-ins for the `gym` and `d4rl` packages (which no longer
install on a modern Python): old API translated, chosen only when installed or asked for."""

import sys
import types

import gymnasium
import numpy as np
import pytest

from common import envs
from common.envs import legacy


class OldBox:
    def __init__(self, low, high):
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)


class OldEnv:
    """Old gym API: reset() -> obs, step() -> (obs, reward, done, info), seed()."""

    observation_space = OldBox([-np.inf] * 2, [np.inf] * 2)
    action_space = OldBox([-1.0], [1.0])

    def seed(self, seed):
        self.t, self.s = 0, seed

    def reset(self):
        self.t = 0
        return np.array([self.s, 0.0])

    def step(self, a):
        self.t += 1
        done = self.t >= 3
        info = {"TimeLimit.truncated": True} if self.t == 3 and a[0] < 0 else {}
        return np.array([self.s, self.t]), 1.0, done, info

    def close(self):
        pass


@pytest.fixture
def fake_d4rl(monkeypatch):
    class TimeLimit:
        def __init__(self, env):
            self.env = env

    gym = types.ModuleType("gym")
    gym.wrappers = types.SimpleNamespace(TimeLimit=TimeLimit)
    gym.make = lambda name: TimeLimit(OldEnv())
    monkeypatch.setitem(sys.modules, "gym", gym)
    monkeypatch.setitem(sys.modules, "d4rl", types.ModuleType("d4rl"))
    monkeypatch.setattr(legacy.importlib.util, "find_spec", lambda name: object() if name in ("gym", "d4rl") else None)


def test_old_api_is_translated(fake_d4rl):
    env = gymnasium.make("common.envs:kitchen-complete-v0", max_episode_steps=280)
    assert isinstance(env.unwrapped, legacy.LegacyD4RLEnv)
    obs, _ = env.reset(seed=7)
    assert obs.tolist() == [7.0, 0.0]
    env.step(np.array([1.0]))
    env.step(np.array([1.0]))
    *_, terminated, truncated, _ = env.step(np.array([1.0]))
    assert terminated and not truncated  # a real terminal
    env.reset(seed=7)
    for _ in range(3):
        *_, terminated, truncated, _ = env.step(np.array([-1.0]))
    assert truncated and not terminated  # old gym's time limit is not a terminal


def test_backend_choice(fake_d4rl, monkeypatch):
    assert legacy.backend() == "legacy"
    monkeypatch.setenv("D4RL_EVAL_BACKEND", "gymnasium-robotics")
    assert legacy.backend() == "gymnasium-robotics"
    assert not isinstance(envs.make("door-human-v1").unwrapped, legacy.LegacyD4RLEnv)


def test_without_d4rl_ours_are_used_and_legacy_fails_clearly(monkeypatch):
    monkeypatch.setattr(legacy.importlib.util, "find_spec", lambda name: None)
    assert legacy.backend() == "gymnasium-robotics"
    monkeypatch.setenv("D4RL_EVAL_BACKEND", "legacy")
    with pytest.raises(ModuleNotFoundError, match="needs the `d4rl`"):
        legacy.backend()

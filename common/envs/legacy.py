"""The legacy `d4rl` envs (old `gym` + mujoco-py), as gymnasium envs: the exact simulators D4RL's
data came from, for users who still have them installed. Never imported by training; used only
when `d4rl` is importable and `$D4RL_EVAL_BACKEND` is not `gymnasium-robotics` (see
`common/envs/__init__.py`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import gymnasium
import numpy as np

BACKENDS = ("auto", "legacy", "gymnasium-robotics")


def backend() -> str:
    """Which env a D4RL AntMaze/Adroit/Kitchen name evaluates in: 'legacy' or 'gymnasium-robotics'."""
    choice = os.environ.get("D4RL_EVAL_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"$D4RL_EVAL_BACKEND={choice!r}; use one of {BACKENDS}")
    installed = importlib.util.find_spec("d4rl") is not None and importlib.util.find_spec("gym") is not None
    if choice == "legacy" and not installed:
        raise ModuleNotFoundError("$D4RL_EVAL_BACKEND=legacy needs the `d4rl` and `gym` packages (and mujoco-py)")
    return "legacy" if choice == "legacy" or (choice == "auto" and installed) else "gymnasium-robotics"


class LegacyD4RLEnv(gymnasium.Env):
    """Old-gym API (reset() -> obs, step() -> (obs, r, done, info)) adapted to gymnasium's. The old
    TimeLimit is removed: `gymnasium.make` adds the same limit."""

    def __init__(self, name: str):
        gym = importlib.import_module("gym")
        importlib.import_module("d4rl")  # registers the D4RL envs with gym
        env = gym.make(name)
        while isinstance(env, gym.wrappers.TimeLimit):
            env = env.env
        self.env = env
        box = lambda s: gymnasium.spaces.Box(np.asarray(s.low), np.asarray(s.high), dtype=np.asarray(s.low).dtype)
        self.observation_space, self.action_space = box(env.observation_space), box(env.action_space)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.env.seed(seed)
        return np.asarray(self.env.reset()), {}

    def step(self, action):
        obs, reward, done, info = self.env.step(np.asarray(action))
        truncated = bool(info.get("TimeLimit.truncated", False))
        return np.asarray(obs), float(reward), bool(done) and not truncated, truncated, dict(info)

    def close(self):
        self.env.close()

"""Evaluation environments for D4RL's AntMaze, Adroit and Kitchen datasets, built on
gymnasium-robotics (no `d4rl`, `gym` or `mujoco_py`).

Each domain module (`antmaze`, `adroit`, `kitchen`) exposes
- `DATASETS`: the D4RL dataset names it can build an env for;
- `make(name, **kwargs) -> gymnasium.Env`: an env whose observations have the dataset's layout
  (a flat Box), whose actions are in [-1, 1], and whose reward, termination and success follow
  D4RL's definition for that dataset (the time limit is added by `gymnasium.make`).

Importing this package registers every name as a gymnasium id, so `common.data` can describe an
evaluation env as `eval_env_id="common.envs:antmaze-umaze-v2"` and `gymnasium.make` imports this
package on demand.

Where the legacy `d4rl` package (old gym + mujoco-py) is installed, it is used instead: it is the
simulator the data came from, and the mappings here are faithful in layout but run MuJoCo 3.
`$D4RL_EVAL_BACKEND` = auto (default) | legacy | gymnasium-robotics chooses explicitly.
"""

from __future__ import annotations

import functools

import gymnasium as gym

from common.envs import adroit, antmaze, kitchen, legacy

DOMAINS = {"antmaze": antmaze, "adroit": adroit, "kitchen": kitchen}


def env_id(name: str) -> str:
    """gymnasium id of the evaluation env of a D4RL dataset name."""
    return f"common.envs:{name}"


def make(name: str, **kwargs) -> gym.Env:
    """The evaluation env of D4RL dataset `name`: legacy d4rl when installed (see above), else ours."""
    if legacy.backend() == "legacy":
        print(f"{name}: evaluating in the legacy d4rl env ($D4RL_EVAL_BACKEND=gymnasium-robotics to use ours)")
        return legacy.LegacyD4RLEnv(name)
    module = next(m for m in DOMAINS.values() if name in m.DATASETS)
    return module.make(name, **kwargs)


for _module in DOMAINS.values():
    for _name in _module.DATASETS:
        if _name not in gym.registry:
            gym.register(id=_name, entry_point=functools.partial(make, _name))

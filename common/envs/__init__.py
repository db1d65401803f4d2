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
"""

from __future__ import annotations

import functools

import gymnasium as gym

from common.envs import adroit, antmaze, kitchen

DOMAINS = {"antmaze": antmaze, "adroit": adroit, "kitchen": kitchen}


def env_id(name: str) -> str:
    """gymnasium id of the evaluation env of a D4RL dataset name."""
    return f"common.envs:{name}"


for _module in DOMAINS.values():
    for _name in _module.DATASETS:
        if _name not in gym.registry:
            gym.register(id=_name, entry_point=functools.partial(_module.make, _name))

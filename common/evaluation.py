"""Vectorised evaluation: every (seed, episode) pair at once, one batched policy call per env step.

Evaluation environments:
- D4RL gym-locomotion datasets evaluate in gymnasium's MuJoCo `-v5` envs (Hopper-v5,
  HalfCheetah-v5, Walker2d-v5, Ant-v5). D4RL's data came from old gym's `-v3`-style env classes
  on mujoco-py (MuJoCo 2.x). Observation and action spaces, rewards, termination rules and the
  1000-step limit match, but the physics engine is MuJoCo 3 and v5 fixed some model bugs
  (e.g. Walker2d-v5 gives both feet the same friction; Ant-v5's contact forces are real, so we
  turn them off and append D4RL's 84 zero entries). Scores are therefore close to, not identical
  with, what the legacy `d4rl` env would give.
- Minari datasets use the env Minari recovers (`recover_environment(eval_env=True)`).
- `ours/...` datasets and annotated local files use `metadata/env_id`.
- D4RL's AntMaze, Adroit and Kitchen datasets evaluate in gymnasium-robotics envs adapted to
  D4RL's observation layouts, goals and rewards (`common/envs`, registered as
  `common.envs:<d4rl name>`).

Actions are in [-1, 1]; envs with other bounds are rescaled with gymnasium's `RescaleAction`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

from common.data import EnvSpec
from common.errors import UserError


def make_env(spec: EnvSpec, render_mode: str | None = None) -> gym.Env:
    """Build one evaluation env for a dataset, taking actions in [-1, 1] (render_mode: gymnasium's,
    e.g. "rgb_array" for videos)."""
    render = {} if render_mode is None else {"render_mode": render_mode}
    if spec.minari_id is not None:
        import minari

        env = minari.load_dataset(spec.minari_id).recover_environment(eval_env=True, **render)
        if isinstance(env.observation_space, gym.spaces.Dict):  # flattened as common.data flattens the data
            env = gym.wrappers.FlattenObservation(env)
    elif spec.eval_env_id is not None:
        kwargs = dict(spec.eval_env_kwargs)
        if spec.max_episode_steps is not None:
            kwargs["max_episode_steps"] = int(spec.max_episode_steps)
        try:
            env = gym.make(spec.eval_env_id, **kwargs, **render)
        except (gym.error.Error, ModuleNotFoundError, TypeError) as e:  # unknown id, missing package, bad kwargs
            raise UserError(f"{spec.name}: cannot make its evaluation env {spec.eval_env_id!r} with {kwargs} "
                            f"({type(e).__name__}: {e}); fix the file's metadata/env_id or install the env's package") from None
    else:
        raise UserError(f"cannot evaluate on {spec.name!r}: {spec.eval_unsupported}")
    space = env.action_space
    if not (np.all(space.low == -1.0) and np.all(space.high == 1.0)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    return env


def episode_seed(agent_seed: int, episode: int) -> int:
    """Reset seed of one evaluation episode: depends only on the agent's seed and the episode
    index, so seed i of a multi-seed run sees the same start states as a 1-seed run."""
    return int(np.random.SeedSequence([agent_seed, episode]).generate_state(1)[0])


class Evaluator:
    """Holds num_seeds x episodes envs and rolls a batched policy out in all of them."""

    def __init__(self, spec: EnvSpec, seeds: Sequence[int], episodes: int,
                 make: Callable[[EnvSpec], gym.Env] = make_env):
        """make: builds each env (default make_env; tools.evaluate passes one that records frames)."""
        if spec.eval_unsupported is not None and spec.minari_id is None:
            raise UserError(f"cannot evaluate on {spec.name!r}: {spec.eval_unsupported}")
        self.spec, self.seeds, self.episodes = spec, list(seeds), episodes
        self.envs = [[make(spec) for _ in range(episodes)] for _ in self.seeds]
        obs_dim = self.envs[0][0].observation_space.shape[0] + spec.obs_pad
        if obs_dim != spec.obs_dim:
            raise UserError(
                f"{spec.name}: the evaluation env gives {obs_dim}-D observations but the dataset has "
                f"{spec.obs_dim}-D ones; the dataset and env do not match"
            )

    def run(self, policy: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """policy: (S, E, obs_dim) float32 -> (S, E, act_dim). Returns (returns, lengths), each (S, E)."""
        S, E = len(self.seeds), self.episodes
        obs = np.zeros((S, E, self.spec.obs_dim), np.float32)
        for i, seed in enumerate(self.seeds):
            for j, env in enumerate(self.envs[i]):
                obs[i, j] = self._pad(env.reset(seed=episode_seed(seed, j))[0])
        returns = np.zeros((S, E))
        lengths = np.zeros((S, E), np.int64)
        active = np.ones((S, E), bool)
        while active.any():
            actions = np.asarray(policy(obs))
            if not np.isfinite(actions).all():
                raise FloatingPointError("the policy returned non-finite actions during evaluation")
            for i, j in zip(*np.nonzero(active)):
                o, r, terminated, truncated, _ = self.envs[i][j].step(actions[i, j])
                obs[i, j] = self._pad(o)
                returns[i, j] += r
                lengths[i, j] += 1
                active[i, j] = not (terminated or truncated)
        return returns, lengths

    def _pad(self, o: np.ndarray) -> np.ndarray:
        return np.concatenate([o, np.zeros(self.spec.obs_pad)]) if self.spec.obs_pad else o

    def close(self) -> None:
        for row in self.envs:
            for env in row:
                env.close()

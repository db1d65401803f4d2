"""What a trained Hopper policy does: episode lengths, why episodes end, and its actions beside the data's.

    python benchmarks/policy_behaviour.py RUN_DIR [--episodes 5] [--algorithm path/to/algo.py]

Loads every seed of a run (tools.agent.load_agent; `--algorithm` names the algorithm file a run was
trained with when it has changed since, e.g. `git show <commit>:algorithms/misa.py > /tmp/misa_old.py`),
runs the deterministic policy in the run's Hopper env, and prints per seed: mean return and length,
the termination cause of each episode (Hopper-v5's health checks: torso height z below 0.7, torso
angle outside +-0.2, a state entry beyond +-100; or the time limit), and per action dimension the
policy's mean, std and fraction of saturated actions (|a| > 0.99) beside the dataset's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import data  # noqa: E402
from tools.agent import load_agent  # noqa: E402


@dataclasses.dataclass
class Config:
    run_dir: tyro.conf.Positional[str]
    episodes: int = 5
    algorithm: str | None = None
    """the algorithm file the run was trained with (default: the run's algorithm in algorithms/)"""


def cause(env: gym.Env, truncated: bool) -> str:
    if truncated:
        return "time limit"
    u = env.unwrapped
    z, angle = u.data.qpos[1], u.data.qpos[2]
    if not z > u._healthy_z_range[0]:
        return "fell (z < 0.7)"
    if not u._healthy_angle_range[0] < angle < u._healthy_angle_range[1]:
        return "tilted (|angle| > 0.2)"
    return "state out of range"


def main(cfg: Config) -> None:
    config = json.loads((Path(cfg.run_dir) / "config.json").read_text())
    raw, spec = data.load(config["args"]["env"], config["args"].get("dataset_dir"))
    print(f"dataset {config['args']['env']}: actions mean {np.round(raw.action.mean(0), 2)}, std "
          f"{np.round(raw.action.std(0), 2)}, saturated {np.round((np.abs(raw.action) > 0.99).mean(0), 2)}")
    args = config["args"]
    for seed in range(args["seed"], args["seed"] + args["num_seeds"]):
        agent = load_agent(cfg.run_dir, seed=seed, algorithm=cfg.algorithm)
        env = gym.make(spec.eval_env_id, max_episode_steps=spec.max_episode_steps, **spec.eval_env_kwargs)
        lengths, returns, causes, actions = [], [], {}, []
        for ep in range(cfg.episodes):
            obs, _ = env.reset(seed=1000 + ep)
            done, ret, t = False, 0.0, 0
            while not done:
                a = agent.act(obs)
                actions.append(a)
                obs, r, term, trunc, _ = env.step(a)
                ret, t, done = ret + r, t + 1, term or trunc
            c = cause(env, trunc and not term)
            causes[c] = causes.get(c, 0) + 1
            lengths.append(t)
            returns.append(ret)
        a = np.asarray(actions)
        print(f"seed {seed}: return {np.mean(returns):.1f}, length {np.mean(lengths):.1f} "
              f"({', '.join(f'{k}: {v}' for k, v in causes.items())}); actions mean {np.round(a.mean(0), 2)}, "
              f"std {np.round(a.std(0), 2)}, saturated {np.round((np.abs(a) > 0.99).mean(0), 2)}")


if __name__ == "__main__":
    main(tyro.cli(Config))

"""Rebuild D4RL's `door-human` dataset from the original human demonstrations.

    python -m tools.door_human                       # -> datasets/ours/AdroitHandDoor-v1/human.hdf5
    python -m tools.door_human --episodes 3 --out /tmp/door3.hdf5

Input: `door-human-demos.npz` ($DOOR_HUMAN_DEMOS or `datasets/raw/`, see `find_demos`;
described in datasets/raw/README.md): the 25 CyberGlove
tele-operation demonstrations of the Adroit door task from `aravindr93/hand_dapg`
(`door-v0_demos.pickle`, Apache-2.0), the same demonstrations D4RL's `door-human-v1` file was made
from. D4RL made that file (scripts/generation/hand_dapg_demos.py) by setting each demo's recorded
start state, clipping the recorded actions to [-1, 1] and stepping them through its door env,
recording the observation and the simulator state *before* each step and the reward of the step;
`terminals` are all False and `timeouts` is True at each demo's last step.

This module does the same in gymnasium-robotics' AdroitHandDoor-v1 (MuJoCo 3.11) with D4RL's door
reward (`common.envs.adroit`). The result has D4RL's layout and size (25 episodes, 6,729 rows,
39-D observations, 28-D actions, `infos/{qpos,qvel,door_body_pos}`), but it is a replay made
here, not D4RL's file: the observations and rewards differ slightly from D4RL's because the
simulator differs (statistics are printed and stored). Metadata: `env_id` =
`common.envs:door-human-v1` (evaluation in this project's D4RL door env), `max_episode_steps` 200
and D4RL's door reference scores, so `common.data.load("ours/AdroitHandDoor-v1/human")` normalises
returns as D4RL does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

from common import data, scores
from common.envs import adroit

DEMOS_NAME = "door-human-demos.npz"


def find_demos() -> Path:
    """Where the demos are: $DOOR_HUMAN_DEMOS if set, else datasets/raw/ in the repository."""
    if os.environ.get("DOOR_HUMAN_DEMOS"):
        return Path(os.environ["DOOR_HUMAN_DEMOS"]).expanduser()
    return REPO_ROOT / "datasets" / "raw" / DEMOS_NAME

DEFAULT_OUT = data.OURS_DIR / "ours" / "AdroitHandDoor-v1" / "human.hdf5"
D4RL_NAME = "door-human-v1"
DOOR_OPEN_DIM = 38  # the +-1 door-open flag of the observation
SOURCE = (
    "Replay made by this project (tools/door_human.py) of the 25 human door demonstrations of "
    "aravindr93/hand_dapg (dapg/demonstrations/door-v0_demos.pickle, Apache-2.0) in gymnasium-robotics "
    "AdroitHandDoor-v1 on MuJoCo 3 with D4RL's door reward, following D4RL's "
    "scripts/generation/hand_dapg_demos.py (recorded start states, actions clipped to [-1, 1]). "
    "Same demonstrations and layout as D4RL's door-human-v1, but NOT D4RL's file: the simulator differs."
)


def load_demos(path: str | Path | None = None) -> list[dict]:
    """The demos as a list of {'observations', 'actions', 'rewards', 'init_state_dict'} (float64)."""
    with np.load(path if path is not None else find_demos()) as f:
        arrays = {k: f[k] for k in f.files}
    bounds = np.concatenate([[0], np.cumsum(arrays["episode_lengths"].astype(int))])
    return [
        {
            "observations": arrays["observations"][a:b],
            "actions": arrays["actions"][a:b],
            "rewards": arrays["rewards"][a:b],
            "init_state_dict": {"qpos": arrays["init_qpos"][i], "qvel": arrays["init_qvel"][i],
                                "door_body_pos": arrays["init_door_body_pos"][i]},
        }
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def replay(demos: list[dict]) -> tuple[dict[str, np.ndarray], dict]:
    """Replay demos in the D4RL door env; returns (D4RL-layout arrays, statistics)."""
    env = adroit.make(D4RL_NAME)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                            "infos/qpos", "infos/qvel", "infos/door_body_pos")}
    episodes = []
    for i, demo in enumerate(demos):
        state = {k: np.asarray(v, dtype=np.float64) for k, v in demo["init_state_dict"].items()}
        obs, _ = env.reset(seed=i, options={"initial_state_dict": state})
        T = len(demo["actions"])
        ep_obs, ep_rew = [], []
        for t in range(T):
            sim_state = env.unwrapped.get_env_state()
            action = np.clip(demo["actions"][t], -1.0, 1.0)
            ep_obs.append(obs)
            cols["actions"].append(action)
            for k in ("qpos", "qvel", "door_body_pos"):
                cols[f"infos/{k}"].append(sim_state[k])
            obs, reward, terminated, truncated, _ = env.step(action)
            assert not terminated, "the door env never terminates"
            ep_rew.append(reward)
            cols["terminals"].append(False)
            cols["timeouts"].append(t == T - 1)
        ep_obs, ep_rew = np.asarray(ep_obs), np.asarray(ep_rew)
        cols["observations"].extend(ep_obs)
        cols["rewards"].extend(ep_rew)
        dev = np.abs(ep_obs - demo["observations"])
        cont = np.delete(dev, DOOR_OPEN_DIM, axis=1)
        episodes.append({
            "length": T,
            "return_replayed": float(ep_rew.sum()),
            "return_stored": float(np.sum(demo["rewards"])),
            "obs_dev_reset": float(cont[0].max()),
            "obs_dev_after_reset": float(cont[1:].max()),
            "open_flag_mismatch_steps": int((dev[:, DOOR_OPEN_DIM] > 1.0).sum()),
            "reward_dev_max": float(np.abs(ep_rew - demo["rewards"]).max()),
        })
    env.close()
    arrays = {k: np.asarray(v) for k, v in cols.items()}
    arrays["terminals"] = arrays["terminals"].astype(bool)
    arrays["timeouts"] = arrays["timeouts"].astype(bool)
    rel = np.array([abs(e["return_replayed"] - e["return_stored"]) / max(abs(e["return_stored"]), 1e-8) for e in episodes])
    stats = {
        "episodes": len(episodes),
        "steps": int(sum(e["length"] for e in episodes)),
        "mean_return_replayed": float(np.mean([e["return_replayed"] for e in episodes])),
        "mean_return_stored": float(np.mean([e["return_stored"] for e in episodes])),
        "return_rel_diff_median": float(np.median(rel)),
        "return_rel_diff_max": float(rel.max()),
        "obs_dev_reset_max": float(max(e["obs_dev_reset"] for e in episodes)),
        "obs_dev_after_reset_max": float(max(e["obs_dev_after_reset"] for e in episodes)),
        "open_flag_mismatch_steps": int(sum(e["open_flag_mismatch_steps"] for e in episodes)),
        "per_episode": episodes,
    }
    return arrays, stats


def metadata(stats: dict, demos_path: Path) -> dict:
    ref_min, ref_max = scores.d4rl_reference(D4RL_NAME)
    versions = {}
    for package in ("gymnasium", "gymnasium-robotics", "mujoco", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    summary = {k: v for k, v in stats.items() if k != "per_episode"}
    return {
        "env_id": f"common.envs:{D4RL_NAME}",
        "env_kwargs": "{}",
        "max_episode_steps": 200,
        "ref_min_score": ref_min,
        "ref_max_score": ref_max,
        "dataset_name": "ours/AdroitHandDoor-v1/human",
        "d4rl_counterpart": D4RL_NAME,
        "source": SOURCE,
        "demos_file": demos_path.name,
        "demos_sha256": hashlib.sha256(demos_path.read_bytes()).hexdigest(),
        "versions": json.dumps(versions),
        "replay_statistics": json.dumps(summary),
    }


def build(out: str | Path = DEFAULT_OUT, demos_path: str | Path | None = None, episodes: int | None = None) -> dict:
    """Replay the first `episodes` demos (all by default), write the file, return the statistics."""
    demos_path = Path(demos_path) if demos_path is not None else find_demos()
    demos = load_demos(demos_path)[:episodes]
    arrays, stats = replay(demos)
    data.write_d4rl_hdf5(out, arrays, metadata(stats, demos_path))
    return stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output HDF5 file")
    parser.add_argument("--demos", default=str(find_demos()), help="door-human-demos.npz")
    parser.add_argument("--episodes", type=int, default=None, help="replay only the first N demos")
    args = parser.parse_args(argv)
    out = Path(args.out)
    stats = build(out, args.demos, args.episodes)
    print(f"{'ep':>3} {'steps':>5} {'return replayed':>15} {'stored':>8} {'diff %':>7} {'obs dev reset':>13} "
          f"{'after':>6} {'flag steps':>10}")
    for i, e in enumerate(stats["per_episode"]):
        diff = 100 * (e["return_replayed"] - e["return_stored"]) / abs(e["return_stored"])
        print(f"{i:>3} {e['length']:>5} {e['return_replayed']:>15.1f} {e['return_stored']:>8.1f} {diff:>7.1f} "
              f"{e['obs_dev_reset']:>13.3f} {e['obs_dev_after_reset']:>6.3f} {e['open_flag_mismatch_steps']:>10}")
    print(f"episodes {stats['episodes']}, steps {stats['steps']}, mean return replayed {stats['mean_return_replayed']:.1f} "
          f"vs stored {stats['mean_return_stored']:.1f}; |return difference| median "
          f"{100 * stats['return_rel_diff_median']:.1f} %, max {100 * stats['return_rel_diff_max']:.1f} %; "
          f"max obs deviation (continuous dims) {stats['obs_dev_reset_max']:.3f} at reset, "
          f"{stats['obs_dev_after_reset_max']:.3f} after; door-open flag differs on "
          f"{stats['open_flag_mismatch_steps']} of {stats['steps']} steps")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

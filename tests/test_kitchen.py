"""D4RL Kitchen evaluation envs (common/envs/kitchen.py): observation, actions, reward, termination,
and MISA end to end on a tiny file stored under D4RL's kitchen-complete file name."""

from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest

import common.envs  # noqa: F401  (registers the D4RL names)
from common import data
from common.envs import kitchen

GOALS = {  # D4RL kitchen_envs.OBS_ELEMENT_INDICES / OBS_ELEMENT_GOALS, written out
    "bottom burner": ([11, 12], [-0.88, -0.01]),
    "light switch": ([17, 18], [-0.69, -0.05]),
    "slide cabinet": ([19], [0.37]),
    "microwave": ([22], [-0.75]),
    "kettle": ([23, 24, 25, 26, 27, 28, 29], [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06]),
}


def test_names_spaces_and_registration():
    assert kitchen.DATASETS == ["kitchen-complete-v0", "kitchen-partial-v0", "kitchen-mixed-v0"]
    for name in kitchen.DATASETS:
        assert data.d4rl_spec_fields(name)["eval_env_id"] == f"common.envs:{name}"
        assert data.d4rl_spec_fields(name)["max_episode_steps"] == 280
        env = gym.make(name)
        assert env.observation_space.shape == (60,) and env.action_space.shape == (9,)
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    with pytest.raises(ValueError):
        kitchen.make("kitchen-everything-v0")


@pytest.mark.parametrize("name,tasks", [("kitchen-complete-v0", ["microwave", "kettle", "light switch", "slide cabinet"]),
                                        ("kitchen-mixed-v0", ["microwave", "kettle", "bottom burner", "light switch"])])
def test_observation_is_robot_qpos_object_qpos_goal(name, tasks):
    env = gym.make(name)
    obs, info = env.reset(seed=0)
    assert sorted(info["tasks_to_complete"]) == sorted(tasks)
    u = env.unwrapped
    rng = np.random.default_rng(0)
    robot_noise, object_noise = [], []
    for _ in range(20):
        obs, *_ = env.step(rng.uniform(-1, 1, 9))
        np.testing.assert_array_equal(obs[:9], u.robot_env._last_robot_qpos)  # what the controller integrates from
        robot_noise.append(obs[:9] - u.data.qpos[:9])
        object_noise.append(obs[9:30] - u.data.qpos[9:30])
        goal = np.zeros(30)
        for task in tasks:
            goal[GOALS[task][0]] = GOALS[task][1]
        np.testing.assert_array_equal(obs[30:], goal)  # constant, D4RL's 4-task goal
    # D4RL's observation noise: uniform, 0.1 x pos_noise_amp (0.1 on the robot joints, 0.0005-0.1 on objects)
    robot_noise, object_noise = np.abs(robot_noise), np.abs(object_noise)
    assert robot_noise.max() <= 0.01 + 1e-12 and robot_noise.max() > 0.007
    amp = 0.1 * kitchen.object_noise_amplitudes()
    assert np.all(object_noise <= amp + 1e-12) and np.all(object_noise.max(axis=0) > 0.5 * amp)
    assert amp[22 - 9] == pytest.approx(0.01) and amp[11 - 9] == pytest.approx(5e-5)  # microwave; bottom burner


def test_actions_are_normalised_joint_velocities():
    """D4RL Robot_VelAct: target = clip(noisy qpos + clip(2 a, vel bounds) * 0.08 s, pos bounds),
    sent to position actuators."""
    env = gym.make("kitchen-partial-v0")
    obs, _ = env.reset(seed=1)
    u = env.unwrapped
    rng = np.random.default_rng(1)
    for _ in range(3):
        a = rng.uniform(-1.3, 1.3, 9)
        before = obs[:9].copy()
        obs, *_ = env.step(a)
        vel = np.clip(2.0 * np.clip(a, -1, 1), u.robot_env.robot_vel_bound[:9, 0], u.robot_env.robot_vel_bound[:9, 1])
        target = np.clip(before + vel * 0.08, u.robot_env.robot_pos_bound[:9, 0], u.robot_env.robot_pos_bound[:9, 1])
        np.testing.assert_allclose(u.data.ctrl[:9], target, atol=1e-12)
    assert u.robot_env.dt == pytest.approx(0.08) and u.robot_env.frame_skip == 40


def _set_qpos(env, indices, values):
    u = env.unwrapped
    u.data.qpos[indices] = values
    u.data.qvel[:] = 0.0
    mujoco.mj_forward(u.model, u.data)


def test_completing_a_task_pays_once_and_removes_it():
    env = gym.make("kitchen-complete-v0", max_episode_steps=280)
    env.reset(seed=0)
    for _ in range(3):
        _, reward, terminated, _, info = env.step(np.zeros(9))
        assert reward == 0.0 and not terminated
    _set_qpos(env, *GOALS["microwave"])
    _, reward, terminated, _, info = env.step(np.zeros(9))
    assert reward == 1.0 and not terminated
    assert info["step_task_completions"] == ["microwave"] and "microwave" not in info["tasks_to_complete"]
    for _ in range(3):  # the microwave stays open, but pays only once
        obs, reward, terminated, _, info = env.step(np.zeros(9))
        assert reward == 0.0 and abs(obs[22] + 0.75) < 0.3
    assert info["episode_task_completions"] == ["microwave"] and not info["episode_success"]
    # a new episode starts with every task again
    _, info = env.reset(seed=1)
    assert len(info["tasks_to_complete"]) == 4


def test_episode_ends_when_all_tasks_are_done():
    env = gym.make("kitchen-mixed-v0", max_episode_steps=280)
    env.reset(seed=0)
    for task in ("microwave", "kettle", "bottom burner"):
        _set_qpos(env, *GOALS[task])
    _, reward, terminated, _, info = env.step(np.zeros(9))
    assert reward == 3.0 and not terminated and info["tasks_to_complete"] == ["light switch"]
    _set_qpos(env, *GOALS["light switch"])
    _, reward, terminated, _, info = env.step(np.zeros(9))
    assert reward == 1.0 and terminated and info["episode_success"]


def _kitchen_file(path: Path, episodes: int = 2, steps: int = 60, seed: int = 0) -> None:
    """A tiny file in D4RL's kitchen layout (60-D observations, 9-D actions, timeouts), from random actions."""
    env = kitchen.make("kitchen-complete-v0")
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        for t in range(steps):
            a = rng.uniform(-1, 1, 9)
            nxt, r, term, _, _ = env.step(a)
            for k, v in zip(cols, (obs, a, r, term, t == steps - 1 and not term)):
                cols[k].append(v)
            obs = nxt
    # random actions complete no task, so every reward is 0 and the kitchen preset's --reward-norm (scaling by
    # the range) refuses the file; D4RL's files count completed tasks: the last steps of the last episode here
    # count one
    cols["rewards"][-steps // 4:] = [1.0] * (steps // 4)
    data.write_d4rl_hdf5(path, {k: np.asarray(v) for k, v in cols.items()})


def test_end_to_end_misa_on_a_tiny_kitchen_complete_file(tmp_path, run_script):
    d4rl_dir = tmp_path / "d4rl"
    _kitchen_file(d4rl_dir / "mini_kitchen_microwave_kettle_light_slider-v0.hdf5")
    transitions, spec = data.load("kitchen-complete-v0", dataset_dir=d4rl_dir, download=False)
    assert spec.obs_dim == 60 and spec.act_dim == 9 and spec.eval_env_id == "common.envs:kitchen-complete-v0"
    results, _, _ = run_script("misa", "kitchen-complete-v0", dataset_dir=d4rl_dir)
    assert results["seeds"] == [0] and np.isfinite(results["final_mean"])
    rows = [r.split(",") for r in (tmp_path / "run" / "eval.csv").read_text().splitlines()[1:]]
    assert rows and all(0.0 <= float(r[2]) <= 4.0 and int(r[3]) <= 280 for r in rows)

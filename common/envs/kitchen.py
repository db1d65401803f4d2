"""D4RL Kitchen evaluation envs (`kitchen-{complete,partial,mixed}-v0`) on gymnasium-robotics'
`FrankaKitchen-v1` (MuJoCo 3, no mujoco-py / dm_control).

D4RL's env is `d4rl/kitchen/kitchen_envs.py` (KitchenMicrowaveKettleLightSliderV0 for complete and
partial, KitchenMicrowaveKettleBottomBurnerLightV0 for mixed) on `adept_envs`' KitchenTaskRelaxV1 /
KitchenV0 with the velocity-actuated Franka (`Robot_VelAct`). `make(name)` wraps gymnasium-robotics'
KitchenEnv and rebuilds D4RL's observation, reward and termination. Item by item:

- Tasks: **faithful**. complete and partial: microwave, kettle, light switch, slide cabinet; mixed:
  microwave, kettle, bottom burner, light switch. Same element indices, goal values and completion
  threshold (|element qpos - goal| < 0.3) as D4RL (gymnasium-robotics copied both tables).
- Observation: **faithful layout**, 60-D = robot joint positions (9: 7 arm joints + 2 fingers),
  object joint positions (21: qpos[9:30], i.e. burner knobs/burners, light switch, slide cabinet,
  hinge cabinet doors, microwave, kettle position + quaternion), then D4RL's goal vector (30: zeros
  except the goal values of the episode's 4 tasks at their qpos indices; constant over the episode,
  also after a task is done). gymnasium-robotics' own observation (59-D: robot qpos + qvel, object
  qpos + qvel, plus a goal dict) is not used.
- Observation noise: **faithful in distribution**. D4RL adds uniform noise of amplitude
  0.1 x `pos_noise_amp` (franka_config.xml: 0.01 on the arm joints and fingers, 0.00005-0.01 on
  the objects) to every observed position, robot and objects (KitchenV0.robot_noise_ratio = 0.1).
  gymnasium-robotics ships the same franka_config.xml values (position/velocity bounds and noise
  amplitudes compared entry by entry with a copy of D4RL's adept_envs file).
  gymnasium-robotics defaults to 0.01 for the robot and 0.0005 for the objects (and takes the object
  amplitudes one entry off); here the robot env is built with robot_noise_ratio=0.1 and the object
  noise is drawn here with D4RL's ratio and entries. The random numbers themselves differ.
- Actions: **faithful**. 9-D in [-1, 1], clipped, scaled by 2 to joint velocities (rad/s; fingers
  too), clipped to the velocity bounds, integrated for one control step (0.08 s = 40 x 2 ms) from the
  *noisy* observed robot position, clipped to the position bounds and sent as position targets to
  the position actuators: D4RL's Robot_VelAct semantics, which FrankaRobot reproduces.
- Reward: **faithful**. +1 for each remaining task whose element is within 0.3 of its goal in the
  (noisy) observation after the step, and that task is removed (REMOVE_TASKS_WHEN_COMPLETE), so each
  task pays at most once per episode; return = number of tasks completed (0-4), D4RL's reference
  scores 0 / 4. There is no other bonus or shaping term in D4RL's kitchen reward.
- Termination: **faithful**. `terminated` once all 4 tasks are done (TERMINATE_ON_TASK_COMPLETE);
  the 280-step limit (D4RL's registration for all three) is added by `gymnasium.make`.
- Start state: **faithful**: D4RL's fixed initial qpos (the same 30 numbers), zero velocity; only
  the observation noise is random.
- Dynamics: **approximate**. gymnasium-robotics' kitchen MJCF (`kitchen_env_model.xml`) is a port of
  D4RL's `franka_kitchen_jntpos_act_ab.xml` run by MuJoCo 3.11 instead of MuJoCo 2.0 (mujoco-py /
  dm_control). Compared here: the same scene (counters, oven, back wall, slide and hinge cabinets,
  microwave and kettle at the same poses, robot base at (0, 0, 1.8)), the same keyframe and joint
  order (D4RL's element indices), 2 ms timestep x 40 substeps. Differences seen: D4RL's welded mocap
  body `vive_controller` is gone (no effect on the dynamics), and the robot's pedestal cylinder lost
  its visual-only class (`panda_viz`), so in gymnasium-robotics it may collide. D4RL's Franka actuator
  and joint files (adept's third_party/franka) could not be read here, so the actuator parameters
  (kp 870 arm / 120 wrist / 500 fingers in gymnasium-robotics) are unverified, and no D4RL kitchen
  trajectory could be replayed to measure the difference (neither the raw demonstrations nor D4RL's
  files are reachable from this machine).
- Info: `tasks_to_complete`, `step_task_completions`, `episode_task_completions` (as
  gymnasium-robotics names them, computed here) and `episode_success` (all tasks done).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from common.data import D4RL_DATASETS, domain_of

TASK_SETS = {
    "complete": ("microwave", "kettle", "light switch", "slide cabinet"),
    "partial": ("microwave", "kettle", "light switch", "slide cabinet"),
    "mixed": ("microwave", "kettle", "bottom burner", "light switch"),
}
DATASETS: list[str] = [n for n in D4RL_DATASETS if domain_of(n) == "kitchen"]  # the registry's names
N_ROBOT, N_OBJECT = 9, 21
OBS_DIM = 2 * (N_ROBOT + N_OBJECT)  # 60
NOISE_RATIO = 0.1  # adept_envs KitchenV0.robot_noise_ratio, applied to robot and object positions
COMPLETION_THRESHOLD = 0.3  # kitchen_envs.BONUS_THRESH


def element_tables():
    """(qpos indices, goal values) of every kitchen element, from gymnasium-robotics (the same
    numbers as D4RL's OBS_ELEMENT_INDICES / OBS_ELEMENT_GOALS)."""
    from gymnasium_robotics.envs.franka_kitchen.kitchen_env import OBS_ELEMENT_GOALS, OBS_ELEMENT_INDICES

    return OBS_ELEMENT_INDICES, OBS_ELEMENT_GOALS


def goal_vector(tasks) -> np.ndarray:
    """D4RL's 30-D goal: zeros except each task's goal at its qpos indices."""
    indices, goals = element_tables()
    goal = np.zeros(N_ROBOT + N_OBJECT)
    for task in tasks:
        goal[indices[task]] = goals[task]
    return goal


def object_noise_amplitudes() -> np.ndarray:
    """pos_noise_amp of qpos 9..29 from franka_config.xml (D4RL: the last n_obj of n_jnt + n_obj entries)."""
    from pathlib import Path

    import gymnasium_robotics
    from gymnasium_robotics.envs.franka_kitchen.utils import get_config_root_node, read_config_from_node

    config = Path(gymnasium_robotics.__file__).parent / "envs/assets/kitchen_franka/franka_assets/franka_config.xml"
    root, _ = get_config_root_node(config_file_name=str(config))
    return np.array([read_config_from_node(root, f"qpos{i}", "pos_noise_amp", float)[0]
                     for i in range(N_ROBOT, N_ROBOT + N_OBJECT)])


class D4RLKitchen(gym.Wrapper):
    """D4RL's 60-D observation, +1-per-task reward with task removal, and termination on a
    gymnasium-robotics KitchenEnv."""

    def __init__(self, env: gym.Env, tasks):
        super().__init__(env)
        self.tasks = tuple(tasks)
        self.goal = goal_vector(self.tasks)
        self._indices = element_tables()[0]
        self._obj_noise = NOISE_RATIO * object_noise_amplitudes()
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
        self.tasks_to_complete: list[str] = list(self.tasks)
        self.episode_task_completions: list[str] = []

    def _d4rl_obs(self, gym_obs: dict) -> np.ndarray:
        u = self.env.unwrapped
        robot_qpos = gym_obs["observation"][:N_ROBOT]  # noisy; the controller integrates from it too
        rng = u.robot_env.np_random
        obj_qpos = u.data.qpos[N_ROBOT:N_ROBOT + N_OBJECT] + self._obj_noise * rng.uniform(-1.0, 1.0, N_OBJECT)
        return np.concatenate([robot_qpos, obj_qpos, self.goal])

    def _info(self, step_completions):
        return {"tasks_to_complete": list(self.tasks_to_complete), "step_task_completions": list(step_completions),
                "episode_task_completions": list(self.episode_task_completions),
                "episode_success": not self.tasks_to_complete}

    def reset(self, **kwargs):
        gym_obs, _ = self.env.reset(**kwargs)
        self.tasks_to_complete = list(self.tasks)
        self.episode_task_completions = []
        return self._d4rl_obs(gym_obs), self._info([])

    def step(self, action):
        gym_obs, _, _, truncated, _ = self.env.step(action)
        obs = self._d4rl_obs(gym_obs)
        done_now = [task for task in self.tasks_to_complete
                    if np.linalg.norm(obs[self._indices[task]] - self.goal[self._indices[task]]) < COMPLETION_THRESHOLD]
        for task in done_now:
            self.tasks_to_complete.remove(task)
            self.episode_task_completions.append(task)
        terminated = not self.tasks_to_complete
        return obs, float(len(done_now)), terminated, truncated, self._info(done_now)


def make(name: str, **kwargs) -> gym.Env:
    """Evaluation env of a D4RL Kitchen dataset name (e.g. 'kitchen-complete-v0'). kwargs go to
    gymnasium-robotics' KitchenEnv / FrankaRobot (e.g. render_mode)."""
    split = name.split("-")[1] if name.startswith("kitchen-") and name.count("-") == 2 else None
    if split not in TASK_SETS:
        raise ValueError(f"{name!r} is not a Kitchen dataset name; known: {DATASETS}")
    from gymnasium_robotics.envs.franka_kitchen.kitchen_env import KitchenEnv

    tasks = TASK_SETS[split]
    kwargs = {"robot_noise_ratio": NOISE_RATIO, **kwargs}
    env = KitchenEnv(tasks_to_complete=list(tasks), terminate_on_tasks_completed=False,
                     remove_task_when_completed=True, object_noise_ratio=0.0, **kwargs)
    return D4RLKitchen(env, tasks)

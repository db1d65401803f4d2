"""D4RL Adroit evaluation envs (`pen|door|hammer|relocate-{human,cloned,expert}-v1`) on
gymnasium-robotics' `AdroitHand{Pen,Door,Hammer,Relocate}-v1` (MuJoCo 3, no mujoco-py).

D4RL's v1 datasets were recorded in D4RL's `hand_manipulation_suite/{pen,door,hammer,relocate}_v0.py`
env classes (mujoco-py, MuJoCo 2.0); `make(name)` returns the gymnasium-robotics env with D4RL's
reward and termination put back. Item by item:

- Observations: **faithful** layout. gymnasium-robotics' `_get_obs` builds the same vectors as D4RL's
  `get_obs`, element for element: pen 45 = hand qpos[:-6] (24), object pos (3), object velocity
  qvel[-6:] (6), object and target orientation (3 + 3), position and orientation differences
  (3 + 3); door 39 = qpos[1:-2] (27), latch qpos[-1], door hinge angle, palm pos, handle pos,
  palm - handle, door-open flag (+1 if hinge > 1.0 else -1); hammer 46 = qpos[:-6] (27),
  clip(qvel[-6:], -1, 1), palm pos, hammer pos, hammer Euler angles (same quat2euler convention),
  nail pos, clip(nail touch sensor, -1, 1); relocate 39 = qpos[:-6] (30), palm - object,
  palm - target, object - target. Checked against the simulator in tests/test_adroit.py.
- Actions: **faithful**. Both clip to [-1, 1] and map to `act_mid + a * act_rng` over the actuator
  control ranges, with the same actuator gain/bias overrides (wrist 10, fingers 1), frame skip 5.
- Reward: **faithful formula, recomputed here from the simulator state** after every step
  (`d4rl_reward`), because gymnasium-robotics >= 1.2.1 changed door, hammer and relocate without a
  version bump: its first term is `+0.1 * |palm - handle|` (door), `+0.1 * |palm - hammer|` (hammer)
  and `+0.1 * |palm - object|` (relocate), where D4RL has `-0.1 * ...` (a reward for moving the hand
  away). Everything else matches D4RL's v0 code (with ADD_BONUS_REWARDS = True): door
  `-0.1 (hinge - 1.57)^2 - 1e-5 sum(qvel^2)` + 2/8/10 above 0.2/1.0/1.35 rad; hammer
  `-|tool - nail| - 10 |nail - goal| - 0.01 |qvel|` + 2 if hammer and head above z 0.04, + 25/75 when
  the nail is within 0.02/0.01 of its goal; relocate +1 and `-0.5 |palm - target| - 0.5 |object - target|`
  once the object is above z 0.04, + 10/20 within 0.1/0.05 of the target; pen
  `-|pos - goal| + orientation similarity` + 10/50 at distance < 0.075 and similarity > 0.9/0.95,
  -5 when the pen is below z 0.075 (pen's dense reward was already D4RL's). gymnasium-robotics'
  own reward stays available as `info["gymnasium_reward"]`.
- Termination: **faithful**. D4RL's pen returns done when the pen drops (object z < 0.075); so does
  this env (`terminated`). Door, hammer and relocate never terminate; the time limit (pen 100, others
  200, D4RL's registrations) is added by `gymnasium.make`.
- Success: **faithful**. `info["goal_achieved"]` is D4RL's per-step flag (door hinge >= 1.35 rad;
  hammer nail within 0.01 of its goal; relocate object within 0.1 of the target; pen distance < 0.075
  and similarity > 0.95) and `info["episode_success"]` D4RL's `evaluate_success` criterion so far
  (more than 25 goal-achieved steps, pen 20).
- Start states: **faithful in distribution**. Same initial joint state and the same uniform ranges for
  the door position, nail board height, object/target positions and pen target orientation; the
  random numbers differ from mujoco-py's, so a given seed gives a different start than D4RL's.
- Dynamics: **approximate**. gymnasium-robotics' MJCF models are ports of D4RL's DAPG models (where
  compared, the pen model and the shared assets - solver options, joint/geom defaults, tendons,
  actuators - are the same, except the obsolete `apirate` option), but they run on MuJoCo 3.11
  instead of MuJoCo 2.0 through mujoco-py, and contact-rich hand motion amplifies small differences.
  Measured by replaying the 25 door-human demonstrations (clipped actions, from their recorded start
  states; `python -m tools.door_human`) against the observations and rewards stored with them:
  median |observation deviation| 0.0016 (p99 0.18); the first observation of a demo deviates up to
  0.51 in the arm/wrist joints (the stored first observation is not exactly the recorded start state);
  later deviations reach 1.58 rad on single finger joints and 0.39 rad on the latch/door hinge; the
  door-open flag differs on 47 of 6,729 steps. Per-step rewards: median |difference| 0.0005, but
  0.9 % of steps differ by more than 0.1 (a threshold bonus 2/8/10 paid a step earlier or later).
  Per-episode returns: median |difference| 0.3 %, 19 of 25 within 3 %, worst 12.8 %, 16.2 % and
  37.9 % (demo 15: 700.9 replayed vs 508.3 stored; its door-open flag differs on 23 steps); mean
  796.0 vs 794.1. Returns in this env are therefore close to, not identical with, what D4RL's env
  gives; D4RL's reference scores (common/scores.py) are used as they are.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from common.data import D4RL_DATASETS, domain_of

TASKS = {"pen": "Pen", "door": "Door", "hammer": "Hammer", "relocate": "Relocate"}
DATASETS: list[str] = [n for n in D4RL_DATASETS if domain_of(n) == "adroit"]  # the registry's names
OBS_DIM = {"pen": 45, "door": 39, "hammer": 46, "relocate": 39}
SUCCESS_STEPS = {"pen": 20, "door": 25, "hammer": 25, "relocate": 25}  # D4RL evaluate_success: count > this
PEN_DROP_Z = 0.075


def base_env(task: str, **kwargs) -> gym.Env:
    """The bare gymnasium-robotics env (no TimeLimit, dense reward), for `task` in TASKS."""
    if task == "pen":
        from gymnasium_robotics.envs.adroit_hand.adroit_pen import AdroitHandPenEnv as cls
    elif task == "door":
        from gymnasium_robotics.envs.adroit_hand.adroit_door import AdroitHandDoorEnv as cls
    elif task == "hammer":
        from gymnasium_robotics.envs.adroit_hand.adroit_hammer import AdroitHandHammerEnv as cls
    elif task == "relocate":
        from gymnasium_robotics.envs.adroit_hand.adroit_relocate import AdroitHandRelocateEnv as cls
    else:
        raise ValueError(f"unknown Adroit task {task!r}; known: {sorted(TASKS)}")
    return cls(reward_type="dense", **kwargs)


def d4rl_reward(task: str, env) -> tuple[float, bool]:
    """(reward, goal_achieved) of D4RL's v0 env for the current simulator state of the unwrapped
    gymnasium-robotics env `env` (called after a step)."""
    data = env.data
    if task == "door":
        handle = data.site_xpos[env.handle_site_id]
        palm = data.site_xpos[env.grasp_site_id]
        hinge = float(data.qpos[env.door_hinge_addrs])
        reward = -0.1 * np.linalg.norm(palm - handle) - 0.1 * (hinge - 1.57) ** 2 - 1e-5 * np.sum(data.qvel**2)
        reward += 2.0 * (hinge > 0.2) + 8.0 * (hinge > 1.0) + 10.0 * (hinge > 1.35)
        return float(reward), hinge >= 1.35
    if task == "hammer":
        hammer = data.xpos[env.obj_body_id]
        palm = data.site_xpos[env.S_grasp_site_id]
        tool = data.site_xpos[env.tool_site_id]
        nail = data.site_xpos[env.target_obj_site_id]
        goal = data.site_xpos[env.goal_site_id]
        nail_to_goal = np.linalg.norm(nail - goal)
        reward = -0.1 * np.linalg.norm(palm - hammer) - np.linalg.norm(tool - nail) - 10.0 * nail_to_goal
        reward -= 1e-2 * np.linalg.norm(data.qvel)
        reward += 2.0 * (hammer[2] > 0.04 and tool[2] > 0.04) + 25.0 * (nail_to_goal < 0.02) + 75.0 * (nail_to_goal < 0.01)
        return float(reward), bool(nail_to_goal < 0.01)
    if task == "relocate":
        obj = data.xpos[env.obj_body_id]
        palm = data.site_xpos[env.S_grasp_site_id]
        target = data.site_xpos[env.target_obj_site_id]
        obj_to_target = np.linalg.norm(obj - target)
        reward = -0.1 * np.linalg.norm(palm - obj)
        if obj[2] > 0.04:
            reward += 1.0 - 0.5 * np.linalg.norm(palm - target) - 0.5 * obj_to_target
        reward += 10.0 * (obj_to_target < 0.1) + 20.0 * (obj_to_target < 0.05)
        return float(reward), bool(obj_to_target < 0.1)
    if task == "pen":
        obj = data.xpos[env.obj_body_id]
        goal = data.site_xpos[env.eps_ball_site_id]
        obj_dir = (data.site_xpos[env.obj_t_site_id] - data.site_xpos[env.obj_b_site_id]) / env.pen_length
        goal_dir = (data.site_xpos[env.tar_t_site_id] - data.site_xpos[env.tar_b_site_id]) / env.tar_length
        dist = np.linalg.norm(obj - goal)
        similarity = float(np.dot(obj_dir, goal_dir))
        reward = -dist + similarity + 10.0 * (dist < 0.075 and similarity > 0.9) + 50.0 * (dist < 0.075 and similarity > 0.95)
        reward -= 5.0 * (obj[2] < PEN_DROP_Z)
        return float(reward), bool(dist < 0.075 and similarity > 0.95)
    raise ValueError(f"unknown Adroit task {task!r}")


class D4RLAdroit(gym.Wrapper):
    """D4RL's reward, pen termination and success bookkeeping on a gymnasium-robotics Adroit env."""

    def __init__(self, env: gym.Env, task: str):
        super().__init__(env)
        self.task = task
        self._goal_steps = 0

    def reset(self, **kwargs):
        self._goal_steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, gym_reward, terminated, truncated, info = self.env.step(action)
        u = self.env.unwrapped
        reward, goal_achieved = d4rl_reward(self.task, u)
        if self.task == "pen" and u.data.xpos[u.obj_body_id][2] < PEN_DROP_Z:
            terminated = True
        self._goal_steps += int(goal_achieved)
        info = dict(info, gymnasium_reward=float(gym_reward), goal_achieved=goal_achieved,
                    goal_achieved_steps=self._goal_steps,
                    episode_success=self._goal_steps > SUCCESS_STEPS[self.task])
        return obs, reward, terminated, truncated, info


def task_of(name: str) -> str:
    task = name.split("-")[0]
    if task not in TASKS:
        raise ValueError(f"{name!r} is not an Adroit dataset name; known: {DATASETS}")
    return task


def make(name: str, **kwargs) -> gym.Env:
    """Evaluation env of a D4RL Adroit dataset name (e.g. 'door-human-v1'); also accepts the bare
    task ('door'). kwargs go to the gymnasium-robotics env (e.g. render_mode)."""
    task = task_of(name)
    return D4RLAdroit(base_env(task, **kwargs), task)

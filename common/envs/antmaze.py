"""D4RL AntMaze evaluation envs (`antmaze-{umaze,umaze-diverse,medium-play,medium-diverse,
large-play,large-diverse}-{v0,v2}`) rebuilt on gymnasium-robotics' AntMaze, without `d4rl`, `gym`
or `mujoco_py`.

What D4RL's evaluation env is (read from d4rl/locomotion/{__init__,ant,maze_env,goal_reaching_env,
wrappers}.py and assets/ant.xml): `make_ant_maze_env` = `NormalizedBoxEnv(AntMazeEnv(maze_map=
<U|BIG|HARDEST>_MAZE_TEST, maze_size_scaling=4, reward_type='sparse', eval=True,
non_zero_reset=False[, v2_resets=True for -v2]))`, with gym's TimeLimit of 700 (umaze*) / 1000 steps.

Item by item, what this module does and how close it is:

- Maze layout -- faithful. The maps are D4RL's `*_TEST` maps (umaze: U_MAZE_TEST, medium-*:
  BIG_MAZE_TEST, large-*: HARDEST_MAZE_TEST; wall cells identical to the training maps
  U_MAZE/BIG_MAZE/HARDEST_MAZE), cell size 4, wall height 0.5*4, block geoms as in D4RL. D4RL puts
  the centre of cell (row i, col j) at world (4j - x_r, 4i - y_r) where (x_r, y_r) = (4 j_r, 4 i_r)
  for the reset cell 'r', so the ant starts at (0, 0) and **y grows with the row index**.
  gymnasium-robotics centres the map and puts cell (i, j) at (4(j + 0.5) - 2W, 2H - 4(i + 0.5)), so
  y *decreases* with the row index. We therefore hand gymnasium-robotics the D4RL map with its rows
  in reverse order; after that the two frames differ by a translation only (D4RL xy = simulator xy +
  `offset`; umaze (4, 4), medium (10, 10), large (18, 12)), which is added to the ant's x, y in
  observations and subtracted from goals/states written into the simulator. No reflection is
  involved, so the ant's orientation (quaternion) and all velocities are the same numbers in both
  frames. `tests/test_antmaze.py::test_geometry_matches_d4rl` checks every cell of the three maps
  against the compiled MuJoCo model.
- Observation -- faithful layout: 29-D flat Box = ant qpos[:15] (x, y in D4RL's frame, z,
  quaternion w x y z, 8 hinge angles) followed by qvel[:14], exactly `AntEnv._get_obs` with
  `expose_all_qpos=True` and `eval=True` (no goal appended). float64, as D4RL returns.
- Ant model -- faithful: gymnasium's ant.xml is patched to D4RL's values where they differ:
  timestep 0.02 s (gymnasium: 0.01), motors with gear 1 and ctrlrange [-30, 30] (gymnasium: gear
  150, ctrlrange [-1, 1]), and the default geom's contact softness solimp = (.8, .8, .01) and
  solref = (.02, 1) (gymnasium's file leaves them at MuJoCo's defaults, solimp (.9, .95, .001)); the
  maze blocks inherit that default in D4RL too. frame_skip is 5 in both, so one step is 0.1 s.
  Compiled with the same MuJoCo, our patched ant model and D4RL's own ant.xml have identical physics
  arrays (masses, inertias, joints, damping, armature, friction, margins, solref/solimp, solver
  options); only cameras, colours, textures and names differ (rendering). Our maze envs stepped side
  by side with a model built from D4RL's ant.xml and D4RL's block placement, from the same states
  with the same random actions (wall contacts included), agreed to 3e-7 over 900 steps per maze
  (checked by hand when this was written, against a local copy of D4RL's xml that is not kept in
  this repository; `tests/test_antmaze.py` asserts the parameters above).
- Physics engine -- approximate: MuJoCo 3.x (python `mujoco`) instead of the MuJoCo 2.x behind
  mujoco-py that generated the data. Same model, but the engine's numerics changed between versions,
  so trajectories agree closely, not bit-for-bit. `replay_errors` measures this on a real D4RL file
  (`tests/test_antmaze.py::test_replay_real_d4rl_file`, marked slow; no real file was available when
  this was written, so the size of the difference is not yet measured).
- Actions -- faithful: Box [-1, 1]^8; like D4RL's NormalizedBoxEnv an action a becomes the motor
  torque clip(30 a, -30, 30).
- Start state -- faithful distribution: D4RL's `AntEnv.reset_model` (non_zero_reset=False):
  qpos = qpos0 + U(-0.1, 0.1) on all 15 entries (quaternion left unnormalised, as D4RL does), qvel =
  0.1 N(0, 1) on all 14, with qpos0 = (0, 0, 0.75, 1, 0, ..., 0), i.e. the ant at (0, 0) of D4RL's
  frame. The random numbers come from this env's `np_random` (D4RL used its own seeded RandomState),
  so individual episodes differ, not their distribution.
- Goal -- faithful distribution: D4RL's `MazeEnv.goal_sampler` on the single 'g' cell of the test
  map: centre + U(0, 1) + U(0, 0.5) in x and in y (i.e. the goal lies in [c, c + 1.5]^2), then
  clipped below at 0. Goal cell centres: umaze (0, 8), medium (20, 20), large (32, 24). -v2 samples a
  new goal at every reset (`v2_resets=True`); -v0 samples it once per env, here at the first reset
  (D4RL: at construction, from the global numpy RNG).
- Reward and termination -- faithful: reward 1.0 if the ant's (x, y) is within 0.5 (<=) of the goal
  after the step, else 0.0; the episode terminates on that same condition (D4RL's
  `GoalReachingEnv.step` with eval=True returns done=True). The ant's own "unhealthy" condition does
  not end the episode (D4RL ignores it too). `info['success']` and `info['goal']` are added.
- Time limit -- faithful: 700 / 1000 steps, added by `gymnasium.make(..., max_episode_steps=...)`
  (from `common.data`), not by this module.
"""

from __future__ import annotations

import os
import sys
import tempfile
import xml.etree.ElementTree as ET

import gymnasium as gym
import numpy as np

from common.data import D4RL_DATASETS, domain_of
from gymnasium import spaces

R, G = "r", "g"
MAZE_SCALING = 4.0
GOAL_RADIUS = 0.5  # d4rl GoalReachingEnv.step: reward and done when ||xy - goal|| <= 0.5
ACTION_SCALE = 30.0  # d4rl ant.xml: motor ctrlrange -30 30 (gear 1), reached through NormalizedBoxEnv
TIMESTEP = 0.02  # d4rl ant.xml <option timestep>
FRAME_SKIP = 5  # d4rl AntEnv: mujoco_env.MujocoEnv.__init__(self, file_path, 5)
NQ, NV = 15, 14

# D4RL's test maps (d4rl/locomotion/maze_env.py: U_MAZE_TEST, BIG_MAZE_TEST, HARDEST_MAZE_TEST),
# rows in D4RL's order (row index grows with y in D4RL's world frame).
U_MAZE_TEST = [
    [1, 1, 1, 1, 1],
    [1, R, 0, 0, 1],
    [1, 1, 1, 0, 1],
    [1, G, 0, 0, 1],
    [1, 1, 1, 1, 1],
]
BIG_MAZE_TEST = [
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, R, 0, 1, 1, 0, 0, 1],
    [1, 0, 0, 1, 0, 0, 0, 1],
    [1, 1, 0, 0, 0, 1, 1, 1],
    [1, 0, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 0, 0, 1, 0, 1],
    [1, 0, 0, 0, 1, 0, G, 1],
    [1, 1, 1, 1, 1, 1, 1, 1],
]
HARDEST_MAZE_TEST = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, R, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
    [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
    [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
    [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
    [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
    [1, 0, 0, 1, 0, 0, 0, 1, 0, G, 0, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
]
MAPS = {"umaze": U_MAZE_TEST, "medium": BIG_MAZE_TEST, "large": HARDEST_MAZE_TEST}

DATASETS: list[str] = [n for n in D4RL_DATASETS if domain_of(n) == "antmaze"]  # the registry's names


def parse_name(name: str) -> tuple[str, bool]:
    """'antmaze-medium-play-v2' -> ('medium', v2_resets=True)."""
    if name not in DATASETS:
        raise ValueError(f"unknown AntMaze dataset {name!r}; known: {', '.join(DATASETS)}")
    return name.split("-")[1], name.endswith("-v2")


def find_cell(maze_map, kind) -> tuple[int, int]:
    cells = [(i, j) for i, row in enumerate(maze_map) for j, c in enumerate(row) if c == kind]
    assert len(cells) == 1, (kind, cells)
    return cells[0]


def d4rl_cell_xy(maze_map, i: int, j: int, scaling: float = MAZE_SCALING) -> np.ndarray:
    """Centre of cell (row i, col j) in D4RL's world frame (maze_env.MazeEnv._rowcol_to_xy and the
    block placement there): the reset cell 'r' is at the origin, y grows with the row index."""
    ri, rj = find_cell(maze_map, R)
    return np.array([j * scaling - rj * scaling, i * scaling - ri * scaling])


def _d4rl_ant_xml() -> str:
    """gymnasium's ant.xml with D4RL's physics parameters, written to a temporary file."""
    from gymnasium.envs.mujoco.ant_v5 import AntEnv

    src = os.path.join(os.path.dirname(sys.modules[AntEnv.__module__].__file__), "assets", "ant.xml")
    tree = ET.parse(src)
    tree.find("option").set("timestep", repr(TIMESTEP))
    default_geom = tree.find("default").find("geom")  # D4RL's default geom sets contact softness explicitly
    default_geom.set("solref", ".02 1")
    default_geom.set("solimp", ".8 .8 .01")
    for motor in tree.find("actuator").findall("motor"):
        motor.set("gear", "1")
        motor.set("ctrlrange", f"{-ACTION_SCALE} {ACTION_SCALE}")
        motor.set("ctrllimited", "true")
    fd, path = tempfile.mkstemp(suffix="_d4rl_ant.xml", text=True)
    with os.fdopen(fd, "w") as f:
        tree.write(f, encoding="unicode")
    return path


class D4RLAntMaze(gym.Env):
    """See the module docstring. `offset` maps simulator xy to D4RL xy: d4rl = sim + offset."""

    metadata = {"render_modes": ["human", "rgb_array", "depth_array"], "render_fps": 10}

    def __init__(self, maze: str = "umaze", v2_resets: bool = True, render_mode: str | None = None):
        from gymnasium_robotics.envs.maze.ant_maze_v5 import AntMazeEnv

        self.d4rl_map = MAPS[maze]
        self.v2_resets = v2_resets
        self.render_mode = render_mode
        flipped = [list(row) for row in self.d4rl_map[::-1]]  # gymnasium-robotics: y decreases with the row
        xml = _d4rl_ant_xml()
        try:
            self.maze_env = AntMazeEnv(
                maze_map=flipped, xml_file=xml, reward_type="sparse", continuing_task=True, reset_target=False,
                render_mode=render_mode, frame_skip=FRAME_SKIP, include_cfrc_ext_in_observation=False,
            )
        finally:
            os.remove(xml)
            tmp = getattr(getattr(self, "maze_env", None), "tmp_xml_file_path", None)
            if tmp and os.path.exists(tmp):
                os.remove(tmp)  # the compiled model no longer needs the maze xml gymnasium-robotics wrote
        self.ant = self.maze_env.ant_env
        model = self.ant.model
        assert model.nq == NQ and model.nv == NV and model.nu == 8, (model.nq, model.nv, model.nu)
        assert abs(model.opt.timestep - TIMESTEP) < 1e-12 and self.ant.frame_skip == FRAME_SKIP

        n = len(self.d4rl_map)
        self.reset_cell = find_cell(self.d4rl_map, R)
        self.goal_cell = find_cell(self.d4rl_map, G)
        self._flip = lambda cell: np.array([n - 1 - cell[0], cell[1]])
        sim_reset = self.maze_env.maze.cell_rowcol_to_xy(self._flip(self.reset_cell))
        self.offset = d4rl_cell_xy(self.d4rl_map, *self.reset_cell) - sim_reset
        self.goal_centre = d4rl_cell_xy(self.d4rl_map, *self.goal_cell)
        # D4RL's init_qpos / init_qvel (the model's qpos0: torso at (0, 0, 0.75), upright, joints at 0),
        # with x, y read in D4RL's frame, where the start cell's centre is the origin
        self.init_qpos = model.qpos0.copy()
        assert np.allclose(self.init_qpos[:7], [0, 0, 0.75, 1, 0, 0, 0]) and not self.init_qpos[7:].any()
        self.init_qvel = np.zeros(NV)

        self.action_space = spaces.Box(-1.0, 1.0, shape=(8,), dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(NQ + NV,), dtype=np.float64)
        self.goal: np.ndarray | None = None

    # ------------------------------------------------------------------ D4RL's samplers
    def sample_goal(self) -> np.ndarray:
        """maze_env.MazeEnv.goal_sampler: the 'g' cell's centre + U(0, S/4) + U(0, 1/2) * S/4 per
        axis, clipped below at 0 (S = 4)."""
        rng, s = self.np_random, MAZE_SCALING
        xy = self.goal_centre + rng.uniform(0.0, 0.25 * s, size=2) + rng.uniform(0.0, 0.5, size=2) * 0.25 * s
        return np.maximum(xy, 0.0)

    # ------------------------------------------------------------------ state in D4RL's frame
    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Set the ant's state; qpos has x, y in D4RL's frame."""
        q = np.array(qpos, dtype=np.float64).copy()
        q[:2] -= self.offset
        self.ant.set_state(q, np.asarray(qvel, dtype=np.float64))

    def get_obs(self) -> np.ndarray:
        qpos = self.ant.data.qpos.copy()
        qpos[:2] += self.offset
        return np.concatenate([qpos[:NQ], self.ant.data.qvel[:NV]])

    def _sync_target_site(self) -> None:
        self.maze_env.goal = self.goal - self.offset
        self.maze_env.update_target_site_pos()

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.v2_resets or self.goal is None:
            self.goal = self.sample_goal()
        # gymnasium-robotics resets its simulator (mj_resetData); its own start/goal noise is then
        # overwritten by D4RL's start distribution below
        inner_seed = int(self.np_random.integers(2**31 - 1)) if seed is not None else None
        self.maze_env.reset(seed=inner_seed, options={"goal_cell": self._flip(self.goal_cell),
                                                      "reset_cell": self._flip(self.reset_cell)})
        self._sync_target_site()
        qpos = self.init_qpos + self.np_random.uniform(-0.1, 0.1, size=NQ)  # d4rl AntEnv.reset_model
        qvel = self.init_qvel + 0.1 * self.np_random.standard_normal(NV)
        self.set_state(qpos, qvel)
        return self.get_obs(), {"goal": self.goal.copy()}

    def step(self, action):
        ctrl = np.clip(ACTION_SCALE * np.asarray(action, dtype=np.float64), -ACTION_SCALE, ACTION_SCALE)
        self.ant.do_simulation(ctrl, FRAME_SKIP)
        obs = self.get_obs()
        success = bool(np.linalg.norm(obs[:2] - self.goal) <= GOAL_RADIUS)
        if self.render_mode == "human":
            self.render()
        return obs, float(success), success, False, {"success": success, "goal": self.goal.copy()}

    def render(self):
        return self.ant.render()

    def close(self):
        self.maze_env.close()


def make(name: str, **kwargs) -> gym.Env:
    """The evaluation env of D4RL dataset `name` (see the module docstring)."""
    maze, v2 = parse_name(name)
    return D4RLAntMaze(maze=maze, v2_resets=v2, **kwargs)


def replay_errors(env, qpos: np.ndarray, qvel: np.ndarray, actions: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """For each row k: set the simulator to (qpos[k], qvel[k]) (x, y in D4RL's frame), step
    actions[k] and return |obs - next_obs[k]|, shape (N, 29).

    In D4RL's AntMaze files the observation *is* the full ant state (qpos[:15], qvel[:14]), so the
    state before action k is observations[k][:15], observations[k][15:]. Note that D4RL's
    generate_ant_maze_datasets.py records `infos/qpos`, `infos/qvel` *after* env.step, i.e. they
    hold the state of the *next* observation (infos/qpos[k] ~= observations[k+1][:15] inside an
    episode)."""
    base = env.unwrapped
    if base.goal is None:
        base.reset(seed=0)
    qpos, qvel = np.asarray(qpos, np.float64), np.asarray(qvel, np.float64)
    actions, next_obs = np.asarray(actions, np.float64), np.asarray(next_obs, np.float64)
    errors = np.zeros_like(next_obs)
    for k in range(len(actions)):
        base.set_state(qpos[k], qvel[k])
        obs, *_ = base.step(actions[k])
        errors[k] = np.abs(obs - next_obs[k])
    return errors

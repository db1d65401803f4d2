"""D4RL AntMaze evaluation envs (common/envs/antmaze.py) and the AntMaze v0 time-out fix in common/data.py.

Expected values are D4RL's, read from d4rl/locomotion/maze_env.py (maps, cell placement, goal
sampler), ant.py (reset noise, observation), goal_reaching_env.py (reward, done), wrappers.py
(NormalizedBoxEnv) and assets/ant.xml (timestep, motors)."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import h5py
import mujoco
import numpy as np
import pytest

from common import data
from common.envs import antmaze


# Goal cell centres in D4RL's frame, from d4rl/locomotion/maze_env.py: the 'g' cell of U_MAZE_TEST is
# (row 3, col 1), of BIG_MAZE_TEST (6, 6), of HARDEST_MAZE_TEST (7, 9); the 'r' cell is (1, 1) in all
# three and `_rowcol_to_xy` gives (4 col - 4, 4 row - 4). `goal_sampler` then adds U(0, 1) + U(0, 0.5)
# per axis, so D4RL's eval goal lies in [c, c + 1.5]^2.
D4RL_GOAL_CENTRES = {"umaze": (0.0, 8.0), "medium": (20.0, 20.0), "large": (32.0, 24.0)}
MAZE_OF = {"umaze": "umaze-v2", "medium": "medium-play-v2", "large": "large-diverse-v2"}


def make(name: str, **kwargs) -> gym.Env:
    return gym.make(f"common.envs:{name}", **kwargs)


def rollouts(name: str, n: int, episode_len: int, seed: int = 0, random_starts: bool = False) -> dict[str, np.ndarray]:
    """n rows of random actions in the eval env, in the layout of D4RL's generate_ant_maze_datasets.py:
    `infos/qpos`, `infos/qvel` recorded after the step, sparse reward and terminal relabelled on the
    next observation (relabel_antmaze_rewards.py), a time-out on the last row of each episode.
    random_starts puts each episode's start in a different free cell (as D4RL's multistart data)."""
    env = make(name).unwrapped
    rng = np.random.default_rng(seed)
    free = [(i, j) for i, row in enumerate(env.d4rl_map) for j, c in enumerate(row) if c != 1]
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "infos/goal", "infos/qpos", "infos/qvel")}
    episode = 0
    while len(cols["observations"]) < n:
        obs, _ = env.reset(seed=seed + episode)
        if random_starts:
            qpos = obs[:15].copy()
            qpos[:2] = antmaze.d4rl_cell_xy(env.d4rl_map, *free[(5 * episode + 1) % len(free)])
            env.set_state(qpos, obs[15:])
            obs = env.get_obs()
        for t in range(episode_len):
            a = rng.uniform(-1, 1, 8).astype(np.float32)
            nxt, _, _, _, info = env.step(a)
            hit = float(np.linalg.norm(nxt[:2] - info["goal"]) <= 0.5)
            row = (obs, a, hit, bool(hit), t == episode_len - 1, info["goal"], env.ant.data.qpos.copy(), env.ant.data.qvel.copy())
            for k, v in zip(cols, row):
                cols[k].append(v)
            cols["infos/qpos"][-1][:2] += env.offset
            obs = nxt
            if len(cols["observations"]) == n:
                break
        episode += 1
    return {k: np.asarray(v) for k, v in cols.items()}


# --------------------------------------------------------------------------- 1. observation
def test_observation_is_qpos_qvel_in_d4rl_frame():
    env = make("antmaze-umaze-v2", max_episode_steps=700)
    base = env.unwrapped
    assert env.observation_space.shape == (29,) and env.action_space.shape == (8,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    # D4RL's ant.xml physics: timestep 0.02, frame_skip 5, motors gear 1 with ctrlrange [-30, 30]
    model = base.ant.model
    assert model.opt.timestep == pytest.approx(0.02) and base.ant.frame_skip == 5
    np.testing.assert_allclose(model.actuator_gear[:, 0], 1.0)
    np.testing.assert_allclose(model.actuator_ctrlrange, np.tile([-30.0, 30.0], (8, 1)))
    # ... and its default geom / joint classes (every geom, maze blocks included, inherits them)
    np.testing.assert_allclose(model.geom_solimp[:, :3], np.tile([0.8, 0.8, 0.01], (model.ngeom, 1)))
    np.testing.assert_allclose(model.geom_solref, np.tile([0.02, 1.0], (model.ngeom, 1)))
    np.testing.assert_allclose(model.geom_friction, np.tile([1.0, 0.5, 0.5], (model.ngeom, 1)))
    np.testing.assert_allclose(model.geom_margin, 0.01)
    np.testing.assert_allclose(model.dof_damping[6:], 1.0)
    np.testing.assert_allclose(model.dof_armature[6:], 1.0)
    np.testing.assert_allclose(np.rad2deg(model.jnt_range[1:]), [[-30, 30], [30, 70], [-30, 30], [-70, -30], [-30, 30], [-70, -30], [-30, 30], [30, 70]])
    assert model.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    starts = []
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        d = base.ant.data
        np.testing.assert_allclose(obs, np.concatenate([d.qpos[:15] + np.r_[base.offset, np.zeros(13)], d.qvel[:14]]))
        starts.append(obs)
    starts = np.array(starts)
    # D4RL's reset: qpos0 = (0, 0, 0.75, 1, 0, ..., 0) + U(-0.1, 0.1), qvel = 0.1 N(0, 1)
    qpos0 = np.r_[0.0, 0.0, 0.75, 1.0, np.zeros(11)]
    assert np.abs(starts[:, :15] - qpos0).max() <= 0.1
    assert np.abs(starts[:, :15] - qpos0).max() > 0.08  # the noise is there
    assert 0.05 < starts[:, 15:].std() < 0.15
    # same seed, same start; the observation follows the simulator after steps too
    np.testing.assert_array_equal(env.reset(seed=3)[0], starts[3])
    a = np.linspace(-1, 1, 8)
    for _ in range(5):
        obs, *_ = env.step(a)
    np.testing.assert_allclose(base.ant.data.ctrl, 30 * a)  # NormalizedBoxEnv: torque = 30 a
    np.testing.assert_allclose(obs[:2], base.ant.data.qpos[:2] + base.offset)
    np.testing.assert_allclose(obs[2:15], base.ant.data.qpos[2:15])
    np.testing.assert_allclose(obs[15:], base.ant.data.qvel)


# --------------------------------------------------------------------------- 2. geometry and goals
@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_geometry_matches_d4rl(maze):
    env = make(f"antmaze-{MAZE_OF[maze]}").unwrapped
    d4rl_map = antmaze.MAPS[maze]
    gmaze = env.maze_env.maze
    model = env.ant.model
    walls = 0
    for i, row in enumerate(d4rl_map):
        for j, cell in enumerate(row):
            # D4RL's formula (maze_env.py): block/cell (i, j) centred at (4 j - x_r, 4 i - y_r)
            ri, rj = antmaze.find_cell(d4rl_map, "r")
            d4rl_xy = np.array([4.0 * j - 4.0 * rj, 4.0 * i - 4.0 * ri])
            sim_xy = d4rl_xy - env.offset
            gi, gj = gmaze.cell_xy_to_rowcol(sim_xy)
            np.testing.assert_allclose(gmaze.cell_rowcol_to_xy(np.array([gi, gj])), sim_xy, atol=1e-9)
            assert (gmaze.maze_map[gi][gj] == 1) == (cell == 1), (i, j)
            if cell == 1:  # the compiled MuJoCo model has the wall block exactly there
                walls += 1
                np.testing.assert_allclose(model.geom(f"block_{gi}_{gj}").pos[:2], sim_xy, atol=1e-9)
                np.testing.assert_allclose(model.geom(f"block_{gi}_{gj}").size, [2.0, 2.0, 1.0])
    assert sum(name.startswith("block_") for name in (model.geom(k).name for k in range(model.ngeom))) == walls
    # the goal: D4RL's eval goal distribution around the hard-coded centre
    centre = np.array(D4RL_GOAL_CENTRES[maze])
    np.testing.assert_allclose(env.goal_centre, centre)
    goals = np.array([env.reset(seed=s)[1]["goal"] for s in range(300)])
    assert np.all(goals >= centre) and np.all(goals <= centre + 1.5)
    assert np.all(goals.min(0) < centre + 0.3) and np.all(goals.max(0) > centre + 1.2)
    np.testing.assert_allclose(goals.mean(0), centre + 0.75, atol=0.1)
    np.testing.assert_allclose(env.maze_env.goal, goals[-1] - env.offset)  # the target site follows


def test_v0_goal_fixed_per_env_v2_goal_per_episode():
    v0, v2 = make("antmaze-umaze-v0").unwrapped, make("antmaze-umaze-v2").unwrapped
    g0 = [v0.reset(seed=s)[1]["goal"] for s in range(3)]
    g2 = [v2.reset(seed=s)[1]["goal"] for s in range(3)]
    assert np.all(g0[0] == g0[1]) and np.all(g0[0] == g0[2])
    assert not np.allclose(g2[0], g2[1])


# --------------------------------------------------------------------------- 3. reward and termination
@pytest.mark.parametrize("name", ["antmaze-umaze-v2", "antmaze-large-play-v0"])
def test_reward_and_termination_at_goal(name):
    env = make(name, max_episode_steps=1000)
    base = env.unwrapped
    # an ant at rest (joints inside their limits, as D4RL's custom init_qpos) barely moves in one step
    rest = np.r_[0.0, 0.0, 0.6, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0]
    for dx, expect in [(0.0, 1.0), (0.3, 1.0), (0.47, 1.0), (0.49, 1.0), (0.51, 0.0), (0.53, 0.0), (2.0, 0.0), (None, 0.0)]:
        env.reset(seed=0)
        base.goal = base.goal_centre.copy()  # the centre of the goal cell, so the ant fits anywhere near it
        qpos = rest.copy()
        qpos[:2] = base.goal + np.array([dx, 0.0]) if dx is not None else 0.0  # teleport (None: D4RL start)
        base.set_state(qpos, np.zeros(14))
        nxt, r, terminated, truncated, step_info = env.step(np.zeros(8))
        dist = np.linalg.norm(nxt[:2] - base.goal)
        assert abs(dist - (dx if dx is not None else np.linalg.norm(base.goal))) < 0.005  # it stayed put
        assert r == expect and terminated == bool(expect) and not truncated, (dx, dist, r, terminated)
        assert step_info["success"] == bool(expect)
    # no early end without success; the time limit comes from gymnasium.make only
    env = make("antmaze-umaze-v2", max_episode_steps=700)
    env.reset(seed=1)
    for t in range(700):
        _, r, terminated, truncated, _ = env.step(np.zeros(8))
        assert r == 0.0 and not terminated
    assert truncated


# --------------------------------------------------------------------------- 4. replay
def test_replay_errors_on_generated_d4rl_file(tmp_path):
    arrays = rollouts("antmaze-medium-play-v2", 120, episode_len=60, random_starts=True)
    path = tmp_path / "gen.hdf5"
    data.write_d4rl_hdf5(path, arrays)
    with h5py.File(path) as f:
        obs, act, tmo = f["observations"][()], f["actions"][()], f["timeouts"][()]
        qpos_after, qvel_after = f["infos/qpos"][()], f["infos/qvel"][()]
    inside = np.nonzero(~tmo[:-1])[0]  # transitions inside an episode
    # D4RL layout: infos/qpos, infos/qvel are the state after the step, i.e. of the next observation
    np.testing.assert_allclose(qpos_after[inside], obs[inside + 1, :15], atol=1e-6)
    np.testing.assert_allclose(qvel_after[inside], obs[inside + 1, 15:], atol=1e-6)
    env = make("antmaze-medium-play-v2")
    err = antmaze.replay_errors(env, obs[inside, :15], obs[inside, 15:], act[inside], obs[inside + 1])
    assert err.shape == (inside.size, 29)
    assert err.max() < 1e-3, err.max()  # the data is float32: only rounding of the start state differs
    # and the check has teeth: other actions do not reproduce the data
    wrong = antmaze.replay_errors(env, obs[inside, :15], obs[inside, 15:], -act[inside], obs[inside + 1])
    assert np.median(wrong.max(1)) > 1e-2


def _real_antmaze_file() -> Path | None:
    root = data.d4rl_dir()
    for name in antmaze.DATASETS:
        file = root / data.D4RL_DATASETS[name][0].split("/")[-1]
        if file.is_file():
            return file
    return None


@pytest.mark.slow
def test_replay_real_d4rl_file():
    """One-step replay of a real D4RL AntMaze file in our env (MuJoCo 3 vs the data's mujoco-py)."""
    file = _real_antmaze_file()
    if file is None:
        pytest.skip(f"no D4RL AntMaze file in {data.d4rl_dir()}")
    with h5py.File(file) as f:
        n = min(5000, f["observations"].shape[0])
        obs, act, tmo = f["observations"][:n], f["actions"][:n], f["timeouts"][:n]
        qpos_after = f["infos/qpos"][:n] if "infos/qpos" in f else None
    xy, v = obs[:, :2].astype(np.float64), obs[:, 15:17].astype(np.float64)
    residual = np.linalg.norm(xy[1:] - xy[:-1] - 0.1 * (v[1:] + v[:-1]) / 2, axis=1)
    inside = np.nonzero(~tmo[:-1] & (residual < 0.5))[0]
    name = next(k for k in antmaze.DATASETS if data.D4RL_DATASETS[k][0].endswith("/" + file.name))
    err = antmaze.replay_errors(make(name), obs[inside, :15], obs[inside, 15:], act[inside], obs[inside + 1])
    per_row = err.max(1)
    if qpos_after is not None:  # generate_ant_maze_datasets.py records infos/qpos after the step
        print(f"|infos/qpos[k] - observations[k+1][:15]| median {np.median(np.abs(qpos_after[inside] - obs[inside + 1, :15])):.2e}, "
              f"|infos/qpos[k] - observations[k][:15]| median {np.median(np.abs(qpos_after[inside] - obs[inside, :15])):.2e}")
    q = np.quantile(per_row, [0.5, 0.9, 0.99])
    print(f"{file.name}: one-step replay max-abs error quantiles 50/90/99% = {q}, xy median {np.median(err[:, :2]):.2e}")
    assert q[0] < 1e-2, q


# --------------------------------------------------------------------------- v0 time-out fix
def test_antmaze_v0_timeout_fix(tmp_path):
    arrays = rollouts("antmaze-medium-play-v2", 300, episode_len=60, random_starts=True)
    true_ends = np.nonzero(arrays["timeouts"])[0]
    assert list(true_ends) == [59, 119, 179, 239, 299]
    shifted = np.zeros(300, bool)
    shifted[true_ends[:-1] + 3] = True  # out of sync, as in the v0 files
    arrays["timeouts"] = shifted
    file = tmp_path / data.D4RL_DATASETS["antmaze-medium-play-v0"][0].split("/")[-1]
    data.write_d4rl_hdf5(file, arrays)

    def teleports(t):
        xy, nxy = t.obs[:, :2], t.next_obs[:, :2]
        return int((np.linalg.norm(nxy - xy - 0.1 * (t.obs[:, 15:17] + t.next_obs[:, 15:17]) / 2, axis=1) > 0.5).sum())

    # without the fix, the 4 inner boundaries are kept as transitions that jump across the maze
    raw = {k: arrays[k] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    assert teleports(data.qlearning_transitions(raw, 1000)) == 4
    for env in ("antmaze-medium-play-v0", str(file)):  # by D4RL name and as a local file
        with pytest.warns(UserWarning, match=r"4 of 300 rows jump to another episode") as rec:
            t, spec = data.load(env, dataset_dir=tmp_path, download=False)
        assert sum("rows jump" in str(w.message) for w in rec) == 1
        assert teleports(t) == 0
        assert t.obs.shape[0] == 300 - 4 - 4 - 1  # real boundaries, stale flags, last row
        assert spec.eval_env_id == "common.envs:antmaze-medium-play-v0"
    # v2 files are left alone (their time-outs are right)
    arrays["timeouts"] = np.isin(np.arange(300), true_ends)
    file2 = tmp_path / data.D4RL_DATASETS["antmaze-medium-play-v2"][0].split("/")[-1]
    data.write_d4rl_hdf5(file2, arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t, _ = data.load("antmaze-medium-play-v2", dataset_dir=tmp_path, download=False)
    assert teleports(t) == 0 and t.obs.shape[0] == 300 - 5


# --------------------------------------------------------------------------- 5. end to end
def test_end_to_end_misa_antmaze_umaze_v2(tmp_path, run_script):
    arrays = rollouts("antmaze-umaze-v2", 400, episode_len=100)
    arrays["rewards"][::37] = 1.0  # a few successes, so the critic sees both reward values
    file = tmp_path / data.D4RL_DATASETS["antmaze-umaze-v2"][0].split("/")[-1]
    assert file.name == "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5"
    data.write_d4rl_hdf5(file, arrays)
    results, _, _ = run_script("misa", "antmaze-umaze-v2", dataset_dir=tmp_path)
    assert results["seeds"] == [0] and len(results["final_per_seed"]) == 1
    assert 0.0 <= results["final_per_seed"][0] <= 100.0
    # the evaluation ran in this env with D4RL's 700-step limit (a random policy never reaches the goal)
    rows = (tmp_path / "run" / "eval.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["update", "seed", "return", "episode_length"]
    assert [r.split(",")[3] for r in rows[1:]] == ["700"]

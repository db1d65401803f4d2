"""D4RL Adroit evaluation envs (common/envs/adroit.py) and the door-human replay (tools/door_human.py).

The replay tests need the original demonstrations, door-human-demos.npz ($DOOR_HUMAN_DEMOS,
or datasets/raw/, see tools.door_human.find_demos); they are skipped, saying so,
when it is absent.
"""

import dataclasses
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest

import common.envs  # noqa: F401  (registers the D4RL names)
from common import data, scores
from tools import door_human
from common.envs import adroit

DEMOS = door_human.find_demos()
needs_demos = pytest.mark.skipif(not DEMOS.is_file(), reason=f"{DEMOS} (the hand_dapg door demos) is not here")


def _id(model, kind, name):
    i = mujoco.mj_name2id(model, kind, name)
    assert i >= 0, name
    return i


def _stepped(name, steps=5, seed=0):
    """An env after a reset and a few random steps, so that velocities and contacts are non-trivial."""
    env = gym.make(name)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape))
    return env, obs


# --------------------------------------------------------------------------- observation layouts
def test_every_d4rl_adroit_name_is_registered_with_its_dimensions():
    assert len(adroit.DATASETS) == 12
    for name in adroit.DATASETS:
        assert data.d4rl_spec_fields(name)["eval_env_id"] == f"common.envs:{name}"
    for task, (obs_dim, act_dim) in {"pen": (45, 24), "door": (39, 28), "hammer": (46, 26), "relocate": (39, 30)}.items():
        env = gym.make(f"{task}-human-v1")
        assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (act_dim,)
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
        assert env.reset(seed=0)[0].shape == (obs_dim,)


def test_door_observation_is_d4rls_layout():
    """D4RL door get_obs: qpos[1:-2], latch, hinge, palm, handle, palm - handle, open flag."""
    env, obs = _stepped("door-human-v1")
    m, d = env.unwrapped.model, env.unwrapped.data
    hinge = d.qpos[m.jnt_qposadr[_id(m, mujoco.mjtObj.mjOBJ_JOINT, "door_hinge")]]
    latch = d.qpos[m.jnt_qposadr[_id(m, mujoco.mjtObj.mjOBJ_JOINT, "latch")]]
    palm = d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")]
    handle = d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "S_handle")]
    expected = np.concatenate([d.qpos[1:-2], [latch, hinge], palm, handle, palm - handle, [1.0 if hinge > 1.0 else -1.0]])
    np.testing.assert_allclose(obs, expected, atol=1e-12)
    assert latch == d.qpos[-1] and m.nq == 30


def test_pen_observation_is_d4rls_layout():
    """D4RL pen get_obs: qpos[:-6], pen pos, pen qvel, pen and target directions, pos and direction errors."""
    env, obs = _stepped("pen-human-v1")
    m, d = env.unwrapped.model, env.unwrapped.data
    site = lambda n: d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, n)]
    unit = lambda v: v / np.linalg.norm(v)
    pen = d.xpos[_id(m, mujoco.mjtObj.mjOBJ_BODY, "Object")]
    pen_dir, goal_dir = unit(site("object_top") - site("object_bottom")), unit(site("target_top") - site("target_bottom"))
    expected = np.concatenate([d.qpos[:-6], pen, d.qvel[-6:], pen_dir, goal_dir, pen - site("eps_ball"), pen_dir - goal_dir])
    np.testing.assert_allclose(obs, expected, atol=1e-6)  # D4RL divides by the length measured at reset


def test_hammer_observation_is_d4rls_layout():
    """D4RL hammer get_obs: qpos[:-6], clipped qvel[-6:], palm, hammer pos, hammer Euler angles, nail, clipped touch."""
    from gymnasium_robotics.utils.rotations import euler2mat

    env, obs = _stepped("hammer-human-v1", steps=10)
    m, d = env.unwrapped.model, env.unwrapped.data
    hammer = _id(m, mujoco.mjtObj.mjOBJ_BODY, "Object")
    touch = d.sensordata[_id(m, mujoco.mjtObj.mjOBJ_SENSOR, "S_nail")]
    expected = np.concatenate([d.qpos[:-6], np.clip(d.qvel[-6:], -1, 1), d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")],
                               d.xpos[hammer], obs[39:42], d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "S_target")],
                               [np.clip(touch, -1, 1)]])
    np.testing.assert_allclose(obs, expected, atol=1e-12)
    # the Euler angles are the hammer's orientation (D4RL's quat2euler convention)
    np.testing.assert_allclose(euler2mat(obs[39:42]), d.xmat[hammer].reshape(3, 3), atol=1e-9)


def test_relocate_observation_is_d4rls_layout():
    """D4RL relocate get_obs: qpos[:-6], palm - ball, palm - target, ball - target."""
    env, obs = _stepped("relocate-human-v1")
    m, d = env.unwrapped.model, env.unwrapped.data
    palm = d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")]
    ball = d.xpos[_id(m, mujoco.mjtObj.mjOBJ_BODY, "Object")]
    target = d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "target")]
    np.testing.assert_allclose(obs, np.concatenate([d.qpos[:-6], palm - ball, palm - target, ball - target]), atol=1e-12)


@pytest.mark.parametrize("task", ["pen", "door", "hammer", "relocate"])
def test_actions_are_rescaled_to_the_actuator_ranges(task):
    """D4RL: clip to [-1, 1], then ctrl = mid + a * half-range of each actuator's control range."""
    env = gym.make(f"{task}-human-v1")
    env.reset(seed=0)
    m, d = env.unwrapped.model, env.unwrapped.data
    a = np.random.default_rng(1).uniform(-1.5, 1.5, env.action_space.shape)
    env.step(a)
    lo, hi = m.actuator_ctrlrange[:, 0], m.actuator_ctrlrange[:, 1]
    np.testing.assert_allclose(d.ctrl, (lo + hi) / 2 + np.clip(a, -1, 1) * (hi - lo) / 2, atol=1e-12)
    wrist = _id(m, mujoco.mjtObj.mjOBJ_ACTUATOR, "A_WRJ1")
    assert m.actuator_gainprm[wrist, 0] == 10 and m.actuator_biasprm[wrist, 1] == -10


# --------------------------------------------------------------------------- reward, termination, success
@pytest.mark.parametrize("task,site,body", [("door", "S_handle", None), ("hammer", None, "Object"), ("relocate", None, "Object"),
                                            ("pen", None, None)])
def test_reward_is_d4rls_not_gymnasium_robotics(task, site, body):
    """gymnasium-robotics >= 1.2.1 has +0.1 |palm - x| where D4RL has -0.1 |palm - x| (door, hammer,
    relocate); pen is unchanged. The env returns D4RL's reward."""
    env = gym.make(f"{task}-human-v1")
    env.reset(seed=3)
    m, d = env.unwrapped.model, env.unwrapped.data
    rng = np.random.default_rng(3)
    for _ in range(5):
        _, reward, _, _, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
        palm = d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")]
        if site is None and body is None:
            assert reward == pytest.approx(info["gymnasium_reward"], abs=1e-12)
            continue
        x = d.site_xpos[_id(m, mujoco.mjtObj.mjOBJ_SITE, site)] if site else d.xpos[_id(m, mujoco.mjtObj.mjOBJ_BODY, body)]
        assert reward == pytest.approx(info["gymnasium_reward"] - 0.2 * np.linalg.norm(palm - x), abs=1e-9)
        assert abs(reward - info["gymnasium_reward"]) > 1e-3


@needs_demos
def test_stored_door_rewards_follow_d4rls_formula():
    """The rewards stored with the demos (D4RL's door reward, computed in the original env) equal
    D4RL's formula evaluated on the next stored observation (up to the velocity term, not observed),
    and not the gymnasium-robotics >= 1.2.1 formula."""
    demo = door_human.load_demos(DEMOS)[0]
    nxt = demo["observations"][1:]
    hinge, dist = nxt[:, 28], np.linalg.norm(nxt[:, 35:38], axis=1)
    rest = -0.1 * (hinge - 1.57) ** 2 + 2.0 * (hinge > 0.2) + 8.0 * (hinge > 1.0) + 10.0 * (hinge > 1.35)
    stored = demo["rewards"][:-1]
    assert np.abs(stored - (rest - 0.1 * dist)).max() < 0.03  # measured 0.023 over all 25 demos
    assert np.abs(stored - (rest + 0.1 * dist)).max() > 0.05


def test_pen_terminates_when_dropped_and_door_never_does():
    env = gym.make("pen-human-v1")
    env.reset(seed=0)
    m, d = env.unwrapped.model, env.unwrapped.data
    _, reward, terminated, _, _ = env.step(np.zeros(24))
    assert not terminated
    # lower the pen below z = 0.075 through whichever of its slide joints points up
    slides = [_id(m, mujoco.mjtObj.mjOBJ_JOINT, n) for n in ("OBJTx", "OBJTy", "OBJTz")]
    up = max(slides, key=lambda j: abs(d.xaxis[j][2]))
    d.qpos[m.jnt_qposadr[up]] -= 0.2 * np.sign(d.xaxis[up][2])
    mujoco.mj_forward(m, d)
    _, reward, terminated, _, _ = env.step(np.zeros(24))
    assert terminated and reward < -4  # D4RL: -5 for a dropped pen, and done

    door = gym.make("door-human-v1", max_episode_steps=200)
    door.reset(seed=0)
    for t in range(200):
        _, _, terminated, truncated, _ = door.step(door.action_space.sample())
        assert not terminated
    assert truncated and t == 199


def test_door_success_needs_more_than_25_open_steps():
    """D4RL evaluate_success: an episode succeeds when the door was open (hinge >= 1.35) on > 25 steps."""
    env = gym.make("door-human-v1")
    env.reset(seed=0)
    m, d = env.unwrapped.model, env.unwrapped.data
    _, _, _, _, info = env.step(np.zeros(28))
    assert not info["goal_achieved"]
    for joint in ("door_hinge", "latch"):
        d.qpos[m.jnt_qposadr[_id(m, mujoco.mjtObj.mjOBJ_JOINT, joint)]] = 1.5
    mujoco.mj_forward(m, d)
    for t in range(27):
        _, reward, _, _, info = env.step(np.zeros(28))
        assert info["goal_achieved"] and info["goal_achieved_steps"] == t + 1
        assert info["episode_success"] == (t + 1 > 25)
        assert reward > 19  # bonuses 2 + 8 + 10 minus small penalties
    env.reset(seed=1)
    assert env.step(np.zeros(28))[4]["goal_achieved_steps"] == 0


# --------------------------------------------------------------------------- door-human replay
COMMITTED = data.OURS_DIR / "ours" / "AdroitHandDoor-v1" / "human.hdf5"


@pytest.fixture(scope="module")
def replayed_file(tmp_path_factory):
    """(path, statistics) of the converter's output for all 25 demos (about 6 s); without the demos,
    the generated file kept with the project, if there is one (statistics None)."""
    if DEMOS.is_file():
        path = tmp_path_factory.mktemp("door") / "human.hdf5"
        return path, door_human.build(path, DEMOS)
    if COMMITTED.is_file():
        return COMMITTED, None
    pytest.skip(f"neither {DEMOS} nor {COMMITTED} is here")


@needs_demos
def test_replay_reproduces_the_stored_demonstrations():
    """First 3 demos, measured: continuous observation dims deviate <= 0.39 at reset (the stored first
    observation is not exactly the recorded start state), median deviation 0.0008-0.0024 over the
    episode, returns within 3.5 % (all 25 demos: median 0.3 %, worst 38 %, where the door opens a few
    steps later than in the original)."""
    demos = door_human.load_demos(DEMOS)[:3]
    arrays, stats = door_human.replay(demos)
    start = 0
    for demo, ep in zip(demos, stats["per_episode"]):
        T = len(demo["actions"])
        dev = np.abs(arrays["observations"][start:start + T] - demo["observations"])[:, :38]
        start += T
        assert dev[0].max() < 0.45
        assert np.median(dev) < 0.01
        assert abs(ep["return_replayed"] - ep["return_stored"]) < 0.05 * abs(ep["return_stored"])
    np.testing.assert_array_equal(arrays["actions"], np.clip(np.concatenate([d["actions"] for d in demos]), -1, 1))


def test_converter_output_loads_with_d4rls_layout(replayed_file):
    import h5py

    path, stats = replayed_file
    with h5py.File(path, "r") as f:
        assert f["observations"].shape == (6729, 39) and f["actions"].shape == (6729, 28)
        assert f["infos/qpos"].shape == (6729, 30) and f["infos/qvel"].shape == (6729, 30)
        assert f["infos/door_body_pos"].shape == (6729, 3)
        assert not f["terminals"][()].any() and f["timeouts"][()].sum() == 25
        assert np.flatnonzero(f["timeouts"][()])[-1] == 6728
        assert "NOT D4RL's file" in f["metadata/source"][()].decode()
    assert stats is None or (stats["episodes"] == 25 and stats["steps"] == 6729)
    transitions, spec = data.load(str(path))
    assert transitions.obs.shape == (6729 - 25, 39)  # time-out transitions (each demo's last) are dropped
    assert not transitions.done.any()
    assert spec.eval_env_id == "common.envs:door-human-v1" and spec.max_episode_steps == 200
    assert (spec.ref_min_score, spec.ref_max_score) == scores.d4rl_reference("door-human-v1")
    committed = COMMITTED
    if committed.is_file() and path != committed:  # the file kept with the project is this same replay
        t2, spec2 = data.load("ours/AdroitHandDoor-v1/human")
        assert t2.obs.shape == transitions.obs.shape and spec2 == dataclasses.replace(spec, name=spec2.name, source="ours")
        np.testing.assert_array_equal(t2.action, transitions.action)
        # contact dynamics amplify last-bit differences between machines, so only the first steps
        # of each demo are compared tightly
        with h5py.File(path, "r") as f, h5py.File(committed, "r") as g:
            starts = np.concatenate([[0], np.flatnonzero(f["timeouts"][()])[:-1] + 1])
            rows = (starts[:, None] + np.arange(20)).ravel()
            np.testing.assert_allclose(g["observations"][()][rows], f["observations"][()][rows], atol=1e-4)


def test_stored_simulator_state_reproduces_the_next_observation(replayed_file):
    """Setting infos/{qpos,qvel,door_body_pos} of row i (float32) and stepping action i gives
    observation i + 1 (measured on every 7th row: median 5e-8, worst 1e-3)."""
    import h5py

    path, _ = replayed_file
    with h5py.File(path, "r") as f:
        obs, act, timeouts = f["observations"][()], f["actions"][()], f["timeouts"][()]
        qpos, qvel, body = f["infos/qpos"][()], f["infos/qvel"][()], f["infos/door_body_pos"][()]
    env = adroit.make("door-human-v1")
    env.reset(seed=0)
    rows = [i for i in range(0, len(obs) - 1, 53) if not timeouts[i]]
    worst = 0.0
    for i in rows:
        env.unwrapped.set_env_state({"qpos": qpos[i].astype(np.float64), "qvel": qvel[i].astype(np.float64),
                                     "door_body_pos": body[i].astype(np.float64)})
        # the joint part of the observation is the stored state itself; the site positions (29:38) of a
        # stored observation are one MuJoCo substep stale (mj_step integrates after computing them),
        # as they were under mujoco-py, so only the joint part is compared here
        np.testing.assert_allclose(env.unwrapped._get_obs()[:29], obs[i, :29], atol=1e-5)
        nxt, *_ = env.step(act[i])
        worst = max(worst, np.abs(nxt - obs[i + 1]).max())
    assert worst < 5e-3


def _first_episodes(src: Path, dst: Path, episodes: int) -> None:
    """The first `episodes` episodes of a D4RL-layout file, metadata included."""
    import h5py

    with h5py.File(src, "r") as f:
        n = int(np.flatnonzero(f["timeouts"][()])[episodes - 1]) + 1
        arrays = {k: f[k][:n] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                         "infos/qpos", "infos/qvel", "infos/door_body_pos")}
        meta = {k: v[()] for k, v in f["metadata"].items()}
    data.write_d4rl_hdf5(dst, arrays, meta)


def test_end_to_end_misa_on_a_small_door_human_file(replayed_file, tmp_path, run_script):
    path = tmp_path / "door2.hdf5"
    _first_episodes(replayed_file[0], path, 2)
    results, _, _ = run_script("misa", str(path))
    assert results["seeds"] == [0] and len(results["final_per_seed"]) == 1
    assert np.isfinite(results["final_mean"])
    evals = (tmp_path / "run" / "eval.csv").read_text().splitlines()
    assert evals[0].split(",")[:4] == ["update", "seed", "return", "episode_length"]
    assert all(row.split(",")[3] == "200" for row in evals[1:])  # D4RL door: 200 steps, no termination

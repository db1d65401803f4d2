import urllib.error

import h5py
import numpy as np
import pytest

from common import data
from common.data import write_d4rl_hdf5
from common.errors import UserError


def reference_qlearning(raw, max_episode_steps):
    """A literal port of d4rl.qlearning_dataset (terminate_on_end=False), using the stored
    next_observations when present (as our loader does)."""
    n = raw["rewards"].shape[0]
    out = {"obs": [], "next_obs": [], "done": []}
    step = 0
    for i in range(n - 1):
        final = raw["timeouts"][i] if "timeouts" in raw else step == max_episode_steps - 1
        if final:
            step = 0
            continue
        if raw["terminals"][i] or final:
            step = 0
        out["obs"].append(raw["observations"][i])
        out["next_obs"].append(raw["next_observations"][i] if "next_observations" in raw else raw["observations"][i + 1])
        out["done"].append(bool(raw["terminals"][i]))
        step += 1
    return {k: np.asarray(v) for k, v in out.items()}


def small_raw(n=10, seed=0):
    rng = np.random.default_rng(seed)
    obs = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    return {
        "observations": obs,
        "actions": rng.uniform(-1, 1, (n, 1)).astype(np.float32),
        "rewards": np.arange(n, dtype=np.float32),
        "next_observations": obs + 100.0,
        "terminals": np.isin(np.arange(n), [3]),
        "timeouts": np.isin(np.arange(n), [7]),
    }


def test_terminals_timeouts_and_next_observations(tmp_path):
    raw = small_raw()
    write_d4rl_hdf5(tmp_path / "a.hdf5", raw)
    t, spec = data.load(str(tmp_path / "a.hdf5"))
    kept = [0, 1, 2, 3, 4, 5, 6, 8]  # row 7 is a time-out, row 9 the last row
    np.testing.assert_array_equal(t.obs[:, 0], kept)
    np.testing.assert_array_equal(t.next_obs[:, 0], np.asarray(kept) + 100.0)  # stored next_observations
    np.testing.assert_array_equal(t.done, [0, 0, 0, 1, 0, 0, 0, 0])  # the time-out is not a terminal
    np.testing.assert_array_equal(t.reward, kept)
    assert t.obs.dtype == np.float32 and t.done.dtype == np.float32
    assert (spec.obs_dim, spec.act_dim, spec.source) == (2, 1, "file")

    del raw["next_observations"]
    write_d4rl_hdf5(tmp_path / "b.hdf5", raw)
    t, _ = data.load(str(tmp_path / "b.hdf5"))
    np.testing.assert_array_equal(t.next_obs[:, 0], np.asarray(kept) + 1.0)  # observations[i + 1]


@pytest.mark.parametrize("with_timeouts,with_next", [(True, True), (True, False), (False, False)])
def test_matches_d4rl_loop_on_random_flags(with_timeouts, with_next):
    rng = np.random.default_rng(1)
    n = 500
    raw = {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_observations": rng.normal(size=(n, 3)).astype(np.float32),
        "terminals": rng.random(n) < 0.03,
    }
    raw["timeouts"] = (rng.random(n) < 0.03) & ~raw["terminals"]
    if not with_timeouts:
        del raw["timeouts"]
    if not with_next:
        del raw["next_observations"]
    ref = reference_qlearning(raw, max_episode_steps=17)
    t = data.qlearning_transitions(raw, max_episode_steps=17)
    np.testing.assert_array_equal(t.obs, ref["obs"])
    np.testing.assert_array_equal(t.next_obs, ref["next_obs"])
    np.testing.assert_array_equal(t.done, ref["done"])


def test_validation_errors(tmp_path):
    raw = small_raw()
    bad = dict(raw)
    del bad["terminals"]
    write_d4rl_hdf5(tmp_path / "missing.hdf5", bad)
    with pytest.raises(UserError, match=r"missing \['terminals'\]"):
        data.load(str(tmp_path / "missing.hdf5"))

    bad = dict(raw, rewards=raw["rewards"][:-1])
    write_d4rl_hdf5(tmp_path / "shape.hdf5", bad)
    with pytest.raises(UserError, match="'rewards' has 9 rows but 'observations' has 10"):
        data.load(str(tmp_path / "shape.hdf5"))

    bad = dict(raw, observations=raw["observations"].copy())
    bad["observations"][2, 1] = np.nan
    write_d4rl_hdf5(tmp_path / "nan.hdf5", bad)
    with pytest.raises(UserError, match=r"obs has 1 NaN/inf values in 1 rows \(first row 2\)"):
        data.load(str(tmp_path / "nan.hdf5"))

    bad = dict(raw, actions=raw["actions"] * 3.0)
    write_d4rl_hdf5(tmp_path / "range.hdf5", bad)
    with pytest.raises(UserError, match=r"actions must lie in \[-1, 1\]"):
        data.load(str(tmp_path / "range.hdf5"))

    with pytest.raises(UserError, match="Did you mean: hopper-medium-v2"):
        data.load("hopper-medum-v2")
    with pytest.raises(UserError, match="make_dataset --env Hopper-v7"):
        data.load("ours/Hopper-v7/medium")


def test_d4rl_name_reads_local_file(tiny_hopper):
    d4rl_dir, _ = tiny_hopper
    t, spec = data.load("hopper-medium-v2", dataset_dir=d4rl_dir)
    assert spec.source == "d4rl" and spec.eval_env_id == "Hopper-v5" and spec.max_episode_steps == 1000
    assert (spec.ref_min_score, spec.ref_max_score) == (-20.272305, 3234.3)
    assert t.obs.shape[1] == 11 and t.action.shape[1] == 3 and 0 < t.done.sum() < len(t.done)


def test_registry_covers_the_d4rl_suites():
    names = data.D4RL_DATASETS
    for task in ("hopper", "halfcheetah", "walker2d", "ant"):
        for split in ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay"):
            assert f"{task}-{split}-v2" in names
    assert names["hopper-medium-replay-v2"][0].endswith("/gym_mujoco_v2/hopper_medium_replay-v2.hdf5")
    assert names["antmaze-umaze-v2"][0].endswith("/ant_maze_v2/Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5")
    assert names["antmaze-large-diverse-v0"][1] == 1000 and names["antmaze-umaze-v0"][1] == 700
    assert names["pen-human-v1"] == ("http://rail.eecs.berkeley.edu/datasets/offline_rl/hand_dapg_v1/pen-human-v1.hdf5", 100)
    assert names["kitchen-complete-v0"][0].endswith("/kitchen/mini_kitchen_microwave_kettle_light_slider-v0.hdf5")
    assert len(names) == 24 + 12 + 12 + 3


def test_download_is_atomic_and_goes_where_d4rl_puts_it(tmp_path, monkeypatch):
    source = tmp_path / "server" / "hopper_medium-v2.hdf5"
    write_d4rl_hdf5(source, small_raw())
    monkeypatch.setitem(data.D4RL_DATASETS, "hopper-medium-v2", (source.as_uri(), 1000))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    t, _ = data.load("hopper-medium-v2")
    assert (tmp_path / "cache" / "hopper_medium-v2.hdf5").is_file()
    assert not list((tmp_path / "cache").glob("*.part"))
    assert len(t.obs) == 8


def test_unreachable_network_names_url_and_path(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    with pytest.raises(UserError) as e:
        data.load("walker2d-expert-v2", dataset_dir=tmp_path)
    msg = str(e.value)
    assert "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/walker2d_expert-v2.hdf5" in msg
    assert str(tmp_path / "walker2d_expert-v2.hdf5") in msg
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_local_file_metadata_gives_env_and_scores(tiny_hopper, tmp_path):
    _, local = tiny_hopper
    _, spec = data.load(str(local))
    assert spec.eval_env_id == "Hopper-v5" and spec.ref_max_score == pytest.approx(3234.3)
    with h5py.File(local) as f, h5py.File(tmp_path / "bare.hdf5", "w") as g:
        for k in ("observations", "actions", "rewards", "terminals"):
            g[k] = f[k][()]
    _, spec = data.load(str(tmp_path / "bare.hdf5"))
    assert spec.eval_env_id is None and "metadata/env_id" in spec.eval_unsupported


def test_the_domain_comes_from_the_name_id_or_evaluation_env(tiny_hopper, tmp_path):
    d = data.domain_of
    assert d("antmaze-umaze-v0") == d("D4RL/antmaze/umaze-v1") == d("common.envs:antmaze-umaze-v2") == "antmaze"
    assert d("D4RL/door/human-v2") == d("ours/AdroitHandDoor-v1/human") == d("pen-cloned-v1") == "adroit"
    assert d("kitchen-mixed-v0") == d("D4RL/kitchen/complete-v2") == d("FrankaKitchen-v1") == "kitchen"
    assert d("hopper-medium-v2") == d("mujoco/hopper/medium-v0") == d("ours/Hopper-v5/medium") == "locomotion"
    assert d("AntMaze_UMaze-v4") == "antmaze" and d("Ant-v5") == "locomotion"  # the longer name first
    assert d("/data/antmaze/penguin.hdf5") == "locomotion"  # a path's folders and word parts are not the task
    assert d("/data/door-human-v1.hdf5") == "adroit"  # D4RL's file names are
    # load puts it on the spec; a local file's evaluation env wins over its name
    _, local = tiny_hopper
    renamed = tmp_path / "pen-human-v1.hdf5"
    renamed.write_bytes(local.read_bytes())  # annotated env_id Hopper-v5
    assert data.load(str(renamed))[1].domain == "locomotion"
    d4rl_dir, _ = tiny_hopper
    assert data.load("hopper-medium-v2", dataset_dir=d4rl_dir)[1].domain == "locomotion"
    door = tmp_path / "door.hdf5"
    with h5py.File(local) as f:
        arrays = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals")}
    write_d4rl_hdf5(door, arrays, {"env_id": "AdroitHandDoor-v1"})
    assert data.load(str(door))[1].domain == "adroit"


def test_minari_local_dataset(tmp_path, monkeypatch):
    import gymnasium as gym
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = minari.DataCollector(gym.make("Pendulum-v1", max_episode_steps=50))
    env.reset(seed=0)
    for _ in range(2):
        done = False
        while not done:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            done = term or trunc
        env.reset()
    env.create_dataset(dataset_id="test/pendulum/tiny-v0", algorithm_name="random", ref_min_score=-1500.0, ref_max_score=-150.0)
    t, spec = data.load("test/pendulum/tiny-v0", download=False)
    assert t.obs.shape == (100, 3) and t.done.sum() == 0  # time limits are not terminals
    assert np.abs(t.action).max() <= 1.0 and np.abs(t.action).max() > 0.5  # [-2, 2] rescaled to [-1, 1]
    np.testing.assert_array_equal(t.next_obs[:49], t.obs[1:50])
    assert spec.source == "minari" and spec.minari_id == "test/pendulum/tiny-v0" and spec.domain == "locomotion"
    assert (spec.ref_min_score, spec.ref_max_score) == (-1500.0, -150.0)


def test_minari_dict_observations_are_flattened_as_evaluation_sees_them(tmp_path, monkeypatch):
    """Goal-conditioned Minari datasets (AntMaze, Kitchen) store dict observations: the loader's
    flattening must give the same vector that the evaluation env gives for the same state."""
    import gymnasium as gym
    import gymnasium_robotics  # noqa: F401  (registers PointMaze)
    import minari

    from common import evaluation

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = minari.DataCollector(gym.make("PointMaze_UMaze-v3", max_episode_steps=30))
    first, _ = env.reset(seed=0)
    for _ in range(30):
        env.step(env.action_space.sample())
    env.create_dataset(dataset_id="test/pointmaze/tiny-v0", algorithm_name="random")
    t, spec = data.load("test/pointmaze/tiny-v0", download=False)
    assert t.obs.shape == (30, 8)  # achieved_goal 2 + desired_goal 2 + observation 4
    np.testing.assert_allclose(t.obs[0], gym.spaces.flatten(env.observation_space, first), rtol=1e-6)
    eval_env = evaluation.make_env(spec)
    assert eval_env.observation_space.shape == (8,)
    obs, _ = eval_env.reset(seed=0)
    assert obs.shape == (8,)

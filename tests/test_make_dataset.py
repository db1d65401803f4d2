"""The dataset maker on a tiny budget: files that common.data.load reads back with D4RL semantics,
the split definitions, and the stored reference scores."""

import json

import h5py
import numpy as np
import pytest

from algorithms import sac
from common import data, scores
from tools import make_dataset

ENV = "InvertedDoublePendulum-v5"  # true terminations (it falls over) and 1000-step time limits
TINY = dict(env=ENV, sac_steps=400, sac_learning_starts=100, checkpoint_every=100, sac_hidden_dim=32,
            sac_batch_size=32, eval_episodes=2, transitions=500, ref_episodes=5, progress=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    args = make_dataset.Args(**TINY, out_dir=str(root / "ours"), work_dir=str(root / "work"))
    written = make_dataset.main(args)
    return root, args, written


def read(path):
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in ("observations", "actions", "rewards", "next_observations", "terminals",
                                        "timeouts", "infos/action_log_probs", "infos/qpos", "infos/qvel") if k in f}
        meta = {k: v[()] for k, v in f["metadata"].items()}
    return arrays, {k: v.decode() if isinstance(v, bytes) else v for k, v in meta.items()}


def test_every_split_is_written_in_d4rl_layout(made):
    root, args, written = made
    assert set(written) == set(make_dataset.SPLITS)
    for split, path in written.items():
        assert path == root / "ours" / ENV / f"{split}.hdf5"
        arrays, meta = read(path)
        n = len(arrays["rewards"])
        for key in ("observations", "next_observations", "actions", "rewards", "infos/action_log_probs", "infos/qpos", "infos/qvel"):
            assert arrays[key].dtype == np.float32 and len(arrays[key]) == n, key
        assert arrays["terminals"].dtype == bool and arrays["timeouts"].dtype == bool
        assert not (arrays["terminals"] & arrays["timeouts"]).any(), "terminals and timeouts both set"
        assert arrays["terminals"].any(), "InvertedDoublePendulum episodes end in falls"
        assert arrays["terminals"][-1] or arrays["timeouts"][-1], "the last episode must end in a flag"
        assert np.abs(arrays["actions"]).max() <= 1.0
        assert meta["dataset_name"] == f"ours/{ENV}/{split}" and meta["split"] == split
        assert meta["env_id"] == ENV and json.loads(meta["env_kwargs"]) == {}
        assert meta["max_episode_steps"] == 1000 and meta["ref_score_episodes"] == 5
        if split in ("random", "medium", "expert"):
            assert n == args.transitions
        # within an episode, row t + 1 starts where row t ended; qpos is the state *before* the step
        cont = ~(arrays["terminals"] | arrays["timeouts"])[:-1]
        np.testing.assert_array_equal(arrays["next_observations"][:-1][cont], arrays["observations"][1:][cont])
        np.testing.assert_allclose(arrays["infos/qpos"][:, 0], arrays["observations"][:, 0], atol=1e-6)


def test_load_reads_back_with_qlearning_semantics(made):
    root, _, written = made
    for split in make_dataset.SPLITS:
        t, spec = data.load(f"ours/{ENV}/{split}", dataset_dir=root)
        arrays, meta = read(written[split])
        keep = ~arrays["timeouts"]
        keep[-1] = False  # d4rl drops time-out rows and the last row
        np.testing.assert_array_equal(t.obs, arrays["observations"][keep])
        np.testing.assert_array_equal(t.next_obs, arrays["next_observations"][keep])
        np.testing.assert_array_equal(t.done, arrays["terminals"][keep].astype(np.float32))
        assert t.done.sum() == arrays["terminals"][:-1].sum() > 0
        assert spec.source == "ours" and spec.eval_env_id == ENV and spec.max_episode_steps == 1000
        assert spec.ref_min_score == pytest.approx(meta["ref_min_score"])
        assert spec.ref_max_score == pytest.approx(meta["ref_max_score"])


def test_split_definitions(made):
    root, args, written = made
    med, med_meta = read(written["medium"])
    exp, exp_meta = read(written["expert"])
    me, me_meta = read(written["medium-expert"])
    for key in med:  # medium-expert = medium, then expert
        np.testing.assert_array_equal(me[key], np.concatenate([med[key], exp[key]]), err_msg=key)

    work = root / "work" / "sac"
    medium_step = med_meta["policy_step"]
    assert medium_step == med_meta["medium_step"] == me_meta["medium_step"]
    assert exp_meta["policy_step"] == args.sac_steps  # expert = the final policy
    replay, replay_meta = read(written["medium-replay"])
    assert len(replay["rewards"]) == medium_step == replay_meta["policy_step"]
    buffer = make_dataset.d4rl_keys(sac.read_buffer(work, medium_step, seed_index=0))  # all seen up to medium
    for key in buffer:
        if key == "timeouts":
            np.testing.assert_array_equal(replay[key][:-1], buffer[key][:-1])
        else:
            np.testing.assert_array_equal(replay[key], buffer[key], err_msg=key)
    # the medium checkpoint follows the rule on the stored evaluations
    evals = sac.read_evals(work)
    step, _ = make_dataset.select_medium(evals["steps"], evals["returns"][:, 0].mean(1), med_meta["ref_min_score"],
                                         med_meta["ref_max_score"], args.medium_fraction, args.medium_tolerance)
    assert step == medium_step
    # random: uniform actions, whose log-density is -act_dim log 2
    rnd, _ = read(written["random"])
    np.testing.assert_allclose(rnd["infos/action_log_probs"], -np.log(2.0), rtol=1e-6)
    assert med["infos/action_log_probs"].std() > 0  # the medium policy is stochastic


def test_reference_scores_stored_and_used(made):
    root, args, written = made
    cached = json.loads((root / "work" / "reference_scores.json").read_text())
    refs = set()
    for path in written.values():
        _, meta = read(path)
        refs.add((meta["ref_min_score"], meta["ref_max_score"]))
        assert meta["ref_min_score"] == pytest.approx(cached["ref_min_score"])
        assert meta["ref_max_score"] == pytest.approx(cached["ref_max_score"])
    assert len(refs) == 1, "all splits of one env share the reference scores"
    _, spec = data.load(f"ours/{ENV}/medium", dataset_dir=root)
    lo, hi = refs.pop()
    assert scores.normalized(np.array([lo, hi]), spec.ref_min_score, spec.ref_max_score, spec.name) == pytest.approx([0.0, 100.0])


def test_rerun_continues_and_reproduces(made, capsys):
    """Rerunning the same command trains nothing more and writes identical data."""
    root, args, written = made
    before = {s: read(p)[0] for s, p in written.items()}
    make_dataset.main(make_dataset.Args(**{**TINY, "splits": ("medium", "medium-replay")},
                                        out_dir=args.out_dir, work_dir=args.work_dir))
    assert "SAC checkpoint at step 400 of 400" in capsys.readouterr().out
    for split in ("medium", "medium-replay"):
        after, _ = read(written[split])
        for key in after:
            np.testing.assert_array_equal(after[key], before[split][key], err_msg=f"{split}/{key}")


def test_describe_and_select_medium(made):
    root, _, _ = made
    table = make_dataset.describe(root / "ours", ENV)
    for split in make_dataset.SPLITS:
        assert f"ours/{ENV}/{split} |" in table
    steps = np.array([5, 10, 15, 20])
    assert make_dataset.select_medium(steps, np.array([0.0, 25.0, 36.0, 100.0]), 0.0, 100.0, 1 / 3, 0.1)[0] == 10
    step, rule = make_dataset.select_medium(steps, np.array([0.0, 5.0, 90.0, 100.0]), 0.0, 100.0, 1 / 3, 0.1)
    assert step == 10 and "closest" in rule  # 0.05 is the nearest to 1/3
    assert make_dataset.select_medium(steps, np.zeros(4), 0.0, 100.0, 1 / 3, 0.1, forced=15)[0] == 15


def test_non_mujoco_env_has_no_qpos():
    cols = make_dataset.rollout("Pendulum-v1", "{}", 450, seed=0, actor=None, desc="", show=False)
    assert "infos/qpos" not in cols
    assert not cols["terminals"].any() and cols["timeouts"].sum() == 3  # 200-step limit twice, then the cut
    assert np.abs(cols["actions"]).max() <= 1.0  # Pendulum's [-2, 2] is rescaled to [-1, 1]


MAKE_FLAG_CASES = [
    (["--sac-steps", "0"], "--sac-steps must be at least 1"),
    (["--sac-steps", "-100"], "--sac-steps must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (["--checkpoint-every", "-100"], "--checkpoint-every must be at least 1"),
    (["--eval-episodes", "0"], "--eval-episodes must be at least 1"),
    (["--transitions", "1"], "--transitions must be at least 2"),
    (["--medium-fraction", "1"], "--medium-fraction must be in (0, 1)"),
    (["--ref-episodes", "0"], "--ref-episodes must be at least 1"),
    (["--sac-steps", "450"], "--sac-steps (450) must be a multiple of --checkpoint-every (100)"),
    (["--medium-step", "150"], "--medium-step must be a multiple of --checkpoint-every"),
    (["--splits", "medum"], "unknown split 'medum'"),
]


@pytest.mark.parametrize("flags,message", MAKE_FLAG_CASES, ids=[" ".join(f) for f, _ in MAKE_FLAG_CASES])
def test_bad_flags_are_one_message_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    import sys

    from common import runlog

    monkeypatch.setattr(sys, "argv", ["make_dataset.py", "--env", ENV, "--sac-steps", "400", "--checkpoint-every", "100",
                                      "--sac-learning-starts", "100", "--sac-batch-size", "32", *flags,
                                      "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        runlog.cli(make_dataset.main, make_dataset.Args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.startswith("error: invalid arguments") and message in err, err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_the_tools_ranges_sit_beside_its_args():
    from test_runs import numeric_fields

    assert set(make_dataset.RULES) == numeric_fields(make_dataset.Args)
    from tools import evaluate

    assert set(evaluate.RULES) == numeric_fields(evaluate.Args)

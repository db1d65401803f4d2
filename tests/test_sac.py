"""Online SAC (algorithms/sac.py): the tanh-Gaussian density, exact resumption, the kept replay buffer.
InvertedDoublePendulum-v5: a MuJoCo env whose random play ends in true terminations within ~10 steps."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import sac
from common import runlog
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(env="InvertedDoublePendulum-v5", hidden_dim=32, batch_size=32, learning_starts=100, checkpoint_every=100,
            update_every=10, eval_episodes=2, progress=False)


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    actor = sac.Actor(3, 2, 16, key=jax.random.PRNGKey(0))
    obs = jnp.array([0.3, -1.0, 2.0])
    mean, log_std = actor(obs)
    for k in range(5):
        a, logp = sac.sample_action(actor, obs, jax.random.PRNGKey(k))
        u = np.arctanh(np.asarray(a, np.float64))
        m, s = np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64))
        expected = np.sum(-0.5 * ((u - m) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi) - np.log(1 - np.tanh(u) ** 2))
        assert float(logp) == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert np.all(np.abs(np.asarray(sac.deterministic_action(actor, obs))) < 1)


def test_resume_continues_exactly(tmp_path):
    """A run interrupted at a checkpoint and resumed equals an uninterrupted one: buffer, evaluations,
    policies, agents (the MuJoCo physics and the env's random state are restored mid-episode)."""
    full = sac.train(sac.Args(**TINY, total_steps=300, run_dir=str(tmp_path / "full")))
    part = sac.train(sac.Args(**TINY, total_steps=200, run_dir=str(tmp_path / "part")))
    assert sac.checkpoint_step(part) == 200
    sac.train(sac.Args(**TINY, total_steps=300, run_dir=str(part), resume=True))

    a, b = sac.read_buffer(full, 300, seed_index=0), sac.read_buffer(part, 300, seed_index=0)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_allclose(sac.read_evals(full)["returns"], sac.read_evals(part)["returns"], rtol=1e-5)
    leaves = lambda run: jax.tree.leaves(eqx.filter(sac.load_actor(run, 300), eqx.is_array))
    for x, y in zip(leaves(full), leaves(part)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

    with pytest.raises(UserError, match="different settings"):
        sac.train(sac.Args(**{**TINY, "hidden_dim": 64}, total_steps=400, run_dir=str(part), resume=True))
    with pytest.raises(UserError, match="already holds a run"):
        sac.train(sac.Args(**TINY, total_steps=300, run_dir=str(full)))
    (full / sac.host_file_of(300)).unlink()
    with pytest.raises(UserError, match="lacks host_000000300.pkl"):
        sac.train(sac.Args(**TINY, total_steps=400, run_dir=str(full), resume=True))


def test_impossible_resumes_are_one_message(tmp_path, monkeypatch, capsys):
    """No run, another algorithm's run, a run without a checkpoint: one message, exit 2, nothing written."""
    def resume(run_dir):
        monkeypatch.setattr(sys, "argv", ["sac.py", "--env", "Hopper-v5", "--resume", "--run-dir", str(run_dir)])
        with pytest.raises(SystemExit) as e:
            runlog.cli(sac.main, sac.Args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        return err

    assert "nothing to resume" in resume(tmp_path / "absent") and not (tmp_path / "absent").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"algo": "td3_bc", "args": {}}))
    assert "holds a td3_bc run, not a sac one" in resume(other)
    (other / "config.json").write_text(json.dumps({"algo": "sac", "args": {"checkpoint_every": 5000}}))
    assert "stopped before its first checkpoint (at env step 5000)" in resume(other)
    (other / "config.json").write_text(json.dumps({"algo": "sac"}))
    assert "is damaged (it holds no run settings)" in resume(other)
    (other / "config.json").write_text(json.dumps({"algo": "sac", "args": {"seed": 0}}))
    assert "is damaged (it names no checkpoint interval)" in resume(other)
    assert sorted(p.name for p in other.iterdir()) == [".lock", "config.json"]  # the lock file: see common/runlock.py


def test_buffer_keeps_every_transition_with_d4rl_semantics(tmp_path):
    run = sac.train(sac.Args(**TINY, total_steps=300, num_seeds=2,
                             run_dir=str(tmp_path / "idp")))
    buf = sac.read_buffer(run, 300)  # (S, T, ...)
    assert buf["observations"].shape[:2] == (2, 300)
    assert not np.array_equal(buf["actions"][0], buf["actions"][1])  # the two seeds are independent agents
    for i in range(2):
        term, tout = buf["terminals"][i], buf["timeouts"][i]
        assert term.any(), "random play in InvertedDoublePendulum falls over: terminals expected"
        assert not (term & tout).any()
        # within an episode the next row starts where this one ended
        cont = ~(term | tout)[:-1]
        np.testing.assert_array_equal(buf["next_observations"][i][:-1][cont], buf["observations"][i][1:][cont])
        # qpos is recorded before the step: obs[0] of InvertedDoublePendulum is the cart position qpos[0]
        np.testing.assert_allclose(buf["infos/qpos"][i][:, 0], buf["observations"][i][:, 0], atol=1e-6)
        # warm-up steps are uniform: log-density of U[-1, 1] for the 1-D action
        np.testing.assert_allclose(buf["action_log_probs"][i][:100], -math.log(2.0), rtol=1e-6)
        assert np.abs(buf["actions"][i]).max() <= 1.0
    # seed i of a 2-seed run is the 1-seed run with seed + i
    solo = sac.train(sac.Args(**TINY, total_steps=300, seed=1,
                              run_dir=str(tmp_path / "solo")))
    np.testing.assert_allclose(sac.read_buffer(solo, 300, seed_index=0)["actions"], buf["actions"][1], atol=1e-5)


SAC_FLAG_CASES = [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--hidden-dim", "0"], "--hidden-dim must be at least 1"),
    (["--discount", "2"], "--discount must be in [0, 1]"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--total-steps", "0"], "--total-steps must be at least 1"),
    (["--total-steps", "-100"], "--total-steps must be at least 1"),
    (["--update-every", "0"], "--update-every must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (["--eval-episodes", "0"], "--eval-episodes must be at least 1"),
    (["--actor-lr", "nan"], "--actor-lr must be positive"),
    (["--init-alpha", "0"], "--init-alpha must be positive"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--num-seeds", "0"], "--num-seeds must be at least 1"),
    (["--total-steps", "150"], "must be a multiple of --checkpoint-every"),
    (["--env-kwargs", "[1]"], "--env-kwargs must be a JSON object"),
    (["--resume"], "--resume needs --run-dir"),
]


@pytest.mark.parametrize("flags,message", SAC_FLAG_CASES, ids=[" ".join(f) for f, _ in SAC_FLAG_CASES])
def test_bad_flags_are_one_message_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    run_dir = [] if "--resume" in flags else ["--run-dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", ["sac.py", "--env", TINY["env"], "--checkpoint-every", "100", "--update-every", "10",
                                      "--learning-starts", "100", "--batch-size", "32", *flags, *run_dir])
    with pytest.raises(SystemExit) as e:
        runlog.cli(sac.main, sac.Args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.startswith("error: invalid arguments") and message in err, err
    assert not (tmp_path / "run").exists()


def test_several_bad_flags_are_one_message(tmp_path):
    with pytest.raises(UserError) as e:
        sac.check_args(sac.Args(batch_size=0, hidden_dim=0, discount=2, tau=0, total_steps=0, update_every=0,
                                checkpoint_every=0, eval_episodes=0))
    assert str(e.value).count("must be") == 8, e.value


def test_the_nan_stop_names_the_update_and_the_seed(tmp_path, monkeypatch):
    """A non-finite critic loss injected at update 57 of seed 1 (and 58 of seed 0): the run stops after
    that chunk (env step 150: updates 51-60), naming the seed and the update, and the checkpoint."""
    from test_runs import OFFSET, poison

    monkeypatch.setattr(sac, "_COMPILED", {})  # the poisoned program, not a memoised one
    poison(sac, monkeypatch, {1: 57, 0: 58})
    with pytest.raises(UserError) as e:
        sac.train(sac.Args(**TINY, total_steps=300, num_seeds=2, run_dir=str(tmp_path / "run")))
    message = str(e.value)
    assert "non-finite critic_loss for seed 1 at update 57 (env step 150)" in message, message
    assert "the last checkpoint (env step 100)" in message
    assert sac.updates_until(150, sac.Args(**TINY)) == 60 and OFFSET > 300
    assert sac.updates_until(99, sac.Args(**TINY)) == 0


def test_a_seed_beyond_32_bits_trains(tmp_path):
    run = sac.train(sac.Args(**TINY, total_steps=100, seed=2**40, run_dir=str(tmp_path / "big")))
    assert json.loads((run / "checkpoint.json").read_text())["seeds"] == [2**40]


class Crash(Exception):
    pass


def rows(run_dir, name: str) -> list[dict]:
    """A CSV log's rows without its wall-clock column."""
    out = list(csv.DictReader(open(run_dir / f"{name}.csv")))
    for r in out:
        r.pop("steps_per_s", None)
    return out


def test_a_restart_before_the_first_checkpoint_replaces_the_logs(tmp_path, monkeypatch):
    """Killed after logging its first checkpoint's rows but before the checkpoint itself: the --resume
    refusal says "its logs are replaced", and a start again without --resume does replace them."""
    full = sac.train(sac.Args(**TINY, total_steps=200, run_dir=str(tmp_path / "full")))
    d = tmp_path / "run"
    real = runlog.save_checkpoint
    monkeypatch.setattr(runlog, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        sac.train(sac.Args(**TINY, total_steps=200, run_dir=str(d)))
    monkeypatch.setattr(runlog, "save_checkpoint", real)
    assert len(rows(d, "train")) == 1 and not (d / "checkpoint.eqx").exists()
    with pytest.raises(UserError, match="its logs are replaced"):
        sac.train(sac.Args(**TINY, total_steps=200, run_dir=str(d), resume=True))
    sac.train(sac.Args(**TINY, total_steps=200, run_dir=str(d)))
    train = rows(d, "train")
    assert len({(r["update"], r["seed"]) for r in train}) == len(train) == 2  # no duplicate rows
    assert train == rows(full, "train") and rows(d, "eval") == rows(full, "eval")
    assert sorted(p.name for p in (d / "buffer").iterdir()) == sorted(p.name for p in (full / "buffer").iterdir())
    np.testing.assert_array_equal(sac.read_evals(d)["steps"], [100, 200])


def test_a_second_process_on_a_sac_run_directory_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import runlock; "
                               "runlock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(d)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"is in use by another process \\(PID {holder.pid}\\)"):
            sac.train(sac.Args(**TINY, total_steps=100, run_dir=str(d)))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in d.iterdir()) == [".lock"]
    sac.train(sac.Args(**TINY, total_steps=100, run_dir=str(d)))  # the holder is dead: its lock went with it


def test_a_budget_below_the_checkpoint_is_refused(tmp_path):
    d = sac.train(sac.Args(**TINY, total_steps=200, run_dir=str(tmp_path / "run")))
    with pytest.raises(UserError, match="already at step 200 > --total-steps 100"):
        sac.train(sac.Args(**TINY, total_steps=100, run_dir=str(d), resume=True))

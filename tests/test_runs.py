"""What a run guarantees (common/runlog.py), tested on TD3+BC, the cheapest script; every script's main
is the same loop over the same Run.

- A crash at any write point, then the retry a user (or benchmarks/sweep.py) makes, ends with exactly
  the files of an uninterrupted run.
- Every user error ends with one message and exit status 2, before any run directory is made.
- A resume refuses another algorithm, other data, or other settings unless named in --allow-change,
  and a budget below its checkpoint.
- One process per run directory: a second one is refused, naming the holder's PID, and writes nothing;
  a killed holder's lock goes with it.
- The sweep runner owns its trainer: killed alone, it leaves none running, and a re-run resumes.
"""

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import cql, misa, misa_dv, misa_f, sac, td3_bc
from common import runlock, runlog
from common.data import write_d4rl_hdf5

from conftest import children, hopper_rollouts, uncached_env

ROOT = Path(__file__).resolve().parents[1]


def small(run_dir, env, **kw):
    base = dict(env=str(env), num_seeds=2, num_updates=40, eval_every=20, log_every=20, eval_episodes=1,
                hidden_dim=32, batch_size=32, run_dir=str(run_dir))
    return td3_bc.Args(**{**base, **kw})


def run_files(d: Path) -> dict[str, object]:
    """A run directory's contents, comparable across runs: train.csv without its wall-clock column."""
    rows = list(csv.DictReader(io.StringIO((d / "train.csv").read_text())))
    for r in rows:
        r.pop("updates_per_s")
    returns = np.load(d / "returns.npz")
    return {"train": rows, "eval": (d / "eval.csv").read_text(), "checkpoint": (d / "checkpoint.eqx").read_bytes(),
            "returns": (returns["updates"].tolist(), returns["returns"].tolist()),
            "results": json.loads((d / "results.json").read_text()),
            "obs_stats": np.load(d / "obs_stats.npz")["mean"].tolist(),
            "args": {k: v for k, v in json.loads((d / "config.json").read_text())["args"].items()
                     if k not in ("run_dir", "resume")}}


class Crash(Exception):
    pass


# The 13 writes of a 2-chunk run: config.json, returns.npz (empty), obs_stats.npz, train.csv x2, eval.csv,
# returns.npz, checkpoint.eqx (the first chunk), then train.csv, eval.csv, returns.npz, checkpoint.eqx,
# results.json. By default a crash before each kind of write on a fresh start and after the first
# checkpoint (a resume); all 13 with -m slow.
WRITES = 13
DEFAULT_CRASHES = {0, 5, 7, 10, 12}


@pytest.fixture(scope="module")
def uninterrupted(tiny_hopper, tmp_path_factory):
    """The files of the uninterrupted run, and the names of its writes in order."""
    _, local = tiny_hopper
    d, commits = tmp_path_factory.mktemp("uninterrupted") / "run", []
    real_replace = runlog.replace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runlog, "replace", lambda tmp, path: (commits.append(path.name), real_replace(tmp, path)))
        td3_bc.main(small(d, local))
    return run_files(d), commits


@pytest.mark.parametrize("k", [pytest.param(k, marks=() if k in DEFAULT_CRASHES else pytest.mark.slow)
                               for k in range(WRITES)])
def test_a_crash_at_any_write_point_then_a_retry_gives_the_uninterrupted_run(k, uninterrupted, tiny_hopper, tmp_path,
                                                                              monkeypatch):
    _, local = tiny_hopper
    reference, points = uninterrupted
    assert points.count("checkpoint.eqx") == 2 and len(points) == WRITES, points
    name, d, calls = points[k], tmp_path / "run", iter(range(WRITES))
    real_replace = runlog.replace

    def crashing(tmp, path):
        if next(calls) == k:  # the k-th write is written aside but never committed: a kill at that moment
            raise Crash(path.name)
        real_replace(tmp, path)

    monkeypatch.setattr(runlog, "replace", crashing)
    with pytest.raises(Crash):
        td3_bc.main(small(d, local))
    monkeypatch.setattr(runlog, "replace", real_replace)
    td3_bc.main(small(d, local, resume=(d / "checkpoint.eqx").exists()))  # what sweep.py does
    assert run_files(d) == reference, f"crash before committing write {k} ({name})"
    assert not list(d.glob("*.tmp")), f"crash at write {k} ({name}) left temporary files"


def test_a_crash_between_evaluations_loses_only_the_updates_since_the_checkpoint_there(tiny_hopper, tmp_path,
                                                                                     monkeypatch, capsys):
    """--checkpoint-every: a checkpoint between two evaluations is a commit point too. A crash after it
    resumes there (not at the last evaluation), and the retry ends with the files of the uninterrupted run."""
    _, local = tiny_hopper
    flags = dict(num_updates=40, eval_every=40, log_every=10, checkpoint_every=20)  # chunks end at 10, 20, 30, 40
    td3_bc.main(small(tmp_path / "full", local, **flags))
    d, commits, real_replace = tmp_path / "cut", [], runlog.replace

    def crashing(tmp, path):
        if commits.count("checkpoint.eqx") == 1 and path.name == "train.csv":  # the chunk after update 20's checkpoint
            raise Crash(path.name)
        commits.append(path.name)
        real_replace(tmp, path)

    monkeypatch.setattr(runlog, "replace", crashing)
    with pytest.raises(Crash):
        td3_bc.main(small(d, local, **flags))
    monkeypatch.setattr(runlog, "replace", real_replace)
    assert "eval.csv" not in commits and np.load(d / "returns.npz")["updates"].size == 0  # no evaluation yet
    shutil.copytree(d, tmp_path / "other")  # the same crashed run, for the resumes below
    young = Path(shutil.copytree(d, tmp_path / "young"))
    (young / "checkpoint.eqx").unlink()  # as if it had crashed before update 20: the message names that update
    with pytest.raises(runlog.UserError, match=r"stopped before its first checkpoint \(at update 20\)"):
        td3_bc.main(small(young, local, resume=True, **flags))
    capsys.readouterr()
    td3_bc.main(small(d, local, resume=True, **flags))
    assert f"resuming {d} at update 20" in capsys.readouterr().out
    assert run_files(d) == run_files(tmp_path / "full")

    # a budget that ends the run at that checkpoint is refused (a run ends with an evaluation)
    d = tmp_path / "other"
    with pytest.raises(runlog.UserError, match="not at an evaluation"):
        td3_bc.main(small(d, local, **{**flags, "num_updates": 20}, resume=True, allow_change=["num-updates"]))
    # a resume with another --eval-every that dies writing its first checkpoint (at 30, now an evaluation), just
    # after config.json, leaves the new settings beside the checkpoint at 20: the next resume still knows that
    # checkpoint was not at an evaluation (with --eval-every 10 it would have been)
    change = dict(flags, eval_every=10, resume=True, allow_change=["eval-every"])
    monkeypatch.setattr(runlog, "replace", lambda tmp, path: crash_at(path, "checkpoint.eqx") or real_replace(tmp, path))
    with pytest.raises(Crash):
        td3_bc.main(small(d, local, **change))
    monkeypatch.setattr(runlog, "replace", real_replace)
    assert json.loads((d / "config.json").read_text())["args"]["eval_every"] == 10
    td3_bc.main(small(d, local, **change))
    assert np.load(d / "returns.npz")["updates"].tolist() == [30, 40]


def test_the_first_checkpoint_is_the_earliest_of_an_evaluation_a_checkpoint_and_the_end():
    assert runlog.first_checkpoint({"eval_every": 10000, "checkpoint_every": None, "num_updates": 5000}) == 5000
    assert runlog.first_checkpoint({"eval_every": 40, "checkpoint_every": 20, "num_updates": 40}) == 20
    assert runlog.first_checkpoint({"eval_every": 20, "checkpoint_every": None, "num_updates": 40}) == 20
    assert runlog.first_checkpoint({"checkpoint_every": 5000, "total_steps": 100000}) == 5000  # sac
    assert runlog.first_checkpoint({"seed": 0}) is None


def crash_at(path: Path, name: str) -> None:
    if path.name == name:
        raise Crash(name)


def test_seed_i_of_a_multi_seed_run_starts_as_the_single_seed_run(tiny_hopper, tmp_path):
    """The documented guarantee: identical initial parameters, keys and minibatches, so the first
    chunk agrees to float rounding (XLA's vmapped matmuls may sum in another order)."""
    _, local = tiny_hopper
    td3_bc.main(small(tmp_path / "two", local, num_updates=10, eval_every=10, log_every=10))
    td3_bc.main(small(tmp_path / "one", local, num_updates=10, eval_every=10, log_every=10, num_seeds=1, seed=1))
    two = list(csv.DictReader(open(tmp_path / "two" / "train.csv")))
    one = list(csv.DictReader(open(tmp_path / "one" / "train.csv")))
    seed1 = [r for r in two if r["seed"] == "1"]
    for a, b in zip(seed1, one):
        for k in ("critic_loss", "actor_loss", "bc_mse"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-4), k


# --------------------------------------------------------------------------- bad input
def write_bad(path: Path, how: str) -> Path:
    arrays = hopper_rollouts(200)
    meta = {"env_id": "Hopper-v5", "max_episode_steps": 1000}
    if how == "garbage":
        path.write_bytes(b"this is not HDF5\n" * 100)
        return path
    if how == "truncated":
        write_d4rl_hdf5(path, arrays, meta)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    if how == "all_timeouts":  # every row ends an episode by its time limit: qlearning_dataset keeps none
        arrays["timeouts"][:] = True
        arrays["terminals"][:] = False
    elif how == "below_batch":  # 20 rows, fewer transitions than one batch of 32
        arrays = {k: v[:20] for k, v in arrays.items()}
    elif how == "nan":
        arrays["observations"][5, 1] = np.nan
    elif how == "out_of_range":
        arrays["actions"] *= 3.0
    elif how == "misaligned":
        arrays["rewards"] = arrays["rewards"][:-3]
    elif how == "no_terminals":
        del arrays["terminals"]
    elif how == "unknown_env":
        meta = {"env_id": "Hoppper-v5"}
    elif how == "constant_reward":
        arrays["rewards"][:] = 1.0
    write_d4rl_hdf5(path, arrays, meta)
    if how == "group":
        with h5py.File(path, "a") as f:
            obs = f["observations"][()]
            del f["observations"]
            f["observations/joint"] = obs
    return path


FLAG_CASES = [
    (["--actor-lr", "-1"], "--actor-lr must be positive"),
    (["--critic-lr", "nan"], "--critic-lr must be positive"),
    (["--hidden-dim", "0"], "--hidden-dim must be at least 1"),
    (["--discount", "2"], "--discount must be in [0, 1]"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-5"], "--batch-size must be at least 1"),
    (["--num-updates", "0"], "--num-updates must be at least 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    (["--checkpoint-every", "1500"], "--checkpoint-every (1500) must be a multiple of --log-every (1000)"),
    (["--eval-episodes", "0"], "--eval-episodes must be at least 1"),
    (["--policy-delay", "0"], "--policy-delay must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--alpha", "inf"], "--alpha must be at least 0"),
    (["--policy-noise", "-0.1"], "--policy-noise must be at least 0"),
    (["--num-seeds", "0"], "--num-seeds must be at least 1"),
    (["--num-updates", "1001"], "multiples of --policy-delay"),
    (["--resume"], "--resume needs --run-dir"),
    (["--allow-change", "learning-rate"], "--allow-change names no setting"),
]
DATA_CASES = [
    ("hopper-medum-v2", "Did you mean: hopper-medium-v2"),
    ("ours/Hopper-v7/medium", "make_dataset --env Hopper-v7"),
    ("missing.hdf5", "does not exist"),
    ("garbage", "cannot be read as HDF5"),
    ("truncated", "cannot be read as HDF5"),
    ("no_terminals", "missing ['terminals']"),
    ("misaligned", "the arrays must align"),
    ("nan", "NaN/inf values"),
    ("out_of_range", "actions must lie in [-1, 1]"),
    ("group", "is a group of ['joint'], not an array"),
    ("unknown_env", "cannot make its evaluation env 'Hoppper-v5'"),
    ("all_timeouts", "no usable transition: 200 rows read, 0 kept as transitions (d4rl.qlearning_dataset's rules: "
                     "199 time-out row(s) dropped, flagged in 'timeouts'"),
    ("below_batch", "fewer than one batch (--batch-size 32): 20 rows read"),
]


def cli_error(argv: list[str], monkeypatch, capsys, module=td3_bc) -> str:
    """Run the script's command line in this process; assert exit status 2 and return its one message."""
    monkeypatch.setattr(sys, "argv", ["td3_bc.py", *argv])
    with pytest.raises(SystemExit) as e:
        runlog.cli(module.main, module.Args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flags,message", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_bad_flags_are_refused_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    err = cli_error([*flags, "--run-dir", str(tmp_path / "run")] if "--resume" not in flags else flags,
                    monkeypatch, capsys)
    assert message in err and err.startswith("error: invalid arguments")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("env,message", DATA_CASES, ids=[e for e, _ in DATA_CASES])
def test_bad_data_is_refused_before_any_work(env, message, tmp_path, monkeypatch, capsys):
    if not env.startswith(("hopper", "ours", "missing")):
        env = str(write_bad(tmp_path / f"{env}.hdf5", env))
    elif env == "missing.hdf5":
        env = str(tmp_path / env)
    err = cli_error(["--env", env, "--run-dir", str(tmp_path / "run"), "--batch-size", "32"], monkeypatch, capsys)
    assert message in err, err
    assert len(err.strip().splitlines()) <= 3, err  # one message, not a dump
    assert not (tmp_path / "run").exists()


def test_unusable_run_directories(tiny_hopper, tmp_path, monkeypatch, capsys):
    _, local = tiny_hopper
    (tmp_path / "a_file").write_text("")
    err = cli_error(["--env", str(local), "--run-dir", str(tmp_path / "a_file" / "run")], monkeypatch, capsys)
    assert "cannot write to the run directory" in err
    monkeypatch.setattr(runlog.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    err = cli_error(["--env", str(local), "--run-dir", str(tmp_path / "full")], monkeypatch, capsys)
    assert "1 MiB free" in err and "needs about" in err


def test_impossible_resumes(tiny_hopper, tmp_path, monkeypatch, capsys):
    _, local = tiny_hopper
    data = tmp_path / "data.hdf5"
    shutil.copy(local, data)
    env = ["--env", str(data), "--num-seeds", "2", "--num-updates", "20", "--eval-every", "20", "--log-every", "20",
           "--eval-episodes", "1", "--hidden-dim", "32", "--batch-size", "32"]
    d = tmp_path / "run"

    def resume(*more, run_dir=d):
        return cli_error([*env, "--run-dir", str(run_dir), "--resume", *more], monkeypatch, capsys)

    assert "nothing to resume" in resume(run_dir=tmp_path / "absent") and not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    assert "holds no run (no config.json)" in resume(run_dir=tmp_path / "empty")

    monkeypatch.setattr(sys, "argv", ["td3_bc.py", *env, "--run-dir", str(d)])
    runlog.cli(td3_bc.main, td3_bc.Args)
    err = resume("--critic-lr", "1e-4")
    assert "other settings" in err and "--critic-lr 0.0003 -> 0.0001" in err and "--allow-change critic-lr" in err
    assert "cannot change --num-seeds (2 -> 3)" in resume("--num-seeds", "3", "--allow-change", "num-seeds")

    saved = d / "config.json"
    config = json.loads(saved.read_text())
    saved.write_text(json.dumps({**config, "algo": "misa"}))
    assert "holds a misa run, not a td3_bc one: resume it with algorithms/misa.py" in resume()
    saved.write_text(json.dumps(config))

    ckpt = (d / "checkpoint.eqx").read_bytes()
    (d / "checkpoint.eqx").write_bytes(ckpt[: len(ckpt) // 2])
    assert "checkpoint.eqx cannot be read" in resume()
    (d / "checkpoint.eqx").write_bytes(ckpt)
    (d / "returns.npz").rename(d / "returns.bak")
    assert "returns.npz is missing" in resume()
    (d / "returns.bak").rename(d / "returns.npz")

    write_d4rl_hdf5(data, hopper_rollouts(1500, seed=1), {"env_id": "Hopper-v5", "max_episode_steps": 1000})
    assert "is not the one this run was trained on" in resume()  # the same path, other contents
    assert (d / "obs_stats.npz").exists() and json.loads(saved.read_text()) == config  # nothing was touched
    saved.unlink()
    assert "holds no run (no config.json)" in resume()


def test_a_refused_run_prints_no_traceback(tmp_path):
    """The same, as a user sees it: the script itself, one message on stderr, exit status 2."""
    out = subprocess.run([sys.executable, str(ROOT / "algorithms" / "misa_dv.py"), "--hmc-target-accept", "1.5",
                          "--env", "hopper-medum-v2", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: invalid arguments") and "--hmc-target-accept must be in (0, 1)" in out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "algorithms" / "cql.py"), "--env", "hopper-medum-v2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Did you mean: hopper-medium-v2" in out.stderr


# --------------------------------------------------------------------------- declared ranges
SCRIPTS = [td3_bc, cql, misa, misa_dv, misa_f, sac]


def numeric_fields(args_type: type) -> set[str]:
    hints = typing.get_type_hints(args_type)
    return {f.name for f in dataclasses.fields(args_type)
            if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))}


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__.split(".")[-1])
def test_every_numeric_flag_declares_its_range_beside_its_args(module):
    """A flag's range sits next to the flag (RULES after Args): every int and float field has one, RULES names
    no other field, each entry is a range runlog understands, and the defaults are inside their ranges."""
    assert set(module.RULES) == numeric_fields(module.Args)
    for text in module.RULES.values():
        runlog.rule(text)
    runlog.check(module.Args(), module.RULES)
    assert not hasattr(runlog, "FIELD_RULES")


MISA_FLAG_CASES = [
    (["--hmc-step-jitter", "1"], "--hmc-step-jitter must be in [0, 1)"),
    (["--hmc-step-jitter", "-0.1"], "--hmc-step-jitter must be in [0, 1)"),
    (["--hmc-target-accept", "1"], "--hmc-target-accept must be in (0, 1)"),
    (["--hmc-leapfrog", "0"], "--hmc-leapfrog must be at least 1"),
    (["--lagrange-tau", "0"], "--lagrange-tau must be positive"),
    (["--reward-scale", "nan"], "--reward-scale must be a finite number"),
    (["--num-layers", "0"], "--num-layers must be at least 1"),
    (["--hmc-start-widths", "3", "-1"], "each value of --hmc-start-widths must be positive and finite, got 3.0 -1.0"),
    (["--hmc-start-widths", "3", "nan"], "each value of --hmc-start-widths must be positive and finite, got 3.0 nan"),
]


@pytest.mark.parametrize("module", [misa, misa_dv, misa_f], ids=lambda m: m.__name__.split(".")[-1])
@pytest.mark.parametrize("flags,message", MISA_FLAG_CASES, ids=[" ".join(f) for f, _ in MISA_FLAG_CASES])
def test_misa_flags_are_refused_before_any_work(module, flags, message, tmp_path, monkeypatch, capsys):
    err = cli_error([*flags, "--run-dir", str(tmp_path / "run")], monkeypatch, capsys, module)
    assert message in err and err.startswith("error: invalid arguments")
    assert not (tmp_path / "run").exists()


def test_a_misa_run_resumes_with_its_tuple_setting(tiny_hopper, tmp_path, monkeypatch, capsys):
    """config.json saves --hmc-start-widths as a list: a resume with the same value is no change, another
    value is refused by name."""
    _, local = tiny_hopper
    argv = ["--env", str(local), "--num-seeds", "1", "--eval-every", "10", "--log-every", "10", "--eval-episodes", "1",
            "--hidden-dim", "32", "--batch-size", "32", *MISA_TINY, "--run-dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", ["misa.py", *argv, "--num-updates", "10"])
    runlog.cli(misa.main, misa.Args)
    err = cli_error([*argv, "--num-updates", "10", "--resume", "--hmc-start-widths", "3", "10"], monkeypatch, capsys, misa)
    assert "--hmc-start-widths [3.0, 10.0, 30.0] -> [3.0, 10.0]" in err, err
    monkeypatch.setattr(sys, "argv", ["misa.py", *argv, "--num-updates", "20", "--allow-change", "num-updates", "--resume"])
    runlog.cli(misa.main, misa.Args)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["changes"] == [
        {"field": "num_updates", "from": 10, "to": 20, "at_update": 10}]


def test_every_problem_is_in_the_one_message(tmp_path, monkeypatch, capsys):
    err = cli_error(["--batch-size", "0", "--tau", "0", "--discount", "2", "--run-dir", str(tmp_path / "run")],
                    monkeypatch, capsys)
    assert err.count("must be") == 3 and len(err.strip().splitlines()) == 4, err


@pytest.mark.parametrize("module", [cql, misa], ids=["cql", "misa"])
def test_reward_norm_of_constant_rewards_is_refused(module, tmp_path, monkeypatch, capsys):
    """Scaling rewards to [-1, 1] by their range is undefined when every reward is the same: refused, naming
    the reward and the explicit transform to use instead, before any run directory is made."""
    env = str(write_bad(tmp_path / "constant.hdf5", "constant_reward"))
    err = cli_error(["--env", env, "--reward-norm", "True", "--run-dir", str(tmp_path / "run")], monkeypatch, capsys, module)
    assert "every reward of this dataset is 1" in err and "--reward-scale 1 --reward-bias 0" in err, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- seeds of any size
def test_seed_keys_are_prngkeys_and_every_seed_is_its_own():
    ordinary = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1]
    np.testing.assert_array_equal(runlog.seed_keys(ordinary),
                                  jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(
                                      jnp.asarray(ordinary, jnp.uint32)))  # recorded runs keep their keys
    big = [0, 2**32, 2**40, 2**64 - 1, 2**64, 2**64 + 2**32, 2**100]
    raw = {tuple(runlog.seed_key(s)) for s in big}
    assert len(raw) == len(big)  # PRNGKey(2**32) without 64-bit jax is PRNGKey(0); these are all different


@pytest.mark.parametrize("seed,num_seeds", [(2**31 - 1, 2), (2**32, 1), (2**40, 1)])
def test_seeds_near_the_integer_limits_train(seed, num_seeds, tiny_hopper, tmp_path):
    _, local = tiny_hopper
    results = td3_bc.main(small(tmp_path / "run", local, seed=seed, num_seeds=num_seeds, num_updates=10,
                                eval_every=10, log_every=10))
    assert results["seeds"] == [seed + i for i in range(num_seeds)]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["seed"] == seed


# --------------------------------------------------------------------------- memory
def test_too_many_seeds_for_memory_are_refused_with_how_many_fit(tiny_hopper, tmp_path, monkeypatch, capsys):
    _, local = tiny_hopper
    # at full width, a million TD3+BC agents need terabytes: more than any machine's memory
    err = cli_error(["--env", str(local), "--num-seeds", "1000000", "--run-dir", str(tmp_path / "run")],
                    monkeypatch, capsys)
    assert "--num-seeds 1000000 needs at least" in err and "seeds fit at these settings" in err, err
    assert not (tmp_path / "run").exists()
    # the number that fits is the one the estimate allows: with 100 MiB, refused at 1000 seeds, not at 2
    monkeypatch.setattr(runlog, "memory_limit", lambda: (100 << 20, "a 100 MiB test device"))
    err = cli_error(["--env", str(local), "--num-seeds", "1000", "--run-dir", str(tmp_path / "run")], monkeypatch, capsys)
    fit = int(err.split("at most ")[1].split(" seeds")[0])
    assert 2 <= fit < 1000 and "a 100 MiB test device hold 0.1 GiB" in err, err
    runlog.check_memory(*_td3_bc_memory_args(local, fit))  # exactly `fit` seeds pass
    with pytest.raises(runlog.UserError):
        runlog.check_memory(*_td3_bc_memory_args(local, fit + 1))


class FakeGpu:
    platform = "gpu"

    def memory_stats(self):
        return {"bytes_limit": 80 << 30, "bytes_in_use": 1 << 30}


def test_memory_limit_on_gpus_is_their_memory_summed(monkeypatch):
    monkeypatch.setattr(runlog.jax, "local_devices", lambda: [FakeGpu(), FakeGpu()])
    assert runlog.memory_limit() == (160 << 30, "2 GPU device(s)")
    monkeypatch.setattr(FakeGpu, "memory_stats", lambda self: None)  # a backend that does not say: no check
    assert runlog.memory_limit() is None


def _td3_bc_memory_args(local, num_seeds):
    from common import data

    raw, spec = data.load(str(local))
    args = td3_bc.Args()
    init_v, _ = td3_bc.make_train(args, spec.obs_dim, spec.act_dim)
    dataset = td3_bc.Transitions(*(jnp.asarray(x) for x in (raw.obs, raw.action, raw.reward, raw.next_obs, raw.done)))
    return init_v, num_seeds, dataset, td3_bc.activation_bytes(args)


# --------------------------------------------------------------------------- the NaN stop names its update
OFFSET = 10_000  # seed index 1's optimiser step counts start here: how the poisoned update tells the seeds apart


def _count_leaves(opt_state, fn):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(x) if "count" in jax.tree_util.keystr(p) else x, opt_state)


def poison(module, monkeypatch, at: dict[int, int]) -> None:
    """Make `critic_loss` non-finite at update at[i] (1-based, counted over the run) of seed index i. The
    wrapped update reads the updates made so far from the critic optimiser's step count, and each value of
    critic_loss it returns is that of one update, the last ones of the step (TD3+BC: one per update of
    its policy_delay; the others: one)."""
    real_update, real_make_train = module.update, module.make_train

    def update(state, *rest):
        new, metrics = real_update(state, *rest)
        count = next(x for p, x in jax.tree_util.tree_leaves_with_path(new.critic_opt)
                     if "count" in jax.tree_util.keystr(p))  # updates made, after this step
        second = count >= OFFSET
        done = jnp.where(second, count - OFFSET, count)
        m = metrics["critic_loss"]
        updates = done - m.size + jnp.arange(1, m.size + 1)  # the update of each value
        hit = updates == jnp.where(second, at[1], at[0])
        return new, {**metrics, "critic_loss": jnp.where(hit, jnp.nan, m.reshape(-1)).reshape(m.shape)}

    def make_train(*a, **k):
        init, *others = real_make_train(*a, **k)

        def init_offset(keys):
            state = init(keys)
            second = (jnp.arange(keys.shape[0]) == 1).astype(jnp.int32) * OFFSET
            return dataclasses.replace(state, critic_opt=_count_leaves(state.critic_opt, lambda x: x + second))

        return (init_offset, *others)

    monkeypatch.setattr(module, "update", update)
    monkeypatch.setattr(module, "make_train", make_train)


MISA_TINY = ["--num-samples", "4", "--hmc-burnin", "1", "--no-cosine-schedule"]
TINY_FLAGS = {"td3_bc": [], "cql": ["--num-samples", "4"], "misa": MISA_TINY, "misa_dv": MISA_TINY, "misa_f": MISA_TINY}
NAN_CASES = [(td3_bc, {1: 27, 0: 30}), (td3_bc, {1: 28, 0: 29}), (td3_bc, {0: 5, 1: 9}), (cql, {1: 27, 0: 30}),
             (misa, {1: 23, 0: 24}), (misa_dv, {0: 3, 1: 4}), (misa_f, {1: 35, 0: 36})]


@pytest.mark.parametrize("module,at", NAN_CASES, ids=[f"{m.__name__.split('.')[-1]}-{a}" for m, a in NAN_CASES])
def test_the_nan_stop_names_the_update_and_the_seed(module, at, tiny_hopper, tmp_path, monkeypatch, capsys):
    """A non-finite critic loss injected at a known update of one seed: the message names exactly that
    update and seed (TD3+BC: its loop step is policy_delay updates, counted as updates; both positions
    within a step, a first chunk and a later one)."""
    _, local = tiny_hopper
    name = module.__name__.split(".")[-1]
    poison(module, monkeypatch, at)
    i = min(at, key=at.get)
    err = cli_error(["--env", str(local), "--seed", "3", "--num-seeds", "2", "--num-updates", "40", "--eval-every", "20",
                     "--log-every", "20", "--eval-episodes", "1", "--hidden-dim", "32", "--batch-size", "32",
                     *TINY_FLAGS[name], "--run-dir", str(tmp_path / "run")], monkeypatch, capsys, module)
    assert f"non-finite critic_loss for seed {3 + i} at update {at[i]}." in err, err
    assert ("last good checkpoint (update 20)" if at[i] > 20 else "no checkpoint was written yet (the first is at update 20)") in err


# --------------------------------------------------------------------------- hostile resumes (table-driven)
@pytest.fixture(scope="module")
def finished_run(tiny_hopper, tmp_path_factory):
    """A finished 2-seed run of 20 updates (checkpoint at update 20), and the flags that made it."""
    _, local = tiny_hopper
    d = tmp_path_factory.mktemp("finished") / "run"
    args = small(d, local, num_updates=20, eval_every=20, log_every=20)
    td3_bc.main(args)
    return d, argv_of(args)


def argv_of(args) -> list[str]:
    """The command line that gives `args` (td3_bc.Args) back, minus --resume."""
    out = []
    for k, v in dataclasses.asdict(args).items():
        if v != getattr(td3_bc.Args(), k) and k != "resume":
            out += [runlog.flag(k), str(v)]
    return out


@contextlib.contextmanager
def read_only(d: Path):
    """`d` made read-only: chmod for a user; root writes through chmod, so `chattr +i` (immutable) for root,
    or a skip where the file system or the container refuses it."""
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield
        finally:
            d.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        pytest.skip("running as root, and chattr +i is unavailable here: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


RESUME_CASES = [  # (id, extra flags, what is done to the run directory, what the message says)
    ("budget below the checkpoint", ["--allow-change", "num-updates", "--num-updates", "10"], None,
     ["--num-updates 10 is below the checkpoint of the run in", "(update 20)"]),
    ("read-only run directory", [], read_only, ["cannot write to the run directory", "make it writable"]),
]


@pytest.mark.parametrize("flags,damage,messages", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_hostile_resumes_are_one_message_and_change_nothing(flags, damage, messages, finished_run, tmp_path,
                                                            monkeypatch, capsys):
    src, argv = finished_run
    d = tmp_path / "run"
    shutil.copytree(src, d)
    unlocked = lambda: {k: v for k, v in snapshot(d).items() if k != runlock.LOCK_NAME}  # the lock takes its PID
    before = unlocked()
    argv = [a if a != str(src) else str(d) for a in argv]
    with damage(d) if damage else contextlib.nullcontext():
        err = cli_error([*argv, "--resume", *flags], monkeypatch, capsys)
    assert all(m in err for m in messages) and len(err.strip().splitlines()) == 1, err
    assert unlocked() == before  # nothing written


# --------------------------------------------------------------------------- one process per run directory
def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "algorithms" / "td3_bc.py"), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=uncached_env())


def wait_for_lock(d: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `proc` holds d's lock (its PID in d/.lock), then freeze it there (SIGSTOP): the second process
    then meets a live holder, however fast the machine trains."""
    deadline = time.time() + timeout
    while True:
        try:
            if (d / runlock.LOCK_NAME).read_text().split()[:1] == [str(proc.pid)]:
                break
        except OSError:
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first process never took the lock"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)


def snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_and_partial(tiny_hopper, tmp_path_factory):
    """An uninterrupted 40-update run's files, and a run of the same command crashed after its first
    checkpoint (update 20), released by this process as a process's death would release it."""
    _, local = tiny_hopper
    root = tmp_path_factory.mktemp("concurrent")
    td3_bc.main(small(root / "reference", local))
    partial = root / "partial"
    real = runlog.save_checkpoint
    calls = []

    def crash_on_second(run_dir, tree, info=None):
        calls.append(1)
        if len(calls) == 2:
            raise Crash("second checkpoint")
        real(run_dir, tree, info)

    runlog.save_checkpoint = crash_on_second
    try:
        with pytest.raises(Crash):
            td3_bc.main(small(partial, local))
    finally:
        runlog.save_checkpoint = real
        runlock.release(partial)
    return run_files(root / "reference"), partial, local


@pytest.mark.parametrize("first,second", [("fresh", "fresh"), ("resume", "resume"), ("fresh", "resume")])
def test_a_second_process_on_a_run_directory_is_refused(first, second, reference_and_partial, tmp_path):
    reference, partial, local = reference_and_partial
    d = tmp_path / "run"
    if first == "resume":
        shutil.copytree(partial, d)
    argv = argv_of(small(d, local))
    a = start(argv + (["--resume"] if first == "resume" else []))
    try:
        wait_for_lock(d, a)
        before = snapshot(d)
        b = subprocess.run([sys.executable, str(ROOT / "algorithms" / "td3_bc.py"), *argv,
                            *(["--resume"] if second == "resume" else [])], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr
        assert f"is in use by another process (PID {a.pid})" in b.stderr and len(b.stderr.strip().splitlines()) == 1
        assert snapshot(d) == before  # the refused process wrote nothing
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err[-3000:]
    assert run_files(d) == reference  # the survivor's files are an uninterrupted run's


def test_a_killed_holder_does_not_block_a_resume(reference_and_partial, tmp_path):
    reference, partial, local = reference_and_partial
    d = tmp_path / "run"
    shutil.copytree(partial, d)
    argv = argv_of(small(d, local))
    a = start(argv + ["--resume"])
    wait_for_lock(d, a)
    a.kill()  # SIGKILL: no cleanup runs; the kernel releases the lock with the process
    a.communicate()
    b = subprocess.run([sys.executable, str(ROOT / "algorithms" / "td3_bc.py"), *argv, "--resume"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr[-3000:]
    assert run_files(d) == reference


# --------------------------------------------------------------------------- the sweep runner owns its trainer
SWEEP_DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from benchmarks import sweep
sweep.RUNS, sweep.SUMMARIES = Path({runs!r}), Path({summaries!r})
sweep.SWEEPS["tiny"] = sweep.Sweep(**{sweep!r})
sweep.main(sweep.Cli("run", "tiny"))
"""


@pytest.fixture
def tiny_sweep(tiny_hopper, tmp_path, monkeypatch):
    """A one-run sweep (td3_bc, 2000 updates, a checkpoint every 250), defined here and in a driver script
    that runs it as `sweep.py run` does; returns (driver path, run directory, summary path)."""
    from benchmarks import sweep

    _, local = tiny_hopper
    spec = dict(description="td3_bc on a tiny file", datasets=[str(local)], variants={"td3_bc": "td3_bc"}, num_seeds=1,
                num_updates=2000, eval_every=250, log_every=250, common_flags="--hidden-dim 16 --batch-size 16 --eval-episodes 1")
    runs, summaries = tmp_path / "runs", tmp_path / "summaries"
    monkeypatch.setattr(sweep, "RUNS", runs)
    monkeypatch.setattr(sweep, "SUMMARIES", summaries)
    monkeypatch.setitem(sweep.SWEEPS, "tiny", sweep.Sweep(**spec))
    driver = tmp_path / "driver.py"
    driver.write_text(SWEEP_DRIVER.format(root=str(ROOT), runs=str(runs), summaries=str(summaries), sweep=spec))
    return driver, sweep.run_dir("tiny", "td3_bc", str(local)), sweep.summary_path("tiny", "td3_bc", str(local))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_a_killed_sweep_leaves_no_trainer_and_a_rerun_resumes(sig, tiny_sweep, capsys):
    from benchmarks import sweep

    driver, rd, summary = tiny_sweep
    # its own session: when the sweep dies while its trainer is stopped, the kernel hangs up the orphaned
    # process group, which must not be pytest's
    proc = subprocess.Popen([sys.executable, str(driver)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=uncached_env())  # its trainer may be SIGKILLed
    deadline = time.time() + 180
    trainer = None
    while trainer is None or not (rd / "checkpoint.eqx").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        found = [pid for pid, cmd in children(proc.pid) if "algorithms/td3_bc.py" in cmd]
        trainer = found[0] if found else None
        time.sleep(0.01)
    os.kill(trainer, signal.SIGSTOP)  # frozen mid-run, after its first checkpoint, however fast it trains
    assert not (rd / "results.json").exists()
    os.kill(proc.pid, sig)  # the sweep process alone
    os.kill(trainer, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 128 + sig), err[-3000:]
    if sig != signal.SIGKILL:
        assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in err, err[-3000:]
    deadline = time.time() + 60
    while alive(trainer):  # SIGKILL: the kernel kills it (PR_SET_PDEATHSIG); else the sweep waited for it
        assert time.time() < deadline, f"the trainer {trainer} outlived the sweep"
        time.sleep(0.05)
    assert not (rd / "results.json").exists()

    capsys.readouterr()
    assert sweep.run("tiny") == []
    starts = [line for line in capsys.readouterr().out.splitlines() if "python" in line]
    assert len(starts) == 1 and starts[0].endswith("--resume"), starts
    s = json.loads(summary.read_text())
    assert s["curve"]["updates"] == list(range(250, 2001, 250)) and math.isfinite(s["wall_time_s"])
    rows = [(r["update"], r["seed"]) for r in csv.DictReader(open(rd / "train.csv"))]
    assert len(rows) == len(set(rows)) == 9  # no duplicate rows (the first chunk ends at update 10)


def test_a_sweep_never_starts_a_run_whose_directory_is_in_use(tiny_sweep, capsys):
    from benchmarks import sweep

    _, rd, summary = tiny_sweep
    rd.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import runlock; "
                               "runlock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(rd)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        left = sweep.run("tiny")
    finally:
        holder.kill()
        holder.wait()
    assert len(left) == 1 and f"PID {holder.pid}" in left[0]
    assert f"skipped, its run directory" in capsys.readouterr().out and not summary.exists()
    assert sorted(p.name for p in rd.iterdir()) == [".lock"]  # nothing started there


def test_wall_time_is_a_number(tmp_path):
    from benchmarks import sweep

    (tmp_path / "train.csv").write_text("update,seed,loss,updates_per_s\n250,0,1,100\n250,1,1,100\n"
                                        "500,0,1,50\n500,1,1,50\n")
    assert sweep.wall_time(tmp_path) == (7.5, "train.csv (training chunks only)")  # 250/100 + 250/50
    (tmp_path / "wall_time.json").write_text('{"seconds": NaN}')
    assert sweep.wall_time(tmp_path)[0] == 7.5
    (tmp_path / "wall_time.json").write_text('{"seconds": 12.5}')
    assert sweep.wall_time(tmp_path) == (12.5, "sweep")


def test_an_extension_is_the_uninterrupted_run_when_the_old_budget_is_on_the_grid(reference_and_partial, tmp_path):
    """README's extension semantics: 20 -> 40 updates (a multiple of --eval-every 20) gives the files of
    the uninterrupted 40-update run; 30 -> 40 keeps the evaluation at 30, off the grid."""
    reference, _, local = reference_and_partial
    for old, evals in [(20, [20, 40]), (30, [20, 30, 40])]:
        d = tmp_path / f"from{old}"
        td3_bc.main(small(d, local, num_updates=old))
        td3_bc.main(small(d, local, resume=True, allow_change=["num-updates"]))
        files = run_files(d)
        assert files["returns"][0] == evals and files["args"].pop("allow_change") == ["num-updates"]
        assert (files == {**reference, "args": {k: v for k, v in reference["args"].items() if k != "allow_change"}}) \
            == (old == 20)

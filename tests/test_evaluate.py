"""tools.evaluate and tools.agent on tiny trained runs of every algorithm: the checkpoint evaluated
again gives training's scores, its ONNX export acts as JAX does (onnxruntime), it renders to MP4 and
GIF, it loads with only its algorithm file, and each bad input is one message, exit 2, the run untouched."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

from algorithms import sac
from common import runlog
from conftest import ROOT, TINY, TINY_ALGO
from tools import evaluate
from tools.agent import load_agent, load_agents

# subprocesses (the command as a user runs it) start after this process's JAX: exec follows the fork at once
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
OFFLINE = ["td3_bc", "cql", "misa", "misa_dv", "misa_f"]
# the settings of the other files' end-to-end runs (test_misa, test_cql, test_runs): the same compiled
# programs, so that the suite's persistent XLA cache compiles each once
SMALL = dict(num_seeds=2, num_updates=40, log_every=20, eval_episodes=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hopper):
    """{algo: run directory}: a tiny run of each offline algorithm (conftest's TINY sizes, trained as a
    user does, all five at once) and of sac, on the annotated tiny Hopper file."""
    _, local = tiny_hopper
    root = tmp_path_factory.mktemp("runs")
    jobs = {}
    for algo in OFFLINE:
        options = {**TINY, **TINY_ALGO[algo], **SMALL, "run_dir": root / algo}
        cmd = [sys.executable, str(ROOT / "algorithms" / f"{algo}.py"), "--env", str(local)]
        cmd += [x for k, v in options.items() for x in (runlog.flag(k), str(v))]
        jobs[algo] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dirs = {"sac": sac.train(sac.Args(env="InvertedDoublePendulum-v5", hidden_dim=32, batch_size=32, learning_starts=100,
                                      checkpoint_every=100, update_every=10, eval_episodes=2, total_steps=200,
                                      num_seeds=2, progress=False, run_dir=str(root / "sac")))}
    for algo, job in jobs.items():
        _, err = job.communicate(timeout=900)
        assert job.returncode == 0, err[-3000:]
        dirs[algo] = root / algo
    return dirs


def snapshot(d: Path) -> dict[str, str]:
    """Every file under d with the sha256 of its bytes."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def command(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m tools.evaluate, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tools.evaluate", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("algo", OFFLINE + ["sac"])
def test_evaluating_again_gives_trainings_scores_and_onnx_acts_as_jax(algo, runs, tmp_path):
    import onnxruntime

    d = runs[algo]
    before = snapshot(d)
    written = evaluate.main(evaluate.Args(run_dir=str(d)))["evaluation"]
    assert written.parent == d / "evaluations"
    assert {k: v for k, v in snapshot(d).items() if not k.startswith("evaluations/")} == before  # training's files untouched
    again = np.load(written)
    if algo == "sac":
        trained = np.load(d / "evals.npz")
        np.testing.assert_array_equal(again["lengths"], trained["lengths"][-1])
    else:
        trained = np.load(d / "returns.npz")
        results = json.loads((d / "results.json").read_text())
        np.testing.assert_allclose(again["scores"].mean(1), results["final_per_seed"], rtol=1e-6)
    np.testing.assert_allclose(again["returns"], trained["returns"][-1], rtol=1e-6)
    assert list(again["seeds"]) == [0, 1] and again["returns"].shape[1] == (2 if algo == "sac" else SMALL["eval_episodes"])

    path = evaluate.main(evaluate.Args(run_dir=str(d), export=str(tmp_path / "policy.onnx")))["export"]
    agent = load_agent(d, seed=0)
    rng = np.random.default_rng(1)
    obs = (rng.standard_normal((1000, agent.agents.obs_dim)) * 2).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actions = session.run(None, {"obs": obs})[0]
    assert actions.shape == (1000, agent.agents.act_dim)
    np.testing.assert_allclose(actions, agent.act(obs), atol=1e-5, rtol=0)
    np.testing.assert_allclose(agent.act(obs[7]), actions[7], atol=1e-5, rtol=0)  # one observation


def test_seeds_and_episodes_pick_agents_and_start_states(runs):
    """--seeds 1 is agent 1 alone, on the start states training gave it; --episodes 3 adds two more."""
    d = runs["td3_bc"]
    trained = np.load(d / "returns.npz")["returns"][-1]
    one = np.load(evaluate.main(evaluate.Args(run_dir=str(d), seeds=[1], episodes=3))["evaluation"])
    assert list(one["seeds"]) == [1] and one["returns"].shape == (1, 3)
    np.testing.assert_allclose(one["returns"][0, :1], trained[1], rtol=1e-5)
    assert len(set(one["returns"][0].round(6))) == 3  # other start states


def test_video_mp4_and_gif(runs, tmp_path, monkeypatch):
    d = runs["td3_bc"]
    out = command(d, "--video", tmp_path / "hopper.mp4", "--video-size", 64, 48, "--video-steps", 12, "--seeds", 0)
    assert out.returncode == 0, out.stderr[-3000:]
    frames = iio.imread(tmp_path / "hopper.mp4")
    assert frames.shape[1:] == (48, 64, 3) and 2 <= len(frames) <= 4  # the reset frame, then one per 5 steps
    assert frames.std() > 1  # a picture, not a blank

    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))  # in this process too, without a display
    evaluate.main(evaluate.Args(run_dir=str(d), video=str(tmp_path / "hopper.gif"), video_size=(32, 32), video_steps=5))
    gif = iio.imread(tmp_path / "hopper.gif")
    assert gif.shape[0] == 2 * 2 and gif.shape[1:3] == (32, 32)  # two agents, one after the other
    assert iio.immeta(tmp_path / "hopper.gif")["duration"] == 40  # 25 frames per simulated second


def test_loads_with_only_its_algorithm_file(runs, tmp_path):
    """tools/agent.py and one algorithm file, copied alone; this repository unimportable."""
    for name in OFFLINE:
        shutil.copy(ROOT / "algorithms" / f"{name}.py", tmp_path)
    shutil.copy(ROOT / "tools" / "agent.py", tmp_path)
    (tmp_path / "check.py").write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, ".")
        sys.modules["common"] = sys.modules["algorithms"] = sys.modules["tools"] = None
        import json, numpy as np
        from agent import load_agent
        obs = np.linspace(-1, 1, 11, dtype=np.float32)
        print(json.dumps({d: load_agent(d).act(obs).tolist() for d in sys.argv[1:]}))
    """))
    out = subprocess.run([sys.executable, "-I", "check.py", *(str(runs[a]) for a in OFFLINE)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    actions = json.loads(out.stdout.splitlines()[-1])
    for algo in OFFLINE:
        expected = load_agent(runs[algo]).act(np.linspace(-1, 1, 11, dtype=np.float32))
        np.testing.assert_allclose(actions[str(runs[algo])], expected, atol=1e-6)


def test_bad_input_is_one_message_and_changes_nothing(runs, tmp_path, monkeypatch, capsys):
    d = runs["td3_bc"]

    def refused(*argv) -> str:
        monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
        with pytest.raises(SystemExit) as e:
            runlog.cli(evaluate.main, evaluate.Args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and err.startswith("error: "), err
        return err

    def copy_of_run(name: str) -> Path:
        return Path(shutil.copytree(d, tmp_path / name, ignore=shutil.ignore_patterns("evaluations")))

    before = snapshot(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a run directory (it has no config.json)" in refused(empty)
    assert "does not exist" in refused(tmp_path / "absent")

    young = copy_of_run("young")
    (young / "checkpoint.eqx").unlink()  # a run before its first evaluation
    young_before = snapshot(young)
    assert "has no checkpoint yet (the first is written after 20 updates" in refused(young)
    assert snapshot(young) == young_before

    changed = tmp_path / "td3_bc_deeper.py"  # the actor gained a hidden layer since the run was trained
    source = (ROOT / "algorithms" / "td3_bc.py").read_text()
    changed.write_text(source.replace("act_dim, hidden, depth=2,", "act_dim, hidden, depth=3,", 1))
    assert "depth=3" in changed.read_text()
    err = refused(d, "--algorithm", changed)
    assert "does not fit" in err and "state.actor.net.layers[2].weight is (2, 32, 32) float32 now, (2, 3, 32)" in err

    moved = copy_of_run("moved")  # its dataset now names an env that this machine cannot make
    config = json.loads((moved / "config.json").read_text())
    data_file = tmp_path / "elsewhere.hdf5"
    shutil.copy(config["args"]["env"], data_file)
    with h5py.File(data_file, "r+") as f:
        del f["metadata/env_id"]
        f["metadata/env_id"] = "NoSuchRobot-v0"
    config["args"]["env"] = str(data_file)
    (moved / "config.json").write_text(json.dumps(config))
    moved_before = snapshot(moved)
    assert "cannot make its evaluation env 'NoSuchRobot-v0'" in refused(moved)
    assert snapshot(moved) == moved_before

    assert "the folder" in refused(d, "--video", tmp_path / "no" / "such" / "folder" / "x.mp4")
    assert "must end in .mp4 or .gif" in refused(d, "--video", tmp_path / "x.avi")
    assert "must end in .onnx" in refused(d, "--export", tmp_path / "x.pt")
    assert "--episodes sets the evaluation" in refused(d, "--episodes", 5, "--export", tmp_path / "x.onnx")
    assert "seed 7: no such agent" in refused(d, "--seeds", 7)
    assert snapshot(d) == before  # nothing of the run changed, no evaluation file added

    # no renderer: GLFW without a display (a fresh process: this one may hold an EGL context)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-m", "tools.evaluate", str(d), "--video", str(tmp_path / "x.gif")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**env, "MUJOCO_GL": "glfw"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: cannot render Hopper-v5 (MUJOCO_GL=glfw") and "apt-get install" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.gif").exists()
    assert snapshot(d) == before


def test_the_sampler_accuracy_on_a_trained_runs_networks(runs, tmp_path, monkeypatch):
    """benchmarks/hmc_accuracy.py --run-dir: the sampler against NUTS on a MISA run's own networks (short
    chains here: the tiny run's target is near the policy), and a run of another algorithm is one message."""
    from benchmarks import hmc_accuracy

    monkeypatch.setattr(hmc_accuracy.reference, "WARMUP", 50)
    monkeypatch.setattr(hmc_accuracy.reference, "DRAWS", 100)
    monkeypatch.setattr(hmc_accuracy, "CARRIED", 3)
    monkeypatch.setattr(hmc_accuracy, "POOLED", 2)
    out = tmp_path / "hmc-run.md"
    hmc_accuracy.main(hmc_accuracy.Config(run_dir=str(runs["misa"]), out=str(out)))
    text = out.read_text()
    assert f"Target: the networks of seed 0 of `{runs['misa']}`" in text and "at update 40" in text, text
    [row] = json.loads(out.with_suffix(".json").read_text())
    assert row["entry"] == "misa" and row["shift"] == "run" and row["spread"] > 0 and 0 < row["acceptance"] <= 1
    bad = subprocess.run([sys.executable, "benchmarks/hmc_accuracy.py", "--run-dir", str(runs["td3_bc"]), "--out",
                          str(tmp_path / "x.md")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "is a td3_bc run" in bad.stderr, bad.stderr
    assert not (tmp_path / "x.md").exists()

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # also reaches the scripts the tests launch
os.environ.setdefault("WANDB_MODE", "disabled")
# one persistent XLA cache for the session (and the scripts it launches): the many short runs here
# compile the same programs again and again, and compiling dominates them on CPU
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"misa-jax-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import gymnasium as gym  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common.data import write_d4rl_hdf5  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def hopper_rollouts(n: int, seed: int = 0, max_steps: int = 60) -> dict[str, np.ndarray]:
    """n transitions of a uniform-random policy in Hopper-v5, D4RL layout; episodes are cut at
    `max_steps` so the data has both terminals (falls) and time-outs."""
    env = gym.make("Hopper-v5")
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    obs, _ = env.reset(seed=seed)
    t = 0
    while len(cols["observations"]) < n:
        a = rng.uniform(-1, 1, 3).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        t += 1
        timeout = (trunc or t == max_steps) and not term
        for k, v in zip(cols, (obs, a, r, nxt, term, timeout)):
            cols[k].append(v)
        obs = nxt
        if term or timeout:
            obs, _ = env.reset()
            t = 0
    return {k: np.asarray(v) for k, v in cols.items()}


@pytest.fixture(scope="session")
def tiny_hopper(tmp_path_factory):
    """(d4rl_dir holding hopper_medium-v2.hdf5, path of an annotated local file), both tiny."""
    root = tmp_path_factory.mktemp("data")
    arrays = hopper_rollouts(1500)
    write_d4rl_hdf5(root / "d4rl" / "hopper_medium-v2.hdf5", arrays)
    local = root / "tiny_hopper.hdf5"
    write_d4rl_hdf5(local, arrays, {"env_id": "Hopper-v5", "env_kwargs": "{}", "max_episode_steps": 1000,
                                    "ref_min_score": -20.272305, "ref_max_score": 3234.3})
    return root / "d4rl", local


# --------------------------------------------------------------------------- end-to-end script runs
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_seeds=1, num_updates=20, eval_every=20, log_every=10, eval_episodes=2, hidden_dim=32, batch_size=32)
TINY_ALGO = {"misa": dict(num_samples=4, hmc_burnin=1), "misa_dv": dict(num_samples=4, hmc_burnin=1),
             "misa_f": dict(num_samples=4, hmc_burnin=1), "cql": dict(num_samples=4), "td3_bc": {}}


@pytest.fixture
def run_script(tmp_path):
    """`run_script(algo, env, **flags)`: train `algorithms/<algo>.py` as a user runs it, at a tiny size
    (TINY, TINY_ALGO; `flags` override them, e.g. num_seeds=2), into tmp_path/run. Asserts that it
    succeeded; returns (results.json, stdout, run directory)."""

    def run(algo: str, env: str, **flags) -> tuple[dict, str, Path]:
        run_dir = tmp_path / "run"
        options = {**TINY, **TINY_ALGO[algo], **flags, "run_dir": run_dir}
        cmd = [sys.executable, str(ROOT / "algorithms" / f"{algo}.py"), "--env", env]
        cmd += [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads((run_dir / "results.json").read_text()), out.stdout, run_dir

    return run

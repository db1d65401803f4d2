import gc
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # also reaches the scripts the tests launch
os.environ.setdefault("WANDB_MODE", "disabled")
# one persistent XLA cache for the session: this process and the scripts it launches. The many short runs
# here compile the same programs again and again (each main() call builds and compiles its chunk anew),
# and compiling dominates them on CPU. One folder per pytest-xdist worker: JAX writes an entry in place,
# without a lock, so a process of one worker could read another's entry half written (and segfault on it).
# Processes of one worker that run at once (test_evaluate's fixture: five scripts, and sac in this process)
# still share its folder: two that compile the same program at the same moment (the three MISA files' act)
# could race so (not seen; JAX locks its cache only when a size limit is set).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"misa-jax-test-xla-cache-{os.getuid()}"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1, ...; the folder above came from pytest's main process
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite compiles hundreds of small programs and runs each for a few updates: at LLVM's lowest optimisation
# level XLA:CPU compiles them faster and runs them slower (a tiny 2-seed MISA chunk, measured once beside other
# work: compile 23 -> 8 s, ten updates 0.2 -> 0.6 s), which most of these short runs hardly feel; the whole
# suite takes 15 minutes instead of 19 (README, Test). The one it slowed most, test_hmc's accuracy grid, runs
# in a process at the default level (at_default_level). The maths is the same; float rounding may differ from
# the default level's in the last bits (test_suite_settings.py checks that on MISA). This process and every
# script it launches use it; a given XLA_FLAGS replaces it (e.g. XLA_FLAGS= to test at XLA's default level).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)

import equinox as eqx  # noqa: E402
import gymnasium as gym  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from common.data import Transitions, write_d4rl_hdf5  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The test files, costliest first (seconds of each file's tests in one run of `python -m pytest -v --durations=0`
# from an empty cache at TEST_XLA_FLAGS, 2026-12-07: runs 313, hmc 307, misa 203, evaluate 142, copy_one_file 120,
# gpu_check 83, td3_bc 76, cql 74, then under 50 each). pytest-xdist's loadfile hands whole files to its workers
# in collection order (pyproject: --no-loadscope-reorder), so the long ones start first and the short ones fill
# in at the end. Its default order, most tests first, left copy_one_file (one test, 1.5-2.5 minutes) for last,
# run while the other worker sat idle. A file missing here only runs later.
COSTLIEST_FIRST = ["test_runs", "test_hmc", "test_misa", "test_evaluate", "test_copy_one_file", "test_gpu_check",
                   "test_td3_bc", "test_cql", "test_official_parity", "test_suite_settings", "test_sac", "test_kitchen",
                   "test_adroit", "test_report", "test_antmaze", "test_slurm", "test_sharding", "test_make_dataset"]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file's tests stay in order


def _memory_mappings() -> tuple[int, int]:
    """(mappings this process holds, the kernel's limit per process); (0, 1) where /proc is absent."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except OSError:
        return 0, 1


@pytest.fixture(autouse=True)
def _free_compiled_programs():
    """Every compiled XLA:CPU program keeps memory mappings of its own, and this one process compiles
    thousands: past the kernel's vm.max_map_count (65530 by default) XLA segfaults mid-compile (it did,
    in fresh-clone runs, ~20 min in). Drop JAX's compiled programs once half the limit is used."""
    yield
    used, limit = _memory_mappings()
    if used > limit // 2:
        jax.clear_caches()
        eqx.clear_caches()
        gc.collect()


def uncached_env(**extra: str) -> dict[str, str]:
    """The environment (plus `extra`) for a process that must not share the suite's compilation cache:
    - one a test may SIGKILL or freeze while others run: JAX writes a cache entry in place (not atomically),
      so a writer killed or stopped mid-write leaves a truncated entry that segfaults the next reader;
    - one with a forced host device count (XLA_FLAGS=--xla_force_host_platform_device_count=N): JAX leaves
      that flag out of its cache key, so its executables would be loaded by one-device processes, which
      segfault on them (seen: the fresh-clone suite died in test_runs after test_gpu_check had run).
    An XLA_FLAGS in `extra` is added to the suite's."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if "XLA_FLAGS" in extra:
        extra["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra['XLA_FLAGS']}".strip()
    return {**env, "JAX_ENABLE_COMPILATION_CACHE": "false", **extra}


_DEFAULT_LEVEL_CHILD = """
import importlib, pickle, sys
sys.path[:0] = {paths!r}
module, name, args_file, out_file = sys.argv[1:]
with open(args_file, "rb") as f:
    args = pickle.load(f)
result = getattr(importlib.import_module(module), name)(*args)
with open(out_file, "wb") as f:
    pickle.dump(result, f)
"""


def at_default_level(func: Callable, *args: Any, timeout: int = 900) -> Any:
    """func(*args) in a process of its own at XLA's default optimisation level (this process's XLA_FLAGS
    without TEST_XLA_FLAGS): for the few tests whose time goes into running their compiled programs rather
    than compiling them, which the suite's level slows down (test_hmc's accuracy grid: 169 s here, 126 s
    there, one run of each beside a training run; tests that compile as much as they run gain nothing: the
    bandit training took 44 s here, 53 s there). func must be importable by its module and name, its
    arguments and result picklable. The process shares this worker's compilation cache (the levels'
    programs have different keys); its output is printed."""
    with tempfile.TemporaryDirectory() as tmp:
        args_file, out_file = Path(tmp) / "args.pkl", Path(tmp) / "out.pkl"
        args_file.write_bytes(pickle.dumps(args))
        # without the worker's name: conftest, imported there by a test module, would nest the cache folder again
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
        code = _DEFAULT_LEVEL_CHILD.format(paths=[str(ROOT), str(ROOT / "tests")])
        proc = subprocess.run([sys.executable, "-c", code, func.__module__, func.__qualname__, str(args_file), str(out_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        print(proc.stdout, end="")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return pickle.loads(out_file.read_bytes())


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return out


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


# --------------------------------------------------------------------------- in-process training (several test files)
def bandit_dataset(n: int = 512, seed: int = 0, low: float = 0.3, high: float = 0.7) -> Transitions:
    """One-step continuous bandit: constant observation, behaviour actions in [low, high], reward = action,
    done = 1. An unregularised critic extrapolates the reward upwards to actions never seen (a -> 1)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(low, high, (n, 1)).astype(np.float32)
    obs = np.zeros((n, 1), np.float32)
    return Transitions(obs=jnp.asarray(obs), action=jnp.asarray(a), reward=jnp.asarray(a[:, 0]),
                       next_obs=jnp.asarray(obs), done=jnp.ones(n, jnp.float32))


def tiny_misa_args(module, **kw):
    """Small, fast settings of a MISA file (misa, misa_dv or misa_f) for in-process training; the
    per-domain settings are left to make_train (the locomotion preset)."""
    base = dict(num_seeds=1, num_updates=400, log_every=200, eval_every=200, hidden_dim=32, batch_size=64,
                num_samples=8, hmc_burnin=2, eval_episodes=1, cosine_schedule=False, actor_lr=1e-3, critic_lr=1e-3)
    return module.Args(**{**base, **kw})


def train_in_process(module, args, dataset: Transitions, seeds=(0,), chunks: int = 2, programs=None):
    """The agents of `seeds` (vmapped), trained `chunks` times `args.log_every` updates on `dataset` by
    `module.make_train(args, ...)`, or by `programs`, its (init, train) pair already built (to share
    one compiled program between tests). Returns (state, each metric's mean over the last chunk; None
    without chunks)."""
    init_v, train_v = programs or module.make_train(args, dataset.obs.shape[1], dataset.action.shape[1])
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(jnp.asarray(seeds))
    state, train_keys, metrics = init_v(keys[:, 0]), keys[:, 1], None
    for _ in range(chunks):
        state, train_keys, metrics = train_v(dataset, state, train_keys, jnp.int32(args.log_every))
    return state, None if metrics is None else metrics["mean"]


def assert_same_agent(many, i: int, one, j: int = 0, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Agent i of the stacked agents `many` is agent j of `one` (to float rounding; rtol = atol = 0: bit
    for bit), and the first two agents of `many` differ (the seeds really are different agents)."""
    leaves = jax.tree.leaves(eqx.filter(many, eqx.is_array))
    for a, b in zip(leaves, jax.tree.leaves(eqx.filter(one, eqx.is_array)), strict=True):
        np.testing.assert_allclose(a[i], b[j], rtol=rtol, atol=atol)
    assert any(not np.allclose(a[0], a[1]) for a in leaves)


class GaussActor(eqx.Module):
    """pi(u|s) = N(mu, exp(log_std)^2) in pre-tanh space, the same for every state."""

    mu: jax.Array
    log_std: jax.Array

    def __call__(self, obs):
        return self.mu, self.log_std

"""Seeds sharded over several devices, on CPU: XLA is told to expose 4 host devices. The flag must
be set before JAX starts, so every check runs in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import uncached_env

ROOT = Path(__file__).resolve().parents[1]


def run_with_devices(n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = uncached_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_seed_axis_is_split_and_dataset_replicated():
    code = """
import jax, jax.numpy as jnp
from common.sharding import seed_devices, shard_seeds
assert jax.device_count() == 4, jax.devices()
devs = jax.devices()
assert len(seed_devices(8, devs)) == 4 and len(seed_devices(6, devs)) == 3 and len(seed_devices(5, devs)) == 1
data = {"obs": jnp.ones((10, 3))}
state = {"w": jnp.arange(8 * 2.0).reshape(8, 2), "step": 3}
data, state, keys = shard_seeds(8, data, state, jax.random.split(jax.random.PRNGKey(0), 8))
assert len(state["w"].sharding.device_set) == 4 and state["step"] == 3
assert {s.data.shape for s in state["w"].addressable_shards} == {(2, 2)}
assert {s.data.shape for s in data["obs"].addressable_shards} == {(10, 3)}  # a full copy on each device
out = jax.jit(jax.vmap(lambda w, k: w * 2 + jax.random.normal(k)))(state["w"], keys)
assert len(out.sharding.device_set) == 4  # the computation stays split by seed
print("ok")
"""
    out = run_with_devices(4, ["-c", code])
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_training_on_four_devices_matches_one(tiny_hopper, tmp_path):
    """td3_bc with 4 seeds on 4 devices trains the same agents as on one device."""
    _, local = tiny_hopper
    losses = {}
    for n in (1, 4):
        cmd = ["algorithms/td3_bc.py", "--env", str(local), "--num-seeds", "4", "--num-updates", "40",
               "--log-every", "20", "--eval-every", "40", "--eval-episodes", "1", "--hidden-dim", "32",
               "--batch-size", "32", "--run-dir", str(tmp_path / f"run{n}")]
        out = run_with_devices(n, cmd)
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("sharded over 4 devices" in out.stdout) == (n == 4)
        rows = (tmp_path / f"run{n}" / "train.csv").read_text().splitlines()
        header = rows[0].split(",")
        col = header.index("critic_loss")
        losses[n] = np.array([float(r.split(",")[col]) for r in rows[1:]])
        assert json.loads((tmp_path / f"run{n}" / "results.json").read_text())["seeds"] == [0, 1, 2, 3]
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-4)

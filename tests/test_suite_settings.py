"""The suite's own settings change nothing that it tests: conftest.py compiles at XLA:CPU's lowest
optimisation level (TEST_XLA_FLAGS, for compile time), and users' runs compile at XLA's default. Checked
on MISA, the file with the most numerics (its HMC sampler among them)."""

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from algorithms import misa
from conftest import TEST_XLA_FLAGS, bandit_dataset, tiny_misa_args, train_in_process

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LEVEL = """
import sys
import numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from test_suite_settings import ten_updates
np.savez({out!r}, *ten_updates())
"""


def ten_updates() -> list[np.ndarray]:
    """The arrays of two MISA agents after ten updates on a bandit dataset, in this process."""
    state, _ = train_in_process(misa, tiny_misa_args(misa, log_every=10, num_samples=4, batch_size=16), bandit_dataset(128),
                                seeds=(0, 1), chunks=1)
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def test_misa_trained_at_the_default_optimisation_level_is_the_same_agent(tmp_path):
    """Ten MISA updates (HMC sampler included) of two seeds at XLA's default level, in a process of its
    own, against the same in this process at the suite's level: equal to float rounding."""
    if os.environ["XLA_FLAGS"] != TEST_XLA_FLAGS:
        pytest.skip(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r} given: this process is not at the suite's level")
    out = tmp_path / "default.npz"
    code = DEFAULT_LEVEL.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}  # its conftest: this worker's cache
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "XLA_FLAGS": ""},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    here, default = ten_updates(), np.load(out)
    assert len(here) == len(default.files) > 0
    for i, a in enumerate(here):
        np.testing.assert_allclose(a, default[f"arr_{i}"], rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(a[0], a[1]) for a in here)  # two different agents
    # and the two levels really did compile differently (else this compared a level with itself): their
    # rounding differs somewhere (by at most 5e-7 in float32 when measured)
    assert any(not np.array_equal(a, default[f"arr_{i}"]) for i, a in enumerate(here))

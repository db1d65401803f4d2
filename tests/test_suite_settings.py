"""The suite's own settings change nothing that it tests: conftest.py compiles at XLA:CPU's lowest
optimisation level (TEST_XLA_FLAGS, for compile time), and users' runs compile at XLA's default. Checked
on MISA, the file with the most numerics (its HMC sampler among them)."""

import os

import equinox as eqx
import jax
import numpy as np
import pytest

from algorithms import misa
from conftest import TEST_XLA_FLAGS, at_default_level, bandit_dataset, tiny_misa_args, train_in_process


def ten_updates() -> list[np.ndarray]:
    """The arrays of two MISA agents after ten updates on a bandit dataset, in this process."""
    state, _ = train_in_process(misa, tiny_misa_args(misa, log_every=10, num_samples=4, batch_size=16), bandit_dataset(128),
                                seeds=(0, 1), chunks=1)
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def test_misa_trained_at_the_default_optimisation_level_is_the_same_agent():
    """Ten MISA updates (HMC sampler included) of two seeds at XLA's default level, in a process of its
    own, against the same in this process at the suite's level: equal to float rounding."""
    if os.environ["XLA_FLAGS"] != TEST_XLA_FLAGS:
        pytest.skip(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r} given: this process is not at the suite's level")
    default, here = at_default_level(ten_updates), ten_updates()
    assert len(here) == len(default) > 0
    for i, a in enumerate(here):
        np.testing.assert_allclose(a, default[i], rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(a[0], a[1]) for a in here)  # two different agents
    # and the two levels really did compile differently (else this compared a level with itself): their
    # rounding differs somewhere (by at most 5e-7 in float32 when measured)
    assert any(not np.array_equal(a, default[i]) for i, a in enumerate(here))

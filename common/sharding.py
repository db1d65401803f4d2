"""Spread the seed axis of a vmapped training run over every local device (jax sharding).

The training programs are `vmap`s over seeds, so seeds never talk to each other: splitting the
leading (seed) axis of the agent state and keys across devices, and replicating the dataset,
lets XLA run each device's seeds there with no communication. On one device this is a no-op.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def seed_devices(num_seeds: int, devices: list | None = None) -> list:
    """The devices the seeds go to: as many as divide `num_seeds` evenly (every device gets the
    same number of seeds, so the compiled program is the same on each)."""
    devices = list(devices if devices is not None else jax.local_devices())
    n = max(d for d in range(1, min(len(devices), num_seeds) + 1) if num_seeds % d == 0)
    return devices[:n]


def shard_seeds(num_seeds: int, dataset: Any, *per_seed: Any) -> tuple[Any, ...]:
    """(dataset replicated, then each per-seed pytree split along its leading axis) over the
    local devices. Returns the arguments unchanged when there is one device."""
    devices = seed_devices(num_seeds)
    available = len(jax.local_devices())
    if len(devices) < available:
        print(f"note: {num_seeds} seeds over {available} devices: using {len(devices)}; "
              f"a multiple of {available} seeds uses them all")
    if len(devices) == 1:
        return (dataset, *per_seed)
    mesh = Mesh(np.asarray(devices), ("seeds",))
    print(f"{num_seeds} seeds sharded over {len(devices)} devices: {num_seeds // len(devices)} per device")

    def put(tree: Any, spec: PartitionSpec) -> Any:
        sharding = NamedSharding(mesh, spec)
        return jax.tree.map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)

    return (put(dataset, PartitionSpec()), *(put(t, PartitionSpec("seeds")) for t in per_seed))

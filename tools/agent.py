"""A trained agent from a run directory, for use outside training:

    from tools.agent import load_agent
    agent = load_agent("runs/td3_bc__medium__seed0__20261203-120000", seed=0)
    action = agent.act(obs)        # obs (obs_dim,) or (B, obs_dim), raw env observations -> actions in [-1, 1]

This file needs numpy, jax, equinox and the run's algorithm file, and nothing else of this repository:
to use a run elsewhere, copy this file and the algorithm file (e.g. `algorithms/td3_bc.py`) into the
project, beside each other or anywhere on the path, and `from agent import load_agent`. The algorithm
is found as `algorithms.<algo>` or as `<algo>` (pass `algorithm="path/to/td3_bc.py"` to name the file).
`sac.py` is the exception: it imports `common/` itself, so its runs need this repository on the path.

What it reads from the run directory, and nothing else (it writes nothing):
  config.json     the algorithm's name (`algo`) and its resolved settings (`args`)
  checkpoint.eqx  the agents of every seed, stacked (equinox leaves), at the run's last checkpoint
  obs_stats.npz   the observation mean and std the offline policies were trained with

The agents are rebuilt by the algorithm file itself (`Args`, the `init` of `make_train`, `act`), and
their sizes are read off the checkpoint: each array's shape is affine in the observation and action
dimensions, so three shape-only traces of `init` solve for them. A checkpoint that does not fit the
file as it is now (a network changed since the run was trained) is refused, naming what differs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class LoadError(Exception):
    """The run directory cannot give an agent; the message says why and what to do."""


@dataclasses.dataclass
class Agents:
    """The deterministic policies of some seeds of one run, stacked over `seeds` as training evaluates them."""

    run_dir: Path
    algo: str
    module: ModuleType  # the algorithm file that rebuilt them
    args: Any  # its Args, from config.json
    config: dict
    seeds: list[int]
    update: int  # training progress at the checkpoint (updates; env steps for sac)
    obs_dim: int
    act_dim: int
    actors: Any  # the algorithm's Actor, arrays stacked over seeds
    states: Any  # the algorithm's whole agent state at the checkpoint (critic included), stacked over seeds
    obs_mean: np.ndarray | None  # None: the algorithm takes raw observations (sac)
    obs_std: np.ndarray | None
    ignored: list[str]  # settings in config.json that the algorithm file no longer has

    @property
    def unit(self) -> str:
        """What `update` counts."""
        return "env step" if self.algo == "sac" else "update"

    def apply(self, obs: jax.Array) -> jax.Array:
        """Actions (S, E, act_dim) for observations (S, E, obs_dim): the algorithm's own `act`, traceable."""
        if self.obs_mean is not None:  # the offline files: act(actors, obs, obs_mean, obs_std)
            return self.module.act(self.actors, obs, self.obs_mean, self.obs_std)
        return self.module.act_deterministic(self.actors, obs)  # sac.py

    def policy(self, obs: np.ndarray) -> np.ndarray:
        """`apply` on numpy arrays: the policy `common.evaluation.Evaluator.run` takes."""
        return np.asarray(self.apply(jnp.asarray(obs, jnp.float32)))


@dataclasses.dataclass
class Agent:
    """One trained agent: its deterministic policy with its run's observation normalisation."""

    agents: Agents  # of this one seed

    @property
    def seed(self) -> int:
        return self.agents.seeds[0]

    def act(self, obs: Any) -> np.ndarray:
        """Action in [-1, 1]^act_dim for one raw observation (obs_dim,), or actions (B, act_dim) for (B, obs_dim)."""
        obs = np.asarray(obs, np.float32)
        if obs.shape[-1:] != (self.agents.obs_dim,) or obs.ndim > 2:
            raise ValueError(f"obs must have shape ({self.agents.obs_dim},) or (B, {self.agents.obs_dim}), got {obs.shape}")
        actions = self.agents.policy(obs.reshape(1, -1, self.agents.obs_dim))[0]
        return actions.reshape(obs.shape[:-1] + (self.agents.act_dim,))


def load_agent(run_dir: str | os.PathLike, seed: int | None = None,
               algorithm: str | os.PathLike | ModuleType | None = None) -> Agent:
    """The agent of `seed` (default: the run's first) at the run's checkpoint. `algorithm`: the algorithm
    module or file to rebuild it with (default: `algorithms.<algo>` or `<algo>`, as config.json names it)."""
    if seed is None:
        seed = read_config(Path(run_dir))["args"].get("seed", 0)
    return Agent(load_agents(run_dir, [seed], algorithm))


def load_agents(run_dir: str | os.PathLike, seeds: list[int] | None = None,
                algorithm: str | os.PathLike | ModuleType | None = None) -> Agents:
    """The agents of `seeds` (default: every seed of the run) at the run's checkpoint; see load_agent."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    algo = config["algo"]
    module = algorithm if isinstance(algorithm, ModuleType) else import_algorithm(algo, algorithm)
    name = getattr(module, "__file__", None) or module.__name__
    fields = {f.name for f in dataclasses.fields(module.Args)}
    saved = config["args"]
    args = module.Args(**{k: v for k, v in saved.items() if k in fields})
    run_seeds = [args.seed + i for i in range(args.num_seeds)]
    seeds = run_seeds if seeds is None else list(seeds)
    missing = [s for s in seeds if s not in run_seeds]
    if missing:
        raise LoadError(f"seed {', '.join(map(str, missing))}: no such agent in {run_dir}; its seeds are {run_seeds}")

    path = run_dir / "checkpoint.eqx"
    if not path.exists():
        # common.runlog.first_checkpoint, restated: this file imports nothing of the repository
        first = min((v for k in ("eval_every", "checkpoint_every", "num_updates") if (v := saved.get(k))), default="?")
        unit = "updates" if "eval_every" in saved else "env steps"  # sac counts env steps
        raise LoadError(f"the {algo} run in {run_dir} has no checkpoint yet (the first is written after {first} {unit}): "
                        "nothing to load until then")
    disk = saved_arrays(path)

    def like(obs_dim: int, act_dim: int) -> Any:
        try:
            init = module.make_train(args, obs_dim, act_dim)[0]
        except (TypeError, ValueError) as e:  # settings the file no longer takes (make_train checks them)
            raise LoadError(f"{name} cannot rebuild this run's agents from {run_dir / 'config.json'} ({e})") from None
        keys = jax.eval_shape(lambda: jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(jnp.arange(args.num_seeds))[:, 1])
        return checkpoint_like(algo, eqx.filter_eval_shape(init, keys), keys)

    obs_dim, act_dim = solve_dims(lambda o, a: leaf_specs(like(o, a)), disk)
    tree = like(obs_dim, act_dim)
    problems = differences(leaf_specs(tree), disk, name)
    if problems:
        commit = (config.get("git_commit") or "")[:12]
        raise LoadError(f"{path} does not fit {name} as it is now: {'; '.join(problems)}. The file has changed since "
                        f"this run was trained{f' (at git commit {commit})' if commit else ''}: load the run with that "
                        f"version of the file (git show {commit or '<commit>'}:algorithms/{algo}.py > old_{algo}.py, then "
                        f"--algorithm old_{algo}.py, or algorithm='old_{algo}.py' in load_agent)")
    try:
        tree = eqx.tree_deserialise_leaves(path, tree)
    except Exception as e:  # truncated after its headers were read: equinox raises several types
        raise LoadError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged") from None

    index = jnp.asarray([run_seeds.index(s) for s in seeds])
    states = jax.tree.map(lambda x: x[index] if eqx.is_array(x) else x, tree["state"])
    obs_mean = obs_std = None
    if hasattr(module, "act"):  # the offline files normalise observations with the dataset's statistics
        stats_path = run_dir / "obs_stats.npz"
        if not stats_path.exists():
            raise LoadError(f"{run_dir} lacks obs_stats.npz, the observation normalisation its policies were trained "
                            "with; without it the agents cannot act")
        with np.load(stats_path) as stats:
            obs_mean, obs_std = stats["mean"].astype(np.float32), stats["std"].astype(np.float32)
        if obs_mean.shape != (obs_dim,):
            raise LoadError(f"{stats_path} holds statistics of {obs_mean.shape[0]}-D observations, but the checkpoint's "
                            f"agents take {obs_dim}-D ones: the run directory mixes files of two runs")
    count = tree["step"] if algo == "sac" else tree["update"]
    return Agents(run_dir=run_dir, algo=algo, module=module, args=args, config=config, seeds=seeds,
                  update=int(count), obs_dim=obs_dim, act_dim=act_dim, actors=states.actor, states=states, obs_mean=obs_mean,
                  obs_std=obs_std, ignored=sorted(set(saved) - fields))


# --------------------------------------------------------------------------- the run directory
def read_config(run_dir: Path) -> dict:
    """config.json of a run, with `algo` (older runs: from the command line that made them)."""
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is a file"
        raise LoadError(f"{run_dir} {what}: give a run directory, e.g. runs/<algo>__<env>__seed0__<time>")
    path = run_dir / "config.json"
    if not path.exists():
        raise LoadError(f"{run_dir} is not a run directory (it has no config.json): give one that a training run "
                        "wrote, e.g. runs/<algo>__<env>__seed0__<time>")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is damaged ({e}); this run cannot be loaded") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise LoadError(f"{path} is damaged (it holds no run settings); this run cannot be loaded")
    command = config.get("command") or []
    config.setdefault("algo", Path(command[1]).stem if len(command) > 1 else None)
    if not config["algo"]:
        raise LoadError(f"{path} does not say which algorithm trained the run")
    return config


def import_algorithm(algo: str, path: str | os.PathLike | None = None) -> ModuleType:
    """The algorithm module: from `path`, else `algorithms.<algo>` (this repository) or `<algo>` (a copied file)."""
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise LoadError(f"algorithm file {path} does not exist")
            name = f"{algo}@{path.resolve()}"  # its own module, beside any imported `algorithms.<algo>`
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up while the file runs
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        for candidate in (f"algorithms.{algo}", algo):
            try:
                return importlib.import_module(candidate)
            except ModuleNotFoundError as e:
                if e.name is None or not candidate.startswith(e.name):  # the file exists; something it imports does not
                    raise
        raise LoadError(f"the run was trained by {algo}.py, which is not on the path (as algorithms.{algo} or {algo}): "
                        f"put that file beside your code, or name it with algorithm=")
    except ImportError as e:
        hint = " (sac.py imports common/: use it from this repository)" if algo == "sac" else ""
        raise LoadError(f"{path or algo + '.py'} cannot be imported ({type(e).__name__}: {e}){hint}") from None


def checkpoint_like(algo: str, state: Any, keys: Any) -> dict:
    """The pytree a run saves in checkpoint.eqx (common.runlog.Run.checkpoint for the offline files,
    sac.train for sac.py), from the stacked AgentState and one (S, 2) key array."""
    count = jax.ShapeDtypeStruct((), jnp.int32)
    if algo == "sac":
        return {"state": state, "act_keys": keys, "train_keys": keys, "step": count}
    return {"state": state, "keys": keys, "update": count}


# --------------------------------------------------------------------------- checkpoint shapes
def saved_arrays(path: Path) -> list[tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an equinox checkpoint, in order: the file is the arrays'
    .npy records one after another (eqx.tree_serialise_leaves), so their headers are read, not the data."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    arrays = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        try:
            while f.tell() < end:
                shape, _, dtype = readers[np.lib.format.read_magic(f)](f)
                f.seek(int(np.prod(shape)) * dtype.itemsize, os.SEEK_CUR)
                arrays.append((tuple(shape), dtype))
        except (ValueError, KeyError, OSError) as e:
            raise LoadError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it is damaged") from None
        if f.tell() != end:
            raise LoadError(f"{path} is truncated (its last array ends after the end of the file); it is damaged")
    return arrays


def leaf_specs(tree: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(path, shape, dtype) of each leaf equinox saves (arrays and array-likes), in the order it saves them."""
    return [(_path(path), tuple(np.shape(x)), np.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array_like(x)]


def _path(keys: tuple) -> str:
    """state.actor.net.layers[0].weight, as one would write it."""
    parts = [f"[{k.idx}]" if isinstance(k, jax.tree_util.SequenceKey) else
             f".{k.key}" if isinstance(k, jax.tree_util.DictKey) else str(k) for k in keys]
    return "".join(parts).lstrip(".")


def solve_dims(specs: Any, disk: list[tuple[tuple[int, ...], np.dtype]]) -> tuple[int, int]:
    """(obs_dim, act_dim) of the saved agents. `specs(obs_dim, act_dim)` lists the arrays the algorithm
    builds; an axis that grows with one dimension only (the actor's input: obs_dim; its output: act_dim)
    gives that dimension from its saved length. 1 where none does (the shapes then differ, and say so)."""
    base, more_obs, more_act = specs(1, 1), specs(2, 1), specs(1, 2)
    dims = [None, None]
    for (_, b, _), (_, o, _), (_, a, _), (f, _) in zip(base, more_obs, more_act, disk):
        if not len(b) == len(o) == len(a) == len(f):
            continue
        for bk, ok, ak, fk in zip(b, o, a, f):
            for i, slope, other in ((0, ok - bk, ak - bk), (1, ak - bk, ok - bk)):
                if dims[i] is None and slope > 0 and other == 0 and fk >= bk and (fk - bk) % slope == 0:
                    dims[i] = 1 + (fk - bk) // slope
    return dims[0] or 1, dims[1] or 1


def differences(specs: list[tuple[str, tuple[int, ...], np.dtype]], disk: list[tuple[tuple[int, ...], np.dtype]],
                name: str) -> list[str]:
    """What differs between the arrays the algorithm file builds now and those in the checkpoint."""
    changed = [f"{path} is {shape} {dtype} now, {dshape} {ddtype} in the checkpoint"
               for (path, shape, dtype), (dshape, ddtype) in zip(specs, disk) if (shape, dtype) != (dshape, ddtype)]
    if len(specs) != len(disk):  # an array added or removed: the ones after it are out of step, so only the first is named
        return [f"the checkpoint holds {len(disk)} arrays, the agent {name} builds now {len(specs)}"] + changed[:1]
    return changed[:3] + ([f"and {len(changed) - 3} more"] if len(changed) > 3 else [])

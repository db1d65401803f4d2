"""Offline datasets: D4RL names, Minari ids, local D4RL-format HDF5 files, and our own datasets.

`load(env)` returns float32 `Transitions` and an `EnvSpec`. Accepted forms of `env`:

1. A D4RL name (`hopper-medium-v2`, `antmaze-umaze-v0`, `pen-human-v1`, `kitchen-complete-v0`, ...).
   The HDF5 file is read with h5py from `dataset_dir`, `$D4RL_DATASET_DIR` or `~/.d4rl/datasets`
   under the file name D4RL itself uses; if it is absent it is downloaded from D4RL's URL. Nothing
   here imports `d4rl`, `gym` or `mujoco_py`.
2. A Minari dataset id (`mujoco/hopper/medium-v0`, `D4RL/antmaze/umaze-v1`, ...), through `minari`
   (local cache first, then Minari's remote).
3. A path to a local file in D4RL's HDF5 layout.
4. `ours/<GymnasiumEnvId>/<split>` (e.g. `ours/Hopper-v5/medium`): a dataset this project generated
   with `python -m tools.make_dataset`, stored under `datasets/ours/`. These are *not* D4RL data:
   other simulator versions, other policies. Their names say so on purpose.

Transitions follow `d4rl.qlearning_dataset` semantics: `done` is the terminal flag only (a
time-out is not a terminal), the transition that crosses a time-out is dropped (its next
observation belongs to the next episode), the last row of the file is dropped, and the stored
`next_observations` are used when the file has them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from common import scores
from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
OURS_DIR = REPO_ROOT / "datasets"  # holds ours/<EnvId>/<split>.hdf5
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


class Transitions(NamedTuple):
    obs: np.ndarray  # (N, obs_dim) float32
    action: np.ndarray  # (N, act_dim) float32, in [-1, 1]
    reward: np.ndarray  # (N,) float32
    next_obs: np.ndarray  # (N, obs_dim) float32
    done: np.ndarray  # (N,) float32, 1.0 at true terminals only


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What an algorithm needs to know about a dataset besides its transitions."""

    name: str  # the name `load` was given
    source: str  # "d4rl" | "minari" | "file" | "ours"
    obs_dim: int
    act_dim: int
    max_episode_steps: int | None
    eval_env_id: str | None = None  # gymnasium id of the evaluation env
    eval_env_kwargs: dict = dataclasses.field(default_factory=dict)
    obs_pad: int = 0  # zeros appended to env observations to match the dataset (D4RL ant)
    minari_id: str | None = None  # evaluation env comes from the Minari dataset when set
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    eval_unsupported: str | None = None  # why no evaluation env can be built yet
    domain: str = "locomotion"  # one of DOMAINS: the algorithm files key their per-domain presets by it
    num_transitions: int | None = None  # transitions the loader kept (a run needs at least one batch)
    rows: str | None = None  # how the file's rows became them (which rows the loader dropped, and why)


# --------------------------------------------------------------------------- D4RL registry
_LOCOMOTION = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
_LOCOMOTION_SPLITS = ["random", "medium", "medium-replay", "medium-expert", "expert", "full-replay"]
_ANTMAZE = {
    "umaze": "u-maze_noisy_multistart_False_multigoal_False",
    "umaze-diverse": "u-maze_noisy_multistart_True_multigoal_True",
    "medium-play": "big-maze_noisy_multistart_True_multigoal_False",
    "medium-diverse": "big-maze_noisy_multistart_True_multigoal_True",
    "large-play": "hardest-maze_noisy_multistart_True_multigoal_False",
    "large-diverse": "hardest-maze_noisy_multistart_True_multigoal_True",
}
_ADROIT_STEPS = {"pen": 100, "door": 200, "hammer": 200, "relocate": 200}
_KITCHEN = {
    "complete": "mini_kitchen_microwave_kettle_light_slider-v0",
    "partial": "kitchen_microwave_kettle_light_slider-v0",
    "mixed": "kitchen_microwave_kettle_bottomburner_light-v0",
}


def _d4rl_registry() -> dict[str, tuple[str, int]]:
    """D4RL dataset name -> (download URL, max episode steps), as in d4rl's env registrations."""
    reg = {}
    for task in _LOCOMOTION:
        for split in _LOCOMOTION_SPLITS:
            reg[f"{task}-{split}-v2"] = (f"{D4RL_URL}/gym_mujoco_v2/{task}_{split.replace('-', '_')}-v2.hdf5", 1000)
    for split, stem in _ANTMAZE.items():
        steps = 700 if split.startswith("umaze") else 1000
        reg[f"antmaze-{split}-v0"] = (f"{D4RL_URL}/ant_maze_new/Ant_maze_{stem}_sparse.hdf5", steps)
        reg[f"antmaze-{split}-v2"] = (f"{D4RL_URL}/ant_maze_v2/Ant_maze_{stem}_sparse_fixed.hdf5", steps)
    for task, steps in _ADROIT_STEPS.items():
        for split in ["human", "cloned", "expert"]:
            reg[f"{task}-{split}-v1"] = (f"{D4RL_URL}/hand_dapg_v1/{task}-{split}-v1.hdf5", steps)
    for split, stem in _KITCHEN.items():
        reg[f"kitchen-{split}-v0"] = (f"{D4RL_URL}/kitchen/{stem}.hdf5", 280)
    return reg


D4RL_DATASETS = _d4rl_registry()

# --------------------------------------------------------------------------- domains
DOMAINS = ("locomotion", "antmaze", "adroit", "kitchen")
_TASK_DOMAINS = {**dict.fromkeys(_LOCOMOTION, "locomotion"), "antmaze": "antmaze",
                 **dict.fromkeys(_ADROIT_STEPS, "adroit"), "kitchen": "kitchen"}
_GYM_PREFIXES = {"AntMaze": "antmaze", "AdroitHand": "adroit", "FrankaKitchen": "kitchen"}  # gymnasium-robotics ids


def domain_of(name: str) -> str:
    """The benchmark domain of a D4RL name (`pen-human-v1`), a Minari id (`D4RL/door/human-v2`,
    `mujoco/hopper/medium-v0`), an `ours/<EnvId>/<split>` name or a gymnasium id (`AdroitHandDoor-v1`,
    `common.envs:antmaze-umaze-v0`); anything else is treated as locomotion."""
    name = name.removeprefix("common.envs:")
    if name.endswith((".hdf5", ".h5")):  # a local file: D4RL's file names start with the task
        name = Path(name).stem
    parts = name.split("/")
    if parts[0] == "ours" and len(parts) == 3:
        return domain_of(parts[1])
    if len(parts) == 3:  # a Minari id: namespace/task/split
        return _TASK_DOMAINS.get(parts[1].lower(), "locomotion")
    for prefix, domain in _GYM_PREFIXES.items():
        if name.startswith(prefix):
            return domain
    return _TASK_DOMAINS.get(name.split("-")[0].split("_")[0].lower(), "locomotion")


def d4rl_spec_fields(name: str) -> dict:
    """Evaluation-env fields of the EnvSpec for a D4RL dataset name."""
    task = name.split("-")[0]
    ref_min, ref_max = scores.d4rl_reference(name)
    fields = dict(max_episode_steps=D4RL_DATASETS[name][1], ref_min_score=ref_min, ref_max_score=ref_max)
    if task in _LOCOMOTION:
        fields["eval_env_id"] = _LOCOMOTION[task]
        if task == "ant":
            # D4RL's ant observation is 111-D: 27 positions/velocities + 84 contact forces that were
            # always zero under mujoco-py (D4RL issue 173). Ant-v5 without contact forces gives the 27;
            # the zeros are appended.
            fields["eval_env_kwargs"] = {"include_cfrc_ext_in_observation": False}
            fields["obs_pad"] = 84
    else:
        # AntMaze, Adroit and Kitchen: gymnasium-robotics envs adapted to D4RL's observation layout,
        # goals and rewards (common/envs; what is faithful and what is not is said there)
        fields["eval_env_id"] = f"common.envs:{name}"
    return fields


# --------------------------------------------------------------------------- public API
def load(env: str, dataset_dir: str | os.PathLike | None = None, download: bool = True) -> tuple[Transitions, EnvSpec]:
    """Load a dataset by D4RL name, Minari id, `ours/...` name or HDF5 path. See the module docstring."""
    transitions, spec = _load(env, dataset_dir, download)
    # the evaluation env names the domain best (a local file's name may say nothing); else the dataset's name
    return transitions, dataclasses.replace(spec, domain=domain_of(spec.eval_env_id or spec.name))


def _load(env: str, dataset_dir: str | os.PathLike | None, download: bool) -> tuple[Transitions, EnvSpec]:
    path = Path(env).expanduser()
    if env.endswith((".hdf5", ".h5")) or path.is_file():
        if not path.is_file():
            raise UserError(f"dataset file {path} does not exist")
        return _load_file(path, name=str(env), source="file")
    if env.startswith("ours/"):
        return _load_ours(env, dataset_dir)
    if env in D4RL_DATASETS:
        url, _ = D4RL_DATASETS[env]
        file = d4rl_dir(dataset_dir) / url.split("/")[-1]
        if not file.is_file():
            if not download:
                raise UserError(f"{env}: {file} is missing. Download it from {url} and place it there.")
            download_file(url, file)
        return _load_file(file, name=env, source="d4rl", spec_fields=d4rl_spec_fields(env))
    if "/" in env:
        return _load_minari(env, download)
    raise UserError(_unknown_name_message(env))


def d4rl_dir(dataset_dir: str | os.PathLike | None = None) -> Path:
    """Where D4RL files are looked for: the argument, $D4RL_DATASET_DIR, or ~/.d4rl/datasets."""
    if dataset_dir is not None:
        return Path(dataset_dir).expanduser()
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def download_file(url: str, dest: Path) -> None:
    """Download `url` to `dest` with a progress bar, atomically (temp file, then rename)."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({e}).\nOn a machine with internet, download that URL and place "
            f"the file at {dest} (or set $D4RL_DATASET_DIR / --dataset-dir to the folder that holds it)."
        ) from e
    os.replace(tmp, dest)


def write_d4rl_hdf5(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write `arrays` (keys like 'observations' or 'infos/qpos') and scalar `metadata/<key>` entries
    to a gzip-compressed HDF5 file in D4RL's layout, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.dtype == np.float64:
                value = value.astype(np.float32)
            f.create_dataset(key, data=value, compression="gzip", shuffle=True)
        for key, value in (metadata or {}).items():
            f[f"metadata/{key}"] = value
    os.replace(tmp, path)


# --------------------------------------------------------------------------- loaders
def _load_ours(env: str, dataset_dir) -> tuple[Transitions, EnvSpec]:
    root = Path(dataset_dir).expanduser() if dataset_dir is not None else OURS_DIR
    file = root / f"{env}.hdf5"
    if not file.is_file():
        available = sorted(str(p.relative_to(root))[: -len(".hdf5")] for p in root.glob("ours/*/*.hdf5"))
        parts = env.split("/")
        hint = f"python -m tools.make_dataset --env {parts[1]}" if len(parts) == 3 else "python -m tools.make_dataset --help"
        raise UserError(
            f"{env}: {file} does not exist. Datasets we have: {available or 'none'}. Generate it with `{hint}`."
        )
    return _load_file(file, name=env, source="ours")


def _read_arrays(f: h5py.File, path: Path) -> dict[str, np.ndarray]:
    """The D4RL arrays of an open file, checked to be numeric arrays (not groups, strings or objects)."""
    missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
    if missing:
        raise UserError(
            f"{path} is not in D4RL's layout: missing {missing}; it has {sorted(f.keys())}. "
            "A D4RL-format file needs 'observations' (N, obs_dim), 'actions' (N, act_dim), "
            "'rewards' (N,), 'terminals' (N,) and, optionally, 'timeouts' (N,) and 'next_observations'."
        )
    raw = {}
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        if key not in f:
            continue
        item = f[key]
        if not isinstance(item, h5py.Dataset):  # e.g. a dict observation space stored as a group
            raise UserError(f"{path}: '{key}' is a group of {sorted(item.keys())}, not an array; flatten it into one "
                            "(N, dim) array (common.data.flatten_observations does this for Minari data)")
        if not (np.issubdtype(item.dtype, np.number) or item.dtype == bool):
            raise UserError(f"{path}: '{key}' holds {item.dtype} values, not numbers")
        raw[key] = item[()]
    return raw


def fingerprint(t: Transitions) -> str:
    """sha256 of the loaded transitions (values and shapes): a resume checks it is the same data."""
    h = hashlib.sha256()
    for field in t:
        a = np.ascontiguousarray(field)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_metadata(f: h5py.File) -> dict:
    meta = {}
    if "metadata" in f and isinstance(f["metadata"], h5py.Group):
        for key, item in f["metadata"].items():
            if isinstance(item, h5py.Dataset) and item.shape == ():
                value = item[()]
                meta[key] = value.decode() if isinstance(value, bytes) else value
    return meta


def _load_file(path: Path, name: str, source: str, spec_fields: dict | None = None) -> tuple[Transitions, EnvSpec]:
    try:
        with h5py.File(path, "r") as f:
            raw, meta = _read_arrays(f, path), _read_metadata(f)
    except OSError as e:  # not HDF5, truncated, or unreadable (h5py says which)
        raise UserError(f"{path} cannot be read as HDF5 ({e}). Is the file complete? Download or write it again.") from None

    fields = dict(spec_fields or {})
    if "env_id" in meta:  # files written by tools.make_dataset (or annotated by a user)
        fields.setdefault("eval_env_id", str(meta["env_id"]))
        fields.setdefault("eval_env_kwargs", json.loads(str(meta.get("env_kwargs", "{}"))))
    for key in ("max_episode_steps", "ref_min_score", "ref_max_score"):
        if key in meta:
            fields.setdefault(key, meta[key].item() if hasattr(meta[key], "item") else meta[key])
    if source == "file" and path.stem in {u.split("/")[-1][: -len(".hdf5")] for u, _ in D4RL_DATASETS.values()}:
        d4rl_name = next(n for n, (u, _) in D4RL_DATASETS.items() if u.endswith("/" + path.name))
        for key, value in d4rl_spec_fields(d4rl_name).items():
            fields.setdefault(key, value)

    if path.name in _ANTMAZE_V0_FILES:  # AntMaze v0 time-out fix (D4RL issue 77), see antmaze_v0_fix_timeouts
        raw = antmaze_v0_fix_timeouts(raw, fields.get("max_episode_steps"), name=str(path))
    transitions, rows = _qlearning(raw, fields.get("max_episode_steps"), name=str(path))
    spec = EnvSpec(
        name=name,
        source=source,
        obs_dim=transitions.obs.shape[1],
        act_dim=transitions.action.shape[1],
        **{"max_episode_steps": None, **fields},
        num_transitions=transitions.obs.shape[0],
        rows=rows,
    )
    if spec.eval_env_id is None and spec.eval_unsupported is None:
        spec = dataclasses.replace(
            spec,
            eval_unsupported=(
                f"{path} does not say which environment it came from. Add a scalar string dataset "
                "'metadata/env_id' with a gymnasium id (e.g. h5py: f['metadata/env_id'] = 'Hopper-v5'), "
                "or name the file as D4RL does (e.g. hopper_medium-v2.hdf5)"
            ),
        )
    return transitions, spec


def qlearning_transitions(raw: dict[str, np.ndarray], max_episode_steps: int | None, name: str = "dataset") -> Transitions:
    """D4RL arrays -> transitions with d4rl.qlearning_dataset semantics (terminate_on_end=False)."""
    return _qlearning(raw, max_episode_steps, name)[0]


def _qlearning(raw: dict[str, np.ndarray], max_episode_steps: int | None, name: str) -> tuple[Transitions, str]:
    """`qlearning_transitions`, and a sentence saying how many rows were read, kept, and dropped why."""
    obs = np.asarray(raw["observations"])
    actions = np.asarray(raw["actions"])
    rewards = np.asarray(raw["rewards"])
    terminals = np.asarray(raw["terminals"])
    rewards = rewards.reshape(-1) if rewards.ndim == 2 and rewards.shape[1] == 1 else rewards
    terminals = terminals.reshape(-1) if terminals.ndim == 2 and terminals.shape[1] == 1 else terminals
    n = obs.shape[0]
    if obs.ndim != 2 or actions.ndim != 2:
        raise UserError(f"{name}: observations and actions must be 2-D, got {obs.shape} and {actions.shape}")
    for key in ("actions", "rewards", "terminals", "timeouts", "next_observations"):
        if key in raw and len(raw[key]) != n:
            raise UserError(f"{name}: '{key}' has {len(raw[key])} rows but 'observations' has {n}; the arrays must align")
    if rewards.ndim != 1 or terminals.ndim != 1:
        raise UserError(f"{name}: rewards and terminals must be (N,), got {rewards.shape} and {terminals.shape}")
    if "next_observations" in raw and raw["next_observations"].shape != obs.shape:
        raise UserError(f"{name}: next_observations {raw['next_observations'].shape} != observations {obs.shape}")
    if n < 2:
        raise UserError(f"{name}: needs at least 2 rows, has {n}")

    terminals = terminals.astype(bool)
    if "timeouts" in raw:
        timeouts, flagged = np.asarray(raw["timeouts"]).reshape(n).astype(bool), "flagged in 'timeouts'"
    elif max_episode_steps is not None:
        timeouts = _inferred_timeouts(terminals, max_episode_steps)
        flagged = f"counted every {max_episode_steps} steps (max_episode_steps; the file has no 'timeouts')"
    else:
        timeouts, flagged = np.zeros(n, dtype=bool), ""
    next_obs = np.asarray(raw["next_observations"]) if "next_observations" in raw else np.concatenate([obs[1:], obs[-1:]])

    keep = ~timeouts  # a time-out row that is also a terminal is dropped too, as in d4rl
    keep[-1] = False  # d4rl iterates range(N - 1)
    rows = (f"{n} rows read, {int(keep.sum())} kept as transitions (d4rl.qlearning_dataset's rules: "
            + (f"{int(timeouts[:-1].sum())} time-out row(s) dropped, {flagged}, since the transition that crosses a "
               "time-out ends in the next episode; " if flagged else "")
            + "the last row dropped, it has no next row)")
    if not keep.any():
        raise UserError(f"{name}: no usable transition: {rows}. Training needs rows that are neither time-outs nor the last.")
    out = Transitions(
        obs=obs[keep].astype(np.float32),
        action=actions[keep].astype(np.float32),
        reward=rewards[keep].astype(np.float32),
        next_obs=next_obs[keep].astype(np.float32),
        done=terminals[keep].astype(np.float32),
    )
    validate(out, name)
    return out, rows


def _inferred_timeouts(terminals: np.ndarray, max_episode_steps: int) -> np.ndarray:
    """d4rl's episode-step counter for files without 'timeouts', kept literally (quirks included:
    after a terminal the counter restarts at 1, after a time-out at 0). Only old files need it."""
    timeouts = np.zeros(terminals.shape[0], dtype=bool)
    step = 0
    for i, terminal in enumerate(terminals):
        if step == max_episode_steps - 1:
            timeouts[i], step = True, 0
            continue
        step = 1 if terminal else step + 1
    return timeouts


# ---------------------------------------------------------------- AntMaze v0 time-out fix (begin)
_ANTMAZE_V0_FILES = {D4RL_DATASETS[f"antmaze-{split}-v0"][0].split("/")[-1] for split in _ANTMAZE}
ANTMAZE_DT = 0.1  # seconds per env step in D4RL's AntMaze (timestep 0.02 x frame_skip 5)
ANTMAZE_JUMP = 0.5  # metres; within an episode the residual below stays under ~0.05


def antmaze_v0_fix_timeouts(raw: dict[str, np.ndarray], max_episode_steps: int | None, name: str = "dataset") -> dict:
    """AntMaze v0 files mark time-outs out of sync with the real episode ends (D4RL issue 77), so
    some transitions `observations[i] -> observations[i + 1]` jump from the end of one episode to
    the start of the next. A real boundary is where the ant's x, y move in one 0.1 s step by more
    than its velocities allow: |xy[i+1] - xy[i] - dt (v[i] + v[i+1]) / 2| > ANTMAZE_JUMP, with
    xy = obs[:, 0:2] and v = obs[:, 15:17] (D4RL's 29-D ant observation: qpos[:15], qvel[:14]; the
    free joint's linear velocity is in the world frame). Those rows are added to `timeouts`, so
    `qlearning_transitions` drops them; rows already flagged stay flagged (d4rl drops them too).
    Files with stored `next_observations` are left alone (their transitions are right as stored)."""
    obs = np.asarray(raw["observations"])
    if "next_observations" in raw or obs.ndim != 2 or obs.shape[1] != 29 or obs.shape[0] < 2:
        return raw
    terminals = np.asarray(raw["terminals"]).reshape(-1).astype(bool)
    if "timeouts" in raw:
        timeouts = np.asarray(raw["timeouts"]).reshape(-1).astype(bool)
    elif max_episode_steps is not None:
        timeouts = _inferred_timeouts(terminals, max_episode_steps)
    else:
        timeouts = np.zeros(obs.shape[0], dtype=bool)
    xy, v = obs[:, 0:2].astype(np.float64), obs[:, 15:17].astype(np.float64)
    residual = np.linalg.norm(xy[1:] - xy[:-1] - ANTMAZE_DT * (v[1:] + v[:-1]) / 2, axis=1)
    boundary = np.append(residual > ANTMAZE_JUMP, False)
    new = boundary & ~timeouts
    if new.any():
        warnings.warn(
            f"{name}: AntMaze v0 time-outs are out of sync with the episode ends (D4RL issue 77): "
            f"{int(new.sum())} of {obs.shape[0]} rows jump to another episode without a time-out flag "
            f"(the ant's x, y move more than physically possible in one step); those transitions are "
            f"dropped. {int((timeouts & ~boundary).sum())} of the {int(timeouts.sum())} flagged time-outs "
            "show no such jump (dropped as d4rl does).",
            stacklevel=3,
        )
    return {**raw, "timeouts": timeouts | boundary}


# ---------------------------------------------------------------- AntMaze v0 time-out fix (end)


def validate(t: Transitions, name: str = "dataset") -> None:
    """Raise a clear error on non-finite values or actions outside [-1, 1]."""
    for field in ("obs", "action", "reward", "next_obs"):
        arr = getattr(t, field)
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.nonzero(bad.reshape(arr.shape[0], -1).any(axis=1))[0]
            raise UserError(
                f"{name}: {field} has {bad.sum()} NaN/inf values in {rows.size} rows (first row {rows[0]}); "
                "clean or drop those rows before training"
            )
    worst = float(np.abs(t.action).max()) if t.action.size else 0.0
    if worst > 1.0 + 1e-5:
        raise UserError(
            f"{name}: actions must lie in [-1, 1] (the policies here squash with tanh), but max |a| = {worst:.4g}. "
            "Rescale them to [-1, 1] with the environment's bounds: a' = 2 (a - low) / (high - low) - 1."
        )


def _load_minari(dataset_id: str, download: bool) -> tuple[Transitions, EnvSpec]:
    import minari

    try:
        dataset = minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        if not download:
            raise
        try:
            dataset = minari.load_dataset(dataset_id, download=True)
        except Exception as e:  # minari raises several types when the hub is unreachable
            local = list(minari.list_local_datasets())
            close = difflib.get_close_matches(dataset_id, local + list(D4RL_DATASETS), n=5)
            raise UserError(
                f"Minari dataset {dataset_id!r} is not in the local cache "
                f"({os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}) and could not be "
                f"downloaded ({type(e).__name__}: {e}). On a machine with internet run "
                f"`minari download {dataset_id}` and copy the folder over. Close names: {close or 'none'}."
            ) from e
    obs, next_obs, actions, rewards, dones = [], [], [], [], []
    for episode in dataset.iterate_episodes():
        # Goal-conditioned datasets (AntMaze, Kitchen) store dict observations; they are flattened
        # in the order of gymnasium's `spaces.flatten`, which evaluation's FlattenObservation uses too.
        flat = flatten_observations(dataset.observation_space, episode.observations)
        # Minari stores T+1 observations per episode, so every step, including one that was
        # truncated, has its true next observation.
        obs.append(flat[:-1])
        next_obs.append(flat[1:])
        actions.append(episode.actions)
        rewards.append(episode.rewards)
        dones.append(episode.terminations)
    t = Transitions(
        obs=np.concatenate(obs).astype(np.float32),
        action=np.concatenate(actions).astype(np.float32),
        reward=np.concatenate(rewards).astype(np.float32),
        next_obs=np.concatenate(next_obs).astype(np.float32),
        done=np.concatenate(dones).astype(np.float32),
    )
    low, high = dataset.action_space.low, dataset.action_space.high
    if not (np.all(low == -1.0) and np.all(high == 1.0)):
        # the policies here act in [-1, 1]; evaluation rescales back with gymnasium's RescaleAction
        t = t._replace(action=(2.0 * (t.action - low) / (high - low) - 1.0).astype(np.float32))
    if t.obs.shape[0] == 0:
        raise UserError(f"{dataset_id}: its {len(dones)} episodes hold no steps: no transition to train on")
    validate(t, dataset_id)
    meta = dataset.storage.metadata
    env_spec = dataset.spec.env_spec
    spec = EnvSpec(
        name=dataset_id,
        source="minari",
        obs_dim=t.obs.shape[1],
        act_dim=t.action.shape[1],
        max_episode_steps=getattr(env_spec, "max_episode_steps", None),
        minari_id=dataset_id,
        ref_min_score=meta.get("ref_min_score"),
        ref_max_score=meta.get("ref_max_score"),
        num_transitions=t.obs.shape[0],
        rows=f"{t.obs.shape[0]} steps in {len(dones)} episodes, every one kept (Minari stores each step's next observation)",
    )
    return t, spec


def flatten_observations(space, observations) -> np.ndarray:
    """(T, ...) observations of a (possibly nested Dict) gymnasium space -> (T, flat_dim), in the
    order `gymnasium.spaces.flatten` uses for one observation."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(sub, observations[key]) for key, sub in space.spaces.items()], axis=1)
    observations = np.asarray(observations)
    return observations.reshape(observations.shape[0], -1)


def _unknown_name_message(env: str) -> str:
    ours = sorted(str(p.relative_to(OURS_DIR))[: -len(".hdf5")] for p in OURS_DIR.glob("ours/*/*.hdf5"))
    close = difflib.get_close_matches(env, list(D4RL_DATASETS) + ours, n=5, cutoff=0.5)
    return (
        f"unknown dataset {env!r}. Did you mean: {', '.join(close) if close else '(no close match)'}?\n"
        "Accepted: a D4RL name (e.g. hopper-medium-v2), a Minari id with a slash (e.g. mujoco/hopper/medium-v0), "
        f"a path to a D4RL-format .hdf5 file, or one of this project's datasets: {', '.join(ours) or '(none generated)'}."
    )

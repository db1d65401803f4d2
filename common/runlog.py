"""A training run on disk: `Run` owns the run directory, seeds, logs, checkpoints, the NaN stop, the
progress bar and the final report, so that each algorithm's `main` is its loop:

    run = runlog.Run(ALGO, args, spec, data.fingerprint(raw))    # every check, before any work
    start = run.start({"state": state, "keys": keys})            # fresh, or the resumed checkpoint
    state, keys = start["state"], start["keys"]
    train = run.compile(train_v, dataset, state, keys)
    for num_updates in run.chunks():
        state, keys, metrics = train(dataset, state, keys, num_updates)
        run.log_train(metrics)                                   # stops at the first NaN, naming it
        if run.eval_due:
            run.log_eval(*evaluator.run(policy(state.actor)))
        if run.checkpoint_due:                                   # at every evaluation, and every --checkpoint-every
            run.checkpoint({"state": state, "keys": keys})
    return run.finish()

A run directory holds:
  config.json    algorithm, resolved arguments, data fingerprint, git commit, package versions, command
                 line, and every change made on a resume (`--allow-change`)
  train.csv      one row per (update, seed) at the end of each chunk: training metrics averaged over
                 the chunk, and `updates_per_s` (wall clock: the only value that differs between two
                 runs of the same command)
  eval.csv       one row per (update, seed): evaluation return and normalised score
  returns.npz    raw per-episode evaluation returns, shape (num_evals, num_seeds, episodes)
  checkpoint.eqx the agents (all seeds stacked) and random keys at the last checkpoint: every evaluation,
                 and every --checkpoint-every updates where set
  results.json   final normalised score per seed, mean and std
  <extra>.npz    what the policy needs besides its parameters (e.g. obs_stats.npz)
  .lock          the lock that keeps one process per run directory, with its holder's PID (common/runlock.py)

Crash safety. Every file is replaced whole and atomically (written aside, then renamed), so each is
always either its previous or its next version. The checkpoint, written last at each evaluation (and
every --checkpoint-every updates, a multiple of --log-every, for long runs on machines that stop), is
the commit point: `--resume` cuts train.csv, eval.csv and returns.npz back to the checkpoint's
update, so a crash at any moment loses at most the updates since the last checkpoint and leaves
logs that agree with each other. A fresh start in a directory with no checkpoint (a run killed
before its first one) replaces that run's files.

One process per run directory: `Run` locks an existing directory before its checks read it, and a
fresh run's new directory as soon as it is made, before any file is written; a second process is
refused (`runlock.acquire`). The lock goes with the process.

User errors (bad flags, impossible resumes, unusable or busy run directories, and the data and environment
errors of `common.data` / `common.evaluation`) raise `UserError` before any training; `cli` prints
them as one message and exits with status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from common import runlock, scores
from common.data import EnvSpec
from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["jax", "jaxlib", "equinox", "optax", "blackjax", "tyro", "gymnasium", "mujoco",
            "gymnasium-robotics", "minari", "h5py", "numpy", "wandb"]
# a run's own files: a fresh start in a directory without a checkpoint replaces them
RUN_FILES = ["config.json", "train.csv", "eval.csv", "returns.npz", "checkpoint.eqx", "results.json"]
# settings a resume can never change: they fix which agents exist and what their logs mean
FIXED = {"env", "seed", "num_seeds", "eval_episodes"}
# settings that say where and how to run, not what: a resume may differ in them freely
FREE = {"resume", "track", "run_dir", "allow_change", "wandb_project", "dataset_dir", "checkpoint_every"}
FIRST_CHUNK = 10  # updates in a run's first chunk: a rate and an ETA within seconds of compiling


# --------------------------------------------------------------------------- arguments
# A script declares the range of each of its numeric flags next to its Args, as plain strings (so
# that an algorithm file copied alone still needs nothing from here):
#     RULES = {"batch_size": ">= 1", "actor_lr": "> 0", "discount": "[0, 1]", "tau": "(0, 1]", "target_entropy": "any"}
# ">= x" and "> x" bound from below and ask for a finite number, "[a, b]" / "(a, b]" / "[a, b)" /
# "(a, b)" are intervals (with an infinite end, "[-inf, inf]", infinity is allowed), "any" is any
# finite number. NaN is always refused; None, where a field allows it, always passes (it means "the
# domain's preset decides").
_BOUND = re.compile(r"^(>=|>)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


def rule(text: str) -> tuple[Callable[[Any], bool], str]:
    """The test and the wording ("at least 1", "in (0, 1]") of one declared range (see RULES above).
    The tests compare, never convert to float: a seed may exceed a float's range."""
    if text == "any":
        return (lambda v: -math.inf < v < math.inf), "a finite number"
    if m := _BOUND.match(text):
        op, low = m.group(1), float(m.group(2))
        if op == ">=":
            return (lambda v: low <= v < math.inf), f"at least {low:g}"
        return (lambda v: low < v < math.inf), ("positive and finite" if low == 0 else f"greater than {low:g}")
    if m := _INTERVAL.match(text):
        left, low, high, right = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
        above = (lambda v: v >= low) if left == "[" else (lambda v: v > low)
        below = (lambda v: v <= high) if right == "]" else (lambda v: v < high)
        return (lambda v: above(v) and below(v)), f"in {left}{low:g}, {high:g}{right}"
    raise ValueError(f"not a range: {text!r} (use '>= x', '> x', '[a, b]', '(a, b]', '[a, b)', '(a, b)' or 'any')")


def range_problems(args: Any, rules: dict[str, str]) -> list[str]:
    """One line per field of `args` outside its declared range (fields set to None pass; a tuple's rule
    holds for each of its values)."""
    values = dataclasses.asdict(args)
    unknown = sorted(set(rules) - set(values))
    if unknown:  # a typo in a script's RULES: the script's bug, not the user's
        raise ValueError(f"RULES names fields that {type(args).__name__} does not have: {unknown}")
    bad = []
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    for name, text in rules.items():
        v, (ok, what) = values[name], rule(text)
        if v is None:
            continue
        if isinstance(v, (tuple, list)):
            if not all(number(x) and ok(x) for x in v):
                bad.append(f"each value of {flag(name)} must be {what}, got {' '.join(map(str, v))}")
        elif not number(v) or not ok(v):
            bad.append(f"{flag(name)} must be {what}, got {v}")
    return bad


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check(args: Any, rules: dict[str, str], problems: list[str] = ()) -> None:
    """Raise one UserError listing every argument outside its range in the script's `rules` (its
    RULES, declared beside its Args), plus the script's own `problems` (relations between its fields)."""
    values = dataclasses.asdict(args)
    bad = range_problems(args, rules)
    if values.get("resume") and values.get("run_dir") is None:
        bad.append("--resume needs --run-dir pointing at the interrupted run")
    unknown = [f for f in values.get("allow_change") or [] if f.replace("-", "_") not in values]
    if unknown:
        bad.append(f"--allow-change names no setting of this script: {', '.join(unknown)}")
    every, log = values.get("checkpoint_every"), values.get("log_every")  # a checkpoint falls where a chunk ends,
    if every is not None and log is not None and every >= 1 and log >= 1 and every % log:  # so a resumed run
        bad.append(f"--checkpoint-every ({every}) must be a multiple of --log-every ({log})")  # logs the same chunks
    bad += list(problems)
    if bad:
        raise UserError("invalid arguments:\n  " + "\n  ".join(bad))


def cli(main: Callable[[Any], Any], args_type: type, replaced: dict[str, str] | None = None) -> None:
    """`main(tyro.cli(args_type))`, with every UserError printed as one message, exit status 2.
    `replaced` maps flags of earlier versions to what replaced them: one given is refused with that name."""
    import tyro

    try:
        old = [a.split("=")[0] for a in sys.argv[1:] if a.split("=")[0] in (replaced or {})]
        if old:
            raise UserError(f"{old[0]} no longer exists: use {replaced[old[0]]}")
        main(tyro.cli(args_type))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- seeds and memory
_U32 = 0xFFFFFFFF


def seed_key(seed: int) -> np.ndarray:
    """The raw (uint32[2]) key of any integer seed >= 0: [bits 32-63, bits 0-31], which is exactly
    `jax.random.PRNGKey(seed)` wherever that works (seeds below 2**31; recorded runs keep their keys),
    and beyond 2**64 each further 32 bits are folded in, so that every seed a user can type is its own key."""
    key = np.asarray([(seed >> 32) & _U32, seed & _U32], np.uint32)
    rest = seed >> 64
    while rest:
        key = np.asarray(jax.random.fold_in(key, rest & _U32))
        rest >>= 32
    return key


def seed_keys(seeds: list[int], parts: int = 2) -> jax.Array:
    """(S, parts, 2): `jax.random.split(PRNGKey(seed), parts)` for each seed, for seeds of any size
    (built on the host: jnp.asarray(seeds) overflows int32 from 2**31 on)."""
    return jax.vmap(lambda k: jax.random.split(k, parts))(jnp.asarray(np.stack([seed_key(s) for s in seeds])))


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def memory_limit() -> tuple[int, str] | None:
    """(bytes, what) of the memory a run's arrays can live in: the devices' own memory on a GPU
    (summed over the local devices the seeds spread over), the machine's physical memory on a CPU
    (the total, not what is free now: a refusal must not depend on what else runs); None if unknown."""
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        try:
            stats = [d.memory_stats() or {} for d in devices]
            limit = sum(int(s["bytes_limit"]) for s in stats)
            return limit, f"{len(devices)} {devices[0].platform.upper()} device(s)"
        except (KeyError, TypeError, AttributeError, RuntimeError):
            return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(init: Callable, num_seeds: int, dataset: Any, activations_per_seed: int) -> None:
    """Refuse a run whose seeds clearly cannot fit in memory, before anything is allocated or compiled.
    The estimate is a lower bound: the dataset once, each seed's agent state twice (a chunk's input and
    output; exact, from `init`'s shapes, not run) and `activations_per_seed` bytes (the script's rough
    count of one minibatch's activations). It refuses only when that bound exceeds the memory there is."""
    limit = memory_limit()
    if limit is None:
        return
    available, where = limit
    state = eqx.filter_eval_shape(init, jax.ShapeDtypeStruct((num_seeds, 2), jnp.uint32))
    per_seed = 2 * _nbytes(state) / num_seeds + activations_per_seed
    data_bytes = _nbytes(dataset)
    need = data_bytes + num_seeds * per_seed
    if need > available:
        fit = max(0, int((available - data_bytes) // per_seed))
        gib = lambda b: f"{b / 2**30:.1f} GiB"
        raise UserError(f"--num-seeds {num_seeds} needs at least {gib(need)} of memory ({gib(per_seed)} per seed: its "
                        f"agent state twice and one minibatch's activations; the dataset {gib(data_bytes)}), and "
                        f"{where} hold {gib(available)}: at most {fit} seeds fit at these settings. Use fewer seeds "
                        "(several runs with --seed apart), or smaller --hidden-dim / --batch-size.")


# --------------------------------------------------------------------------- files
def write_atomic(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write `path` aside with `write(file)`, then rename it into place: a crash leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if binary else "w", newline=None if binary else "") as f:
        write(f)
    replace(tmp, path)


def replace(tmp: Path, path: Path) -> None:
    """The commit of every write (os.replace is atomic); one function, so a test can crash here."""
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, default=_jsonable)))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    write_atomic(Path(path), lambda f: np.savez(f, **arrays), binary=True)


def save_checkpoint(run_dir: Path, tree: Any, info: dict | None = None) -> None:
    """The pytree (eqx leaves), then, when given, a JSON note of what it is (sac.py's checkpoints, for
    readers of the run: a resume reads everything it needs from the pytree, the one atomic file)."""
    write_atomic(Path(run_dir) / "checkpoint.eqx", lambda f: eqx.tree_serialise_leaves(f, tree), binary=True)
    if info is not None:
        write_json(Path(run_dir) / "checkpoint.json", info)


def load_checkpoint(run_dir: Path, like: Any) -> tuple[Any, dict]:
    """Load a checkpoint into a pytree with the structure of `like`."""
    path = Path(run_dir) / "checkpoint.eqx"
    if not path.exists():
        raise UserError(f"no checkpoint in {run_dir}; nothing to resume (start without --resume)")
    try:
        tree = eqx.tree_deserialise_leaves(path, like)
    except Exception as e:  # truncated, or written by other settings: equinox raises several types
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged or belongs to "
                        "other settings. Start a new run (another --run-dir).") from None
    info_path = Path(run_dir) / "checkpoint.json"
    return tree, json.loads(info_path.read_text()) if info_path.exists() else {}


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def default_run_dir(algo: str, env: str, seed: int) -> Path:
    """runs/<algo>__<env>__seed<seed>__<time> under the working directory (as CleanRL does)."""
    safe_env = env.replace("/", "_").replace(".hdf5", "")
    return Path.cwd() / "runs" / f"{algo}__{Path(safe_env).name}__seed{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def provenance() -> dict[str, Any]:
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    status = git("status", "--porcelain")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "command": [sys.executable, *sys.argv],
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": versions,
    }


class Logs:
    """Per-seed CSV logs (train.csv, eval.csv; each rewritten whole and atomically) and optional wandb:
    every metric arrives as an array with one value per seed."""

    def __init__(self, run_dir: Path, config: dict, seeds: list[int], track: bool, project: str):
        self.dir, self.seeds = Path(run_dir), seeds
        self.rows = {name: self._read(self.dir / f"{name}.csv") for name in ("train", "eval")}
        self.wandb = None
        if track or os.environ.get("WANDB_MODE") in ("online", "offline"):
            import wandb

            mode = os.environ.get("WANDB_MODE", "online" if track else "disabled")
            self.wandb = wandb.init(project=project, config=config, dir=str(self.dir), mode=mode,
                                    name=self.dir.name, id=self.dir.name, resume="allow")

    @staticmethod
    def _read(path: Path) -> list[list[str]]:
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.reader(f))

    def truncate(self, last_update: int) -> None:
        """Drop the rows logged after `last_update` (the checkpoint a resume starts from)."""
        for name, rows in self.rows.items():
            if rows:
                self.rows[name] = rows[:1] + [r for r in rows[1:] if int(r[0]) <= last_update]
                self._write(name)

    def log(self, group: str, update: int, metrics: dict[str, np.ndarray]) -> None:
        """Add one row per seed to <group>.csv; send per-seed and mean/std values to wandb."""
        metrics = {k: np.asarray(v, dtype=np.float64).reshape(len(self.seeds)) for k, v in metrics.items()}
        rows = self.rows[group]
        if not rows:
            rows.append(["update", "seed", *metrics])
        for i, seed in enumerate(self.seeds):
            rows.append([str(update), str(seed), *(f"{v[i]:.6g}" for v in metrics.values())])
        self._write(group)
        if self.wandb is not None:
            row = {}
            for k, v in metrics.items():
                row.update({f"{group}/seed{s}/{k}": v[i] for i, s in enumerate(self.seeds)})
                row[f"{group}/{k}/mean"], row[f"{group}/{k}/std"] = v.mean(), v.std()
            self.wandb.log(row, step=update)

    def _write(self, group: str) -> None:
        write_atomic(self.dir / f"{group}.csv", lambda f: csv.writer(f).writerows(self.rows[group]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def progress(total: int, initial: int, desc: str):
    """tqdm bar over updates; its rate (it/s) is updates per second."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="upd", dynamic_ncols=True, smoothing=0.1)


def _disk_need(tree: Any) -> int:
    """Bytes a run needs free: the checkpoint twice (the new one is written beside the old) and room for logs."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")]
    return 2 * sum(int(x.nbytes) for x in leaves) + (64 << 20)


# --------------------------------------------------------------------------- the run
def first_checkpoint(args: dict) -> int | None:
    """The update (sac: env step) of a run's first checkpoint, from its settings: the offline scripts
    checkpoint at every evaluation, every --checkpoint-every if set, and at the end; sac every
    --checkpoint-every. None for settings that name none of these (a damaged config.json)."""
    return min((v for k in ("eval_every", "checkpoint_every", "num_updates") if (v := args.get(k))), default=None)


def check_resumable(d: Path, algo: str, unit: str) -> dict:
    """The saved config.json of the `algo` run in `d` that --resume can continue, or a UserError that
    says why it cannot (no run there, a damaged config, another algorithm's run, no checkpoint yet).
    `unit`: what the run counts its checkpoints in (for the message)."""
    if not (d / "config.json").exists():
        what = "does not exist" if not d.exists() else "holds no run (no config.json)"
        raise UserError(f"nothing to resume: {d} {what}. Start without --resume, or point --run-dir at the run.")
    try:
        saved = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d / 'config.json'} is damaged ({e}); this run cannot be resumed: start a new one") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise UserError(f"{d / 'config.json'} is damaged (it holds no run settings); this run cannot be resumed: "
                        "start a new one")
    command = saved.get("command") or []
    found = saved.get("algo") or (Path(command[1]).stem if len(command) > 1 else "?")  # runs from before `algo`
    if found != algo:
        raise UserError(f"{d} holds a {found} run, not a {algo} one: resume it with algorithms/{found}.py")
    first = first_checkpoint(saved["args"])
    if first is None:
        raise UserError(f"{d / 'config.json'} is damaged (it names no checkpoint interval); this run cannot be resumed: "
                        "start a new one")
    if not (d / "checkpoint.eqx").exists():
        raise UserError(f"the run in {d} stopped before its first checkpoint (at {unit} {first}): "
                        "nothing to resume. Start it again without --resume (its logs are replaced).")
    return saved


def settings_at(saved: dict, update: int) -> dict:
    """The settings that wrote a run's checkpoint at `update`, from its config.json (`saved`): its args,
    less the changes made by a resume from that update. A resume writes config.json just before its
    first checkpoint, so a crash between the two leaves the new settings beside the old checkpoint."""
    args = dict(saved["args"])
    for c in reversed(saved.get("changes") or []):
        if c.get("at_update") == update:
            args[c["field"]] = c["from"]
    return args


class Run:
    """One run of `algo` (vmapped seeds) on one dataset: see the module docstring.

    `extra` holds arrays the policy needs besides its parameters (e.g. {"obs_stats": {"mean": ..,
    "std": ..}}), written as <name>.npz when the run starts. `step`: every chunk is a multiple of it
    (TD3+BC's policy delay)."""

    def __init__(self, algo: str, args: Any, spec: EnvSpec, fingerprint: str,
                 extra: dict[str, dict[str, np.ndarray]] | None = None, step: int = 1):
        self.algo, self.args, self.spec, self.step = algo, args, spec, step
        self.seeds = [args.seed + i for i in range(args.num_seeds)]
        self.dir = Path(args.run_dir) if args.run_dir else default_run_dir(algo, args.env, args.seed)
        self.config = {"algo": algo, "args": dataclasses.asdict(args), "data_sha256": fingerprint, "changes": []}
        self.extra = extra or {}
        self.update, self.history = 0, {"updates": [], "returns": []}
        self.last_checkpoint: int | None = None
        if getattr(args, "batch_size", None) is not None and spec.num_transitions is not None \
                and spec.num_transitions < args.batch_size:
            raise UserError(f"{spec.name}: {spec.num_transitions} usable transitions, fewer than one batch "
                            f"(--batch-size {args.batch_size}): {spec.rows or 'as loaded'}. Use a smaller --batch-size, "
                            "or more data.")
        # one process per run directory: locked before the checks read it (a fresh run's new directory
        # is locked in `start`, once made)
        if self.dir.is_dir():
            runlock.acquire(self.dir)
        try:
            if args.resume:
                self._check_resume()
            else:
                self._check_fresh()
        except UserError:
            runlock.release(self.dir)
            raise

    # --- checks, before anything is written
    def _check_fresh(self) -> None:
        d = self.dir
        if (d / "checkpoint.eqx").exists():
            raise UserError(f"{d} already holds a run; pass --resume to continue it, or choose another --run-dir")
        if d.exists() and not d.is_dir():
            raise UserError(f"--run-dir {d} is a file, not a directory")

    def _check_resume(self) -> None:
        d, args = self.dir, self.args
        saved = check_resumable(d, self.algo, "update")
        if saved.get("data_sha256") not in (None, self.config["data_sha256"]):
            raise UserError(
                f"the dataset {args.env} is not the one this run was trained on (sha256 {saved['data_sha256'][:12]}... "
                f"then, {self.config['data_sha256'][:12]}... now): same name, other contents. Resume with the original "
                "data, or start a new run.")
        if not (d / "returns.npz").exists():
            raise UserError(f"{d / 'returns.npz'} is missing (the run's evaluation history): it cannot resume "
                            "consistently. Start a new run.")
        now = json.loads(json.dumps(dataclasses.asdict(args), default=_jsonable))  # as saved: tuples are lists
        changed = {k: (saved["args"].get(k), v) for k, v in now.items() if k not in FREE and saved["args"].get(k) != v}
        allowed = {f.replace("-", "_") for f in args.allow_change}
        fixed = sorted(set(changed) & FIXED)
        if fixed:
            raise UserError("a resume cannot change " + ", ".join(f"{flag(k)} ({changed[k][0]} -> {changed[k][1]})"
                                                                    for k in fixed) + ": start a new run")
        refused = {k: v for k, v in changed.items() if k not in allowed}
        if refused:
            listing = ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in refused.items())
            raise UserError(f"--resume with other settings than the run in {d}: {listing}. Give the saved values, or "
                            f"change them on purpose with --allow-change {' '.join(flag(k)[2:] for k in refused)} "
                            "(recorded in config.json)")
        self.config["changes"] = saved.get("changes", []) + [{"field": k, "from": a, "to": b} for k, (a, b) in changed.items()]
        self.config["created"] = {k: saved.get(k) for k in ("git_commit", "command", "host")}
        self._saved = saved

    # --- start: resume the checkpoint, or write a fresh run's files
    def start(self, like: Any) -> Any:
        """The pytree to train from: the checkpoint's when resuming, else `like`. Writes the run's files."""
        try:
            return self._start(like)
        except UserError:
            runlock.release(self.dir)
            raise

    def _start(self, like: Any) -> Any:
        tree = {**like, "update": jnp.int32(0)}
        if self.args.resume:
            tree, _ = load_checkpoint(self.dir, tree)
            self.update = self.last_checkpoint = int(tree["update"])
            if self.update > self.args.num_updates:  # a budget cannot undo updates already made
                raise UserError(f"--num-updates {self.args.num_updates} is below the checkpoint of the run in {self.dir} "
                                f"(update {self.update}): a run cannot be shortened. Resume with --num-updates "
                                f"{self.update} or more, or start a new run.")
            if self.config["changes"]:
                at = self.update
                for c in self.config["changes"]:
                    c.setdefault("at_update", at)
            returns = np.load(self.dir / "returns.npz")
            keep = returns["updates"] <= self.update  # evaluations after the checkpoint are redone
            self.history = {"updates": [int(u) for u in returns["updates"][keep]], "returns": list(returns["returns"][keep])}
            then = settings_at(self._saved, self.update)  # was the checkpoint at an evaluation?
            at_eval = self.update % then["eval_every"] == 0 or self.update == then["num_updates"]
            evaluated = bool(self.history["updates"]) and self.history["updates"][-1] == self.update
            if at_eval and not evaluated:
                raise UserError(f"{self.dir}: the checkpoint (update {self.update}) has no evaluation in returns.npz "
                                "(a file from another run?). Start a new run.")
            if self.update == self.args.num_updates and not evaluated:  # a run ends with an evaluation
                raise UserError(f"--num-updates {self.args.num_updates} ends the run in {self.dir} at its checkpoint, "
                                "which is not at an evaluation (--checkpoint-every): a run cannot be shortened. "
                                f"Resume with --num-updates above {self.update}, or start a new run.")
            print(f"resuming {self.dir} at update {self.update}")
        else:
            self._make_dir(tree)
        for tmp in self.dir.glob("*.tmp"):  # written aside by a process that died before renaming them
            tmp.unlink()
        if not self.args.resume:
            write_json(self.dir / "config.json", {**self.config, **provenance()})
        # a resume's settings (and changes) are written with its first checkpoint: config.json always
        # describes the settings that lead to the checkpoint, so a resume that fails before one (a NaN)
        # leaves the run as it was
        self._config_pending = bool(self.args.resume)
        self.logs = Logs(self.dir, self.config["args"], self.seeds, self.args.track, self.args.wandb_project)
        if self.args.resume:
            self.logs.truncate(self.update)
        # the evaluation history so far (a fresh run's is empty): there is one for every checkpoint, even
        # one before the first evaluation (--checkpoint-every)
        save_npz(self.dir / "returns.npz", **self._returns_arrays())
        for name, arrays in self.extra.items():
            if not self.args.resume:
                save_npz(self.dir / f"{name}.npz", **arrays)
        print(f"{self.algo} on {self.spec.name} ({self.spec.source}), seeds {self.seeds}, run dir {self.dir}")
        self.bar = None
        return {k: v for k, v in tree.items() if k != "update"}

    def _make_dir(self, tree: Any) -> None:
        d = self.dir
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to the run directory {d} ({e.strerror or e}): choose another --run-dir") from None
        runlock.acquire(d)  # before anything is written in it (and it checks that the directory is writable)
        self._check_fresh()  # again, now that no other process can write here: one may have just ended
        free = shutil.disk_usage(d).free
        if free < _disk_need(tree):
            raise UserError(f"{d} has {free / 2**20:.0f} MiB free; this run needs about {_disk_need(tree) / 2**20:.0f} MiB "
                            "(two checkpoints and its logs): free some space or choose another --run-dir")
        stale = [name for name in RUN_FILES + [f"{n}.npz" for n in self.extra] if (d / name).exists()]
        if stale:  # a run killed before its first checkpoint: its logs describe nothing that survives
            print(f"{d}: replacing the files of a run that stopped before its first checkpoint ({', '.join(stale)})")
            for name in stale:
                (d / name).unlink()

    # --- the loop
    def compile(self, fn: Callable, *args: Any) -> Callable:
        """`fn` compiled ahead of time for these arguments (and a traced chunk length), timed."""
        print(f"compiling {self.algo}'s training chunk for {len(self.seeds)} seeds ...", end=" ", flush=True)
        t = time.perf_counter()
        compiled = fn.lower(*args, jnp.int32(self.step)).compile()
        print(f"done in {time.perf_counter() - t:.1f} s", flush=True)
        return compiled

    def chunks(self) -> Iterator[jax.Array]:
        """The length of each chunk of updates, up to the budget: chunks end at every multiple of
        --log-every and --eval-every and at --num-updates, and a fresh run's first chunk is short (a rate
        and an ETA at once). The chunks depend on those settings only, so a resumed run trains, and logs,
        exactly the chunks of an uninterrupted one. `self.update` is the count at the end of the chunk."""
        a = self.args
        self.bar = progress(a.num_updates, self.update, self.algo)
        while self.update < a.num_updates:
            u = self.update
            end = min((u // a.log_every + 1) * a.log_every, (u // a.eval_every + 1) * a.eval_every, a.num_updates)
            if u == 0:  # a fresh run's first chunk (a resume keeps the uninterrupted run's chunks)
                end = min(end, -(-FIRST_CHUNK // self.step) * self.step)
            self._chunk_start, self._chunk_len = time.perf_counter(), end - u
            self.update = end
            yield jnp.int32(end - u)
        self.bar.close()

    def log_train(self, metrics: dict) -> None:
        """Check a chunk's metrics ({"mean", "first_nonfinite": per metric; "params_finite"}, each per
        seed), then log the means and the chunk's updates per second."""
        metrics = jax.tree.map(np.asarray, metrics)  # waits for the chunk
        rate = self._chunk_len / (time.perf_counter() - self._chunk_start)
        start = self.update - self._chunk_len
        for name, first in metrics["first_nonfinite"].items():
            if (first < self._chunk_len).any():
                i = int(np.argmin(first))
                self._stop(f"non-finite {name} for seed {self.seeds[i]} at update {start + int(first[i]) + 1}")
        if not metrics["params_finite"].all():
            i = int(np.argmin(metrics["params_finite"]))
            self._stop(f"non-finite parameters for seed {self.seeds[i]} by update {self.update}")
        self.logs.log("train", self.update, {**metrics["mean"], "updates_per_s": np.full(len(self.seeds), rate)})
        self.bar.update(self._chunk_len)

    @property
    def eval_due(self) -> bool:
        return self.update % self.args.eval_every == 0 or self.update == self.args.num_updates

    @property
    def checkpoint_due(self) -> bool:
        every = self.args.checkpoint_every
        return self.eval_due or (every is not None and self.update % every == 0)

    def log_eval(self, returns: np.ndarray, lengths: np.ndarray) -> None:
        """One evaluation ((seeds, episodes) returns and lengths): eval.csv and returns.npz."""
        self.history["updates"].append(self.update)
        self.history["returns"].append(returns)
        metrics = {"return": returns.mean(1), "episode_length": lengths.mean(1)}
        if self.spec.ref_min_score is not None:
            metrics["score"] = scores.normalized(returns, self.spec.ref_min_score, self.spec.ref_max_score,
                                                 self.spec.name).mean(1)
        self.logs.log("eval", self.update, metrics)
        save_npz(self.dir / "returns.npz", **self._returns_arrays())
        self.bar.set_postfix({k: f"{v.mean():.1f}" for k, v in metrics.items() if k != "episode_length"})

    def _returns_arrays(self) -> dict[str, np.ndarray]:
        S, E = len(self.seeds), self.args.eval_episodes
        returns = np.stack(self.history["returns"]) if self.history["returns"] else np.zeros((0, S, E))
        return {"updates": np.asarray(self.history["updates"], np.int64), "returns": returns}

    def checkpoint(self, tree: Any) -> None:
        """The commit point: the agents and keys at this update (written after this update's logs)."""
        if self._config_pending:  # before the checkpoint: a crash between the two leaves the new settings
            write_json(self.dir / "config.json", {**self.config, **provenance()})  # recorded from the old checkpoint on
            self._config_pending = False
        tree = {**tree, "update": jnp.int32(self.update)}  # the checkpoint carries its own update count
        save_checkpoint(self.dir, tree)
        self.last_checkpoint = self.update

    def _stop(self, what: str) -> None:
        self.bar.close()
        self.logs.close()
        runlock.release(self.dir)
        if self.last_checkpoint is not None:
            act = (f"the last good checkpoint (update {self.last_checkpoint}) is in {self.dir}. To continue from it with other settings, "
                   f"name them: --resume --run-dir {self.dir} --allow-change critic-lr --critic-lr <lower>")
        else:
            act = (f"no checkpoint was written yet (the first is at update {first_checkpoint(vars(self.args))}). Start again with "
                   "other settings (e.g. a lower learning rate or cleaner data); the same --run-dir is fine, its logs are replaced")
        raise UserError(f"{what}. Training stopped; {act}.")

    # --- the end
    def finish(self) -> dict:
        """Print the final score per seed and mean +- std; write results.json."""
        spec, seeds = self.spec, self.seeds
        returns = self.history["returns"][-1]  # (S, E) at the last evaluation
        has_ref = spec.ref_min_score is not None
        per_seed = (scores.normalized(returns, spec.ref_min_score, spec.ref_max_score, spec.name) if has_ref else returns).mean(1)
        label = "normalised score" if has_ref else "return (no reference scores for this dataset)"
        print(f"\nfinal {label} on {spec.name} after {self.history['updates'][-1]} updates, {returns.shape[1]} episodes per seed")
        for s, v in zip(seeds, per_seed):
            print(f"  seed {s:>4}: {v:8.2f}")
        print(f"  mean +- std: {per_seed.mean():.2f} +- {per_seed.std():.2f}")
        results = {"env": spec.name, "source": spec.source, "updates": self.history["updates"][-1], "seeds": seeds,
                   "metric": label, "final_per_seed": per_seed.tolist(), "final_mean": float(per_seed.mean()),
                   "final_std": float(per_seed.std()), "episodes_per_seed": int(returns.shape[1])}
        write_json(self.dir / "results.json", results)
        self.logs.close()
        runlock.release(self.dir)
        return results

"""Run directory, per-seed CSV logs, optional wandb, progress bar, atomic checkpoints.

A run directory holds:
  config.json    resolved arguments, git commit, package versions, command line
  train.csv      one row per (update, seed): training metrics averaged over the logging chunk
  eval.csv       one row per (update, seed): evaluation return and normalised score
  returns.npz    raw per-episode evaluation returns, shape (num_evals, num_seeds, episodes)
  checkpoint.eqx the agents (all seeds stacked) at the last evaluation, + checkpoint.json
  results.json   final normalised score per seed, mean and std

`resume_or_start` (a new run directory, or the state of an interrupted one), `record_evaluation`
(log + returns.npz), `check_finite` (stop at the first NaN/inf loss or parameter, naming seed and
update) and `report` (the final table) are shared by every algorithm script.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from common import scores
from common.data import EnvSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["jax", "jaxlib", "equinox", "optax", "distrax", "blackjax", "tyro", "gymnasium", "mujoco",
            "gymnasium-robotics", "minari", "h5py", "numpy", "wandb"]


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


class Run:
    """Logging for a vmapped run: every metric arrives as an array with one value per seed."""

    def __init__(self, run_dir: Path, args: Any, seeds: list[int], track: bool, project: str,
                 resume_update: int | None = None):
        self.dir, self.seeds = Path(run_dir), seeds
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        if resume_update is None:
            write_json(self.dir / "config.json", {"args": self.config, **provenance()})
        else:
            for name in ("train", "eval"):  # drop rows logged after the checkpoint we resume from
                self._truncate(self.dir / f"{name}.csv", resume_update)
        self.wandb = None
        if track or os.environ.get("WANDB_MODE") in ("online", "offline"):
            import wandb

            mode = os.environ.get("WANDB_MODE", "online" if track else "disabled")
            self.wandb = wandb.init(project=project, config=self.config, dir=str(self.dir), mode=mode,
                                    name=self.dir.name, id=self.dir.name, resume="allow")

    def log(self, group: str, update: int, metrics: dict[str, np.ndarray]) -> None:
        """Append one row per seed to <group>.csv; send per-seed and mean/std values to wandb."""
        metrics = {k: np.asarray(v, dtype=np.float64).reshape(len(self.seeds)) for k, v in metrics.items()}
        path = self.dir / f"{group}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["update", "seed", *metrics])
            for i, seed in enumerate(self.seeds):
                writer.writerow([update, seed, *(f"{v[i]:.6g}" for v in metrics.values())])
        if self.wandb is not None:
            row = {}
            for k, v in metrics.items():
                row.update({f"{group}/seed{s}/{k}": v[i] for i, s in enumerate(self.seeds)})
                row[f"{group}/{k}/mean"], row[f"{group}/{k}/std"] = v.mean(), v.std()
            self.wandb.log(row, step=update)

    @staticmethod
    def _truncate(path: Path, last_update: int) -> None:
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if int(r[0]) <= last_update]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def progress(total: int, initial: int, desc: str):
    """tqdm bar over updates; its rate (it/s) is updates per second."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="upd", dynamic_ncols=True, smoothing=0.1)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def save_checkpoint(run_dir: Path, tree: Any, info: dict) -> None:
    """Serialise `tree` (eqx) and `info` (JSON) atomically: a crash leaves the previous pair intact."""
    tmp = run_dir / "checkpoint.eqx.tmp"
    eqx.tree_serialise_leaves(tmp, tree)
    os.replace(tmp, run_dir / "checkpoint.eqx")
    write_json(run_dir / "checkpoint.json", info)


def load_checkpoint(run_dir: Path, like: Any) -> tuple[Any, dict]:
    """Load a checkpoint into a pytree with the structure of `like`."""
    path = Path(run_dir) / "checkpoint.eqx"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir}; nothing to resume (start without --resume)")
    info = json.loads((Path(run_dir) / "checkpoint.json").read_text())
    return eqx.tree_deserialise_leaves(path, like), info


def resume_or_start(run_dir: Path, args: Any, like: Any) -> tuple[Any, int, dict]:
    """(checkpointed pytree, update count, evaluation history) of the interrupted run in `run_dir`
    when `args.resume`, else (`like`, 0, empty history) after checking `run_dir` holds no run.
    Resuming with other settings than the saved ones (besides the budget and logging) is refused."""
    history: dict[str, list] = {"updates": [], "returns": []}
    if not args.resume:
        if (run_dir / "checkpoint.eqx").exists():
            raise SystemExit(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        return like, 0, history
    saved = json.loads((run_dir / "config.json").read_text())["args"]
    changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(args).items()
               if k not in ("resume", "num_updates", "track", "run_dir") and saved.get(k) != v}
    if changed:
        raise SystemExit(f"--resume with different settings than the run in {run_dir}: {changed}")
    tree, _ = load_checkpoint(run_dir, like)
    saved_returns = np.load(run_dir / "returns.npz")
    history = {"updates": list(saved_returns["updates"]), "returns": list(saved_returns["returns"])}
    update_count = int(tree["update"])
    print(f"resuming {run_dir} at update {update_count}")
    return tree, update_count, history


def record_evaluation(returns: np.ndarray, lengths: np.ndarray, spec: EnvSpec, update_count: int,
                      history: dict, run: "Run", run_dir: Path) -> dict[str, np.ndarray]:
    """Append one evaluation ((seeds, episodes) returns and lengths) to the history, eval.csv and
    returns.npz; returns its per-seed metrics."""
    history["updates"].append(update_count)
    history["returns"].append(returns)
    metrics = {"return": returns.mean(1), "episode_length": lengths.mean(1)}
    if spec.ref_min_score is not None:
        metrics["score"] = scores.normalized(returns, spec.ref_min_score, spec.ref_max_score, spec.name).mean(1)
    run.log("eval", update_count, metrics)
    save_npz(run_dir / "returns.npz", updates=np.asarray(history["updates"]), returns=np.stack(history["returns"]))
    return metrics


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, atomically."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def check_finite(metrics: dict, seeds: list[int], update_count: int, per_step: int, run_dir: Path) -> None:
    """Stop at the first non-finite loss or parameter, naming the seed and the update."""
    steps = {k: v for k, v in metrics.items() if k != "params_finite"}  # each (S, T)
    chunk_end = update_count + next(iter(steps.values())).shape[1] * per_step
    for name, values in steps.items():
        if not np.isfinite(values).all():
            i, t = np.argwhere(~np.isfinite(values))[0]
            stop(f"non-finite {name} for seed {seeds[i]} at update {update_count + (t + 1) * per_step}", run_dir)
    if not metrics["params_finite"].all():
        i = int(np.argmin(metrics["params_finite"]))
        stop(f"non-finite parameters for seed {seeds[i]} by update {chunk_end}", run_dir)


def stop(what: str, run_dir: Path) -> None:
    raise SystemExit(
        f"{what}. Training stopped; the last good checkpoint is in {run_dir}. Fix the cause (e.g. a lower "
        f"learning rate or cleaner data), then continue with --resume --run-dir {run_dir}.")


def report(history: dict, spec: EnvSpec, seeds: list[int], run_dir: Path) -> dict:
    """Print the final score per seed and mean +- std; write results.json."""
    returns = history["returns"][-1]  # (S, E) at the last evaluation
    has_ref = spec.ref_min_score is not None
    per_seed = (scores.normalized(returns, spec.ref_min_score, spec.ref_max_score, spec.name) if has_ref else returns).mean(1)
    label = "normalised score" if has_ref else "return (no reference scores for this dataset)"
    print(f"\nfinal {label} on {spec.name} after {history['updates'][-1]} updates, {returns.shape[1]} episodes per seed")
    for s, v in zip(seeds, per_seed):
        print(f"  seed {s:>4}: {v:8.2f}")
    print(f"  mean +- std: {per_seed.mean():.2f} +- {per_seed.std():.2f}")
    results = {"env": spec.name, "source": spec.source, "updates": history["updates"][-1], "seeds": seeds,
               "metric": label, "final_per_seed": per_seed.tolist(), "final_mean": float(per_seed.mean()),
               "final_std": float(per_seed.std()), "episodes_per_seed": int(returns.shape[1])}
    write_json(run_dir / "results.json", results)
    return results

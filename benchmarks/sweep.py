"""Sweep runner: every (variant, dataset) pair of a named sweep, one run directory each, resumable.

    python benchmarks/sweep.py run cpu-hopper            # train (skips finished runs, resumes the rest)
    python benchmarks/sweep.py run cpu-hopper --dry-run  # print the commands only
    python benchmarks/sweep.py wandb cpu-hopper          # write results/sweeps/cpu-hopper.yaml for `wandb sweep`
    python benchmarks/sweep.py slurm paper --partition gpu --time-min 1440   # a SLURM job array via submitit
    python benchmarks/report.py                          # results/README.md from the summaries

A run is the algorithm script itself, launched as a user would, with `--num-seeds` seeds vmapped
in one process, into `runs/sweeps/<sweep>/<variant>/<dataset>`. When a run finishes, a small
summary (config, learning curve per seed, final scores, wall time, machine) is written to
`results/summaries/<sweep>/<variant>__<dataset>.json`; the summaries are committed and the report
is built from them alone. Sweeps are defined below, so the command line that made a table names
everything that went into it.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import tyro

from common import runlock
from common.data import D4RL_DATASETS, domain_of

if TYPE_CHECKING:  # imported where used: `run`, `list` and the report do without it
    import submitit

ROOT = Path(__file__).resolve().parents[1]
# run directories (checkpoints, logs; not committed): runs/sweeps here, or under --runs-root / $MISA_RUNS_ROOT,
# a folder outside the checkout for runs that outlive it (e.g. ~/misa-runs)
RUNS = Path(os.environ.get("MISA_RUNS_ROOT") or ROOT / "runs").expanduser() / "sweeps"
SUMMARIES = ROOT / "results" / "summaries"  # one small JSON per finished run: committed
HOPPER_SPLITS = [f"ours/Hopper-v5/{s}" for s in ("random", "medium", "medium-replay", "medium-expert", "expert")]


def d4rl(domain: str, version: str, splits: tuple[str, ...] | None = None,
         tasks: tuple[str, ...] | None = None) -> list[str]:
    """The D4RL names of common.data's registry in `domain` with this version, splits and tasks (None: all)."""
    def keep(name: str) -> bool:
        task, _, rest = name.partition("-")
        return (domain_of(name) == domain and rest.endswith("-" + version)
                and (splits is None or rest.removesuffix("-" + version) in splits) and (tasks is None or task in tasks))
    return [name for name in D4RL_DATASETS if keep(name)]


# the paper's Table 1 datasets
D4RL_LOCOMOTION = d4rl("locomotion", "v2", ("medium", "medium-replay", "medium-expert"),
                       ("halfcheetah", "hopper", "walker2d"))
D4RL_ANTMAZE = d4rl("antmaze", "v0")
D4RL_ADROIT = d4rl("adroit", "v1", ("human", "cloned"))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """variants x datasets; a variant is an algorithm file plus flags."""

    description: str
    datasets: list[str]
    variants: dict[str, str]  # label -> "algo --flag value ..."
    num_seeds: int = 5
    num_updates: int = 1_000_000
    eval_every: int = 10_000
    log_every: int = 1000
    checkpoint_every: int | None = None  # checkpoints between evaluations too (runs longer than a machine's stay)
    common_flags: str = ""  # passed to every run (e.g. a smaller network for a CPU budget)
    smoke: bool = False  # a smoke budget: shows the pipeline runs, not performance; the report keeps it out of the main table
    diagnostic: bool = False  # measures a mechanism (e.g. the sampler), not a benchmark: its own section of the report
    title: str | None = None  # the report's heading for this sweep (default: its name)
    # (X, Y) pairs of variant labels or algorithms: the report gives P(X > Y) over the grid
    comparisons: tuple[tuple[str, str], ...] = (("misa", "cql"), ("misa", "td3_bc"))


ALGOS = {"td3_bc": "td3_bc", "cql": "cql", "misa": "misa", "misa_dv": "misa_dv", "misa_f": "misa_f"}
# The paper's Table 2, mapped to flags of misa.py (see shared research notes: k = samples per state,
# BI = HMC burn-in, BA = the Barber-Agakov log-likelihood term of the policy loss).
TABLE2 = {
    "misa k=5": "misa --num-samples 5",
    "misa k=20": "misa --num-samples 20",
    "misa BI=1": "misa --hmc-burnin 1",
    "misa BA only": "misa --objective ba",
    "misa no BA": "misa --objective no-ba",
    "misa-f": "misa_f",
    "misa-dv": "misa_dv",
    "misa biased": "misa --objective misa-biased",
    "misa": "misa",
}
# What this 2-core CPU can afford: 64-wide networks, K = 10 samples (MISA's and CQL's default is
# 50 / 10), 1000 updates. That is 0.1 % of the paper's budget: these runs show the pipeline and
# the early learning phase, not final performance: smoke runs.
CPU_BUDGET = dict(num_seeds=5, num_updates=1000, eval_every=250, log_every=250,
                  common_flags="--hidden-dim 64 --eval-episodes 10", smoke=True)
LEARNING_BUDGET = dict(num_seeds=3, num_updates=20_000, eval_every=1000, log_every=500)
# checkpoints every 500 updates (~15 min for MISA's 3 seeds on 2 cores): a stop loses at most that
LONG_BUDGET = dict(num_seeds=3, num_updates=50_000, eval_every=2500, log_every=500, checkpoint_every=500)
SWEEPS = {
    "cpu-hopper": Sweep(
        "every algorithm on the five splits of ours/Hopper-v5 (this project's datasets, not D4RL), CPU budget",
        HOPPER_SPLITS,
        {"td3_bc": "td3_bc", "cql": "cql", "misa": "misa --num-samples 10", "misa_dv": "misa_dv --num-samples 10",
         "misa_f": "misa_f --num-samples 10"},
        **CPU_BUDGET),
    "cpu-hopper-ablations": Sweep(
        "the MISA ablations of the paper's Table 2 on two ours/Hopper-v5 splits, CPU budget "
        "(K = 10 unless the variant sets it; 500 updates, half the grid's, so compare within this table)",
        ["ours/Hopper-v5/medium", "ours/Hopper-v5/medium-replay"],
        {label: (v + " --num-samples 10" if "num-samples" not in v else v) for label, v in TABLE2.items()},
        **{**CPU_BUDGET, "num_updates": 500}),  # half the grid's budget: 18 MISA runs; its own MISA column
    "first-run": Sweep(
        "README's first run: TD3+BC on the embedded dataset with the script's defaults but 2 seeds and 5k "
        "updates (minutes on a laptop CPU); a short budget, so it is kept out of the main table",
        ["ours/Hopper-v5/medium"], {"td3_bc": "td3_bc"},
        num_seeds=2, num_updates=5000, eval_every=1000, log_every=1000, smoke=True),
    "hmc-adaptation": Sweep(
        "MISA's HMC sampler in training, with and without step-size adaptation (issue: the fixed step of "
        "one policy std stalls as Q sharpens); full width, K = 10 for this CPU",
        ["ours/Hopper-v5/medium-replay"],
        {"misa adaptive step": "misa --num-samples 10", "misa fixed step": "misa --num-samples 10 --no-hmc-adapt"},
        num_seeds=2, num_updates=20_000, eval_every=2000, log_every=500, diagnostic=True),
    "budget-check": Sweep(
        "TD3+BC for five times the learning budget (100k updates), to see whether its curves have flattened "
        "by 20k where the learning-budget curves leave doubt (medium-expert still rises at 20k)",
        ["ours/Hopper-v5/medium-expert", "ours/Hopper-v5/medium-replay", "ours/Hopper-v5/medium"], {"td3_bc": "td3_bc"},
        num_seeds=3, num_updates=100_000, eval_every=5000, log_every=2500, diagnostic=True),
    # The results grid: the paper's width, the same number of updates for every algorithm, >= 3 seeds.
    # 20k is NOT a plateau: budget-check measured TD3+BC still rising after it (medium-replay 9.7 at 20k,
    # 24.1 at 100k; medium-expert 62.0 -> 84.3), so a plateau budget is >= 100k updates, ~8 h per CQL or
    # MISA cell on 2 CPU cores: a GPU budget. Planned for this
    # 2-core CPU from measured costs (results/speed.md): MISA with K = 10 samples (paper: 50).
    "learning-budget": Sweep(
        "every algorithm at the paper's width and a learning budget on this project's datasets (not D4RL); "
        "MISA variants with K = 10 (paper: 50) for this CPU",
        [f"ours/Hopper-v5/{s}" for s in ("medium-replay", "medium", "medium-expert", "random")]
        + ["ours/AdroitHandDoor-v1/human"],
        {"td3_bc": "td3_bc", "cql": "cql", "misa": "misa --num-samples 10", "misa_dv": "misa_dv --num-samples 10",
         "misa_f": "misa_f --num-samples 10"},
        **LEARNING_BUDGET),
    "learning-budget-ablations": Sweep(
        "the paper's Table 2 ablations and the official code's behaviour (correction samples = dataset actions) "
        "at the learning budget on ours/Hopper-v5/medium-replay; K = 10 unless the variant sets it",
        ["ours/Hopper-v5/medium-replay"],
        {**{label: (v + " --num-samples 10" if "num-samples" not in v else v) for label, v in TABLE2.items()},
         "misa official correction": "misa --num-samples 10 --objective official"},
        **LEARNING_BUDGET),
    # Does MISA learn? At 20k updates every MISA seed sat at 10.2-10.3 while TD3+BC kept rising (24 at
    # 100k): 50k updates, MISA (K = 10, its sampler), its official objective (no sampler), CQL and TD3+BC.
    # ~4 h per CQL / MISA cell on 2 CPU cores: run it with --runs-root outside the checkout.
    "long-budget": Sweep(
        "does MISA learn? MISA, its official objective, CQL and TD3+BC at 50k updates on ours/Hopper-v5/medium-replay "
        "(256x256, 3 seeds; MISA with K = 10, paper: 50). What it cannot show: one dataset, this project's data "
        "(not D4RL), 5 % of the paper's 1M updates",
        ["ours/Hopper-v5/medium-replay"],
        {"misa official objective": "misa --num-samples 10 --objective official", "cql": "cql", "td3_bc": "td3_bc",
         "misa": "misa --num-samples 10"},
        title="Longer budget: does MISA learn?",
        comparisons=(("misa", "cql"), ("misa", "td3_bc"), ("misa", "misa official objective")),
        **LONG_BUDGET),
    "paper": Sweep(
        "the paper's Table 1 grid at the paper's budget (1M updates, default networks): needs GPUs and the D4RL files",
        D4RL_LOCOMOTION + D4RL_ANTMAZE + D4RL_ADROIT,
        dict(ALGOS)),
    "paper-ablations": Sweep(
        "the paper's Table 2 ablations at the paper's budget on gym-locomotion",
        D4RL_LOCOMOTION,
        dict(TABLE2)),
}


# training metrics kept in each summary, where the algorithm logs them (learning dynamics, sampler health)
DIAGNOSTICS = ["q_data", "q_policy", "mi_regulariser", "cql_regulariser", "td_loss", "hmc_acceptance", "hmc_step",
               "hmc_stein_scale", "gamma_1", "alpha", "entropy", "actor_loss", "actor_bc", "actor_q", "actor_correction",
               "updates_per_s"]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def run_dir(sweep: str, label: str, dataset: str) -> Path:
    return RUNS / sweep / slug(label) / slug(dataset)


def summary_path(sweep: str, label: str, dataset: str) -> Path:
    return SUMMARIES / sweep / f"{slug(label)}__{slug(dataset)}.json"


def shown(path: Path) -> str:
    """A run directory as the command line names it: relative to the checkout when inside it."""
    return os.path.relpath(path, ROOT) if path.resolve().is_relative_to(ROOT) else str(path)


def command(sw: Sweep, sweep: str, label: str, dataset: str) -> list[str]:
    algo, *flags = shlex.split(sw.variants[label])
    return ["python", f"algorithms/{algo}.py", "--env", dataset, "--num-seeds", str(sw.num_seeds),
            "--num-updates", str(sw.num_updates), "--eval-every", str(sw.eval_every),
            "--log-every", str(sw.log_every), "--run-dir", shown(run_dir(sweep, label, dataset)),
            *(["--checkpoint-every", str(sw.checkpoint_every)] if sw.checkpoint_every else []),
            *shlex.split(sw.common_flags), *flags]


def checkout_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH: a run (and a submitit job) imports this
    checkout's common/ and benchmarks/, not those of whichever checkout is pip-installed."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def machine() -> str:
    """The devices a run sees, asked of a separate interpreter: the sweep process itself never opens the
    accelerator (a GPU context, or JAX's preallocation, would take memory from the run it launches) and
    starts no JAX threads (it forks the runs)."""
    probe = ("import jax, os, platform; d = jax.devices(); "
             "kind = d[0].device_kind if d[0].platform != 'cpu' else platform.processor() or platform.machine(); "
             "print(f'{len(d)} x {d[0].platform} ({kind}), {os.cpu_count()} CPU cores, {platform.node()}')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def summarise(sweep: str, label: str, dataset: str, cmd: list[str], wall_s: float, where: str, smoke: bool) -> dict:
    """What the report needs from a finished run directory, small enough to commit."""
    rd = run_dir(sweep, label, dataset)
    results = json.loads((rd / "results.json").read_text())
    config = json.loads((rd / "config.json").read_text())
    curve: dict[int, dict[int, float]] = {}
    lengths: dict[int, dict[int, float]] = {}  # mean episode length per evaluation and seed
    with open(rd / "eval.csv") as f:
        for row in csv.DictReader(f):
            value = float(row["score"]) if row.get("score") not in (None, "") else float(row["return"])
            curve.setdefault(int(row["update"]), {})[int(row["seed"])] = value
            if row.get("episode_length") not in (None, ""):
                lengths.setdefault(int(row["update"]), {})[int(row["seed"])] = float(row["episode_length"])
    diagnostics: dict[str, dict[int, dict[int, float]]] = {}  # training metrics, per chunk and seed
    with open(rd / "train.csv") as f:
        for row in csv.DictReader(f):
            for name in DIAGNOSTICS:
                if row.get(name) not in (None, ""):
                    diagnostics.setdefault(name, {}).setdefault(int(row["update"]), {})[int(row["seed"])] = float(row[name])
    per_seed = lambda c: {"updates": sorted(c), "per_seed": [[c[u].get(s) for s in results["seeds"]] for u in sorted(c)]}
    return {
        "sweep": sweep, "label": label, "dataset": dataset, "algo": Path(cmd[1]).stem,
        "command": shlex.join(cmd), "args": config["args"], "git_commit": config.get("git_commit"),
        "metric": results["metric"], "seeds": results["seeds"], "episodes_per_seed": results["episodes_per_seed"],
        "final_per_seed": results["final_per_seed"], "final_mean": results["final_mean"], "final_std": results["final_std"],
        "curve": per_seed(curve), "episode_length": per_seed(lengths), "diagnostics": {name: per_seed(c) for name, c in diagnostics.items()},
        "wall_time_s": wall_s, "machine": where, "smoke": smoke, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# libc's prctl, looked up here: the child between fork and exec must not import or load anything
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # In the training process, between fork and exec (Linux): the kernel sends it SIGKILL when the sweep
    # process dies, however it dies (a SIGKILL too), so a killed sweep never leaves a trainer running.
    # The run's checkpoint is its commit point: the next sweep resumes from it.
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != _SWEEP_PID:  # the sweep died before the line above took effect
        os._exit(1)


def _ignore_cluster_signals() -> None:
    # In the training process, between fork and exec. SLURM signals every process of a preempted job
    # (SIGTERM, then submitit's USR2); the run must not die of them before the sweep process has requeued
    # the job. The sweep process then stops it, and the requeued job resumes from the run's last checkpoint.
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


_SWEEP_PID = os.getpid()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what stops a sweep run from a shell or a scheduler
STOP_GRACE_S = 30.0  # a stopped sweep's trainer gets this long to end on the same signal before it is killed


class Stopped(Exception):
    """The sweep process received one of STOP_SIGNALS while a run was training."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _train(cmd: list[str], in_job: bool) -> int:
    """Run one training process to its end and return its exit status. The sweep owns it: on a SIGTERM,
    SIGINT or SIGHUP the sweep sends it SIGTERM and waits for it to end (killing it after STOP_GRACE_S)
    before it exits with that signal's status; a sweep that dies otherwise takes it along
    (`_die_with_parent`). In a submitit job (`in_job`) the job's own handlers keep the cluster's signals,
    and subprocess's cleanup kills the trainer when the job process exits."""
    global _SWEEP_PID
    _SWEEP_PID = os.getpid()
    if in_job or threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        return subprocess.run(cmd, cwd=ROOT, env=checkout_env(),
                              preexec_fn=_ignore_cluster_signals if in_job else _die_with_parent).returncode

    def stop(signum, frame):
        raise Stopped(signum)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=checkout_env(), preexec_fn=_die_with_parent)
    previous: dict = {}
    try:
        for sig in STOP_SIGNALS:  # a signal before this still ends the trainer: with the sweep (_die_with_parent)
            previous[sig] = signal.signal(sig, stop)
        return proc.wait()
    except Stopped as e:
        for sig in STOP_SIGNALS:  # a second signal must not interrupt the wait below
            signal.signal(sig, signal.SIG_IGN)
        print(f"sweep: {e}, stopping the training process {proc.pid} (it resumes from its last checkpoint next time)",
              file=sys.stderr, flush=True)
        proc.terminate()  # SIGTERM whatever the sweep got: it ends the trainer at once, without a traceback
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if proc.poll() is None:  # any other exception: never leave the trainer behind
            proc.kill()
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wall_time(rd: Path) -> tuple[float, str]:
    """Seconds a finished run took and how they were measured: the sweep's own clock (wall_time.json,
    every attempt it ran), else the sum of the run's training chunks in train.csv (from its
    updates_per_s: no compiling or evaluation; a run that finished without the sweep watching it)."""
    seconds = _spent(rd)
    if seconds is not None:
        return seconds, "sweep"
    with open(rd / "train.csv") as f:
        rows = list(csv.DictReader(f))
    first = [r for r in rows if r["seed"] == rows[0]["seed"]] if rows else []  # the seeds share every chunk
    seconds, start = 0.0, 0
    for r in first:
        rate = float(r.get("updates_per_s") or "nan")
        if rate > 0:  # False for NaN
            seconds += (int(r["update"]) - start) / rate
        start = int(r["update"])
    return seconds, "train.csv (training chunks only)"


def _spent(rd: Path) -> float | None:
    """The seconds recorded in rd/wall_time.json, or None when it is missing or holds no number."""
    try:
        seconds = float(json.loads((rd / "wall_time.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def run(sweep: str, dry_run: bool = False, only: list[str] | None = None, sw: Sweep | None = None,
        in_job: bool = False) -> list[str]:
    """Run the named sweep (or `sw`, a variation of it, stored under the same name). `in_job`: this is a
    submitit job, whose requeue on preemption (not the training process) handles the cluster's signals.
    Returns what it could not run: runs whose directory another process holds (a run or sweep still
    alive), and runs that failed; the others went on."""
    sw = sw or SWEEPS[sweep]
    where = None  # asked once a run has finished (a subprocess: not needed for dry runs or finished sweeps)
    pairs = [(label, ds) for ds in sw.datasets for label in sw.variants if not only or label in only]
    left: list[str] = []
    for i, (label, dataset) in enumerate(pairs, 1):
        cmd, rd, out = command(sw, sweep, label, dataset), run_dir(sweep, label, dataset), summary_path(sweep, label, dataset)
        head = f"[{i}/{len(pairs)}] {label} on {dataset}"
        if out.exists():
            print(f"{head}: done ({out})")
            continue
        if dry_run:
            print(f"{head}: {shlex.join(cmd)}")
            continue
        busy = runlock.holder(rd)
        if busy is not None:  # never a second process on one run directory: the trainer would refuse it anyway
            print(f"{head}: skipped, its run directory {shown(rd)} is in use by another process ({busy})", flush=True)
            left.append(f"{label} on {dataset} (run directory in use, {busy})")
            continue
        wall_file = rd / "wall_time.json"
        if not (rd / "results.json").exists():
            resume = ["--resume"] if (rd / "checkpoint.eqx").exists() else []
            print(f"{head}: {shlex.join(cmd + resume)}", flush=True)
            spent = _spent(rd) or 0.0
            t = time.time()
            try:
                status = _train([sys.executable, *cmd[1:], *resume], in_job)
            finally:  # an interrupted run keeps the time it has spent, and resumes next time
                rd.mkdir(parents=True, exist_ok=True)
                wall_file.with_name(wall_file.name + ".tmp").write_text(json.dumps({"seconds": spent + time.time() - t}))
                wall_file.with_name(wall_file.name + ".tmp").replace(wall_file)
            if status != 0:  # its own message is above (a refusal, e.g. a directory just taken, exits 2)
                print(f"{head}: the run failed (exit status {status}); see its message above", flush=True)
                left.append(f"{label} on {dataset} (exit status {status})")
                continue
        wall, measured = wall_time(rd)
        where = where or machine()
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = {**summarise(sweep, label, dataset, cmd, wall, where, sw.smoke), "wall_time_measured_by": measured}
        out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{head}: {wall / 60:.1f} min, summary in {out}", flush=True)
    return left


def wandb_sweep(sweep: str) -> Path:
    """A wandb grid over the same (variant, dataset) pairs; each agent runs `run-one` of this file."""
    sw = SWEEPS[sweep]
    lines = [f"# {sw.description}", f"# generated by: python benchmarks/sweep.py wandb {sweep}",
             f"# use: wandb sweep {Path('results/sweeps') / (sweep + '.yaml')}; then `wandb agent <id>` on each machine",
             f"name: {sweep}", "program: benchmarks/sweep.py", "method: grid",
             "command:", *(f"  - {c}" for c in ("${env}", "python", "${program}", "run-one", json.dumps(sweep), "${args}")),
             "parameters:",
             "  label:", "    values: [" + ", ".join(json.dumps(v) for v in sw.variants) + "]",
             "  dataset:", "    values: [" + ", ".join(json.dumps(d) for d in sw.datasets) + "]"]
    path = ROOT / "results" / "sweeps" / f"{sweep}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class SweepTask:
    """One (variant, dataset) run of a sweep, as a submitit job: the single run `run-one` does (without
    wandb tracking): skipped when its summary exists, `--resume`d when its run directory has a checkpoint.

    submitit's checkpointing protocol: on preemption or timeout it calls `checkpoint` and requeues what
    that returns, the same run again, which resumes from the checkpoint in its run directory (`--resume`)
    and writes the summary when it finishes."""

    def __init__(self, sweep: str, sw: Sweep, runs: Path, summaries: Path) -> None:
        self.sweep, self.sw = sweep, sw
        self.runs, self.summaries = runs, summaries  # the submitting process's folders, not the job's defaults

    def __call__(self, label: str, dataset: str) -> str:
        global RUNS, SUMMARIES
        RUNS, SUMMARIES = self.runs, self.summaries
        left = run(self.sweep, only=[label], sw=dataclasses.replace(self.sw, datasets=[dataset]), in_job=True)
        if left:
            raise RuntimeError(f"sweep {self.sweep}: not done: {'; '.join(left)}")
        return str(summary_path(self.sweep, label, dataset))

    def checkpoint(self, label: str, dataset: str) -> submitit.helpers.DelayedSubmission:
        import submitit

        # nothing to save here: the training process checkpoints into its run directory (at every evaluation,
        # and every --checkpoint-every updates where the sweep sets it)
        return submitit.helpers.DelayedSubmission(self, label, dataset)


def slurm_sweep(sweep: str, sw: Sweep | None = None, executor: Literal["slurm", "local", "debug"] = "slurm",
                partition: str | None = None, time_min: int = 24 * 60, gpus_per_task: int = 1, cpus_per_task: int = 8,
                mem_gb: float = 32.0, log_folder: Path | None = None, max_timeouts: int = 3,
                dry_run: bool = False) -> list[submitit.Job]:
    """Submit the sweep's unfinished (variant, dataset) runs as one submitit job array, one run per task,
    and return the jobs. `executor` is submitit's cluster: slurm, local (subprocesses here) or debug (in
    this process, when a job's result is asked for). `dry_run`: print what would be submitted."""
    import submitit

    sw = sw or SWEEPS[sweep]
    pairs = [(label, ds) for ds in sw.datasets for label in sw.variants if not summary_path(sweep, label, ds).exists()]
    done = len(sw.datasets) * len(sw.variants) - len(pairs)
    if not pairs:
        print(f"{sweep}: all {done} runs are done")
        return []
    folder = log_folder or ROOT / "runs" / "slurm" / sweep
    if dry_run:
        print(f"{sweep}: would submit {len(pairs)} runs to {executor} ({done} already done), each {gpus_per_task} GPUs, "
              f"{cpus_per_task} CPUs, {mem_gb:g} GB, {time_min} min{f', partition {partition}' if partition else ''}; "
              f"logs in {folder}")
        for label, dataset in pairs:
            print(f"  {shlex.join(command(sw, sweep, label, dataset))}")
        return []
    ex = submitit.AutoExecutor(folder=folder, cluster=executor, slurm_max_num_timeout=max_timeouts,
                               local_max_num_timeout=max_timeouts)
    ex.update_parameters(name=f"sweep-{sweep}", timeout_min=time_min, nodes=1, tasks_per_node=1,
                         gpus_per_node=gpus_per_task, cpus_per_task=cpus_per_task, mem_gb=mem_gb,
                         **({"slurm_partition": partition} if partition else {}))
    labels, datasets = zip(*pairs)
    saved = dict(os.environ)
    os.environ.update(checkout_env())  # jobs take the environment they are submitted with
    try:
        jobs = ex.map_array(SweepTask(sweep, sw, RUNS, SUMMARIES), list(labels), list(datasets))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    print(f"{sweep}: submitted {len(jobs)} runs to {executor} ({done} already done); logs in {folder}")
    for job, (label, dataset) in zip(jobs, pairs):
        print(f"  job {job.job_id}: {label} on {dataset}")
    return jobs


@dataclasses.dataclass
class Cli:
    action: tyro.conf.Positional[Literal["run", "run-one", "wandb", "slurm", "list"]]
    sweep: tyro.conf.Positional[str] = "cpu-hopper"
    dry_run: bool = False
    """print the commands without running them"""
    only: list[str] | None = None
    """run: only these variants (labels), e.g. --only td3_bc cql"""
    label: str | None = None
    """run-one: the variant to run"""
    dataset: str | None = None
    """run-one: the dataset to run it on; run: only this dataset"""
    executor: Literal["slurm", "local", "debug"] = "slurm"
    """slurm: submitit's executor (local: subprocesses on this machine, all at once; debug: in this process, one by one)"""
    partition: str | None = None
    """slurm: the partition (default: the cluster's)"""
    time_min: int = 24 * 60
    """slurm: time limit of each run's job, in minutes; a run that hits it is requeued and resumes"""
    gpus_per_task: int = 1
    """slurm: GPUs per run"""
    cpus_per_task: int = 8
    """slurm: CPU cores per run"""
    mem_gb: float = 32.0
    """slurm: memory per run, in GB"""
    runs_root: str | None = None
    """where run directories go (<root>/sweeps/<sweep>/...; default $MISA_RUNS_ROOT, else runs/ in this checkout):
    a folder outside the checkout keeps long runs when the checkout is replaced"""
    log_folder: str | None = None
    """slurm: submitit's folder for job scripts, pickles and logs (default runs/slurm/<sweep>)"""
    max_timeouts: int = 3
    """slurm: how often a run may be requeued after hitting the time limit (preemptions do not count)"""


def main(cli: Cli) -> None:
    global RUNS
    if cli.runs_root is not None:
        RUNS = Path(cli.runs_root).expanduser().resolve() / "sweeps"
    if cli.action == "list":
        for name, sw in SWEEPS.items():
            print(f"{name}: {len(sw.variants)} variants x {len(sw.datasets)} datasets, {sw.num_updates} updates, "
                  f"{sw.num_seeds} seeds: {sw.description}")
        return
    if cli.sweep not in SWEEPS:
        raise SystemExit(f"unknown sweep {cli.sweep!r}; known: {', '.join(SWEEPS)}")
    sw = SWEEPS[cli.sweep]
    if cli.dataset is not None and cli.action in ("wandb", "slurm"):
        raise SystemExit(f"--dataset is for `run` and `run-one`; `{cli.action}` covers the whole sweep {cli.sweep}")
    if cli.dataset is not None and cli.dataset not in sw.datasets:
        raise SystemExit(f"dataset {cli.dataset!r} is not in sweep {cli.sweep}; its datasets: {', '.join(sw.datasets)}")
    if cli.action == "wandb":
        print(f"wrote {wandb_sweep(cli.sweep).relative_to(ROOT)}")
    elif cli.action == "run":
        unknown = [label for label in cli.only or [] if label not in sw.variants]
        if unknown:
            raise SystemExit(f"unknown variant {', '.join(unknown)} in sweep {cli.sweep}; known: {', '.join(sw.variants)}")
        finish(cli.sweep, lambda: run(cli.sweep, cli.dry_run, only=cli.only,
                                      sw=dataclasses.replace(sw, datasets=[cli.dataset]) if cli.dataset else sw))
    elif cli.action == "slurm":
        slurm_main(cli)
    else:  # run-one: what a wandb agent calls for one grid point
        if cli.label not in sw.variants or cli.dataset is None:
            raise SystemExit(f"run-one needs --label in {list(sw.variants)} and --dataset in {sw.datasets}")
        os.environ.setdefault("WANDB_MODE", "online")
        sw = dataclasses.replace(sw, datasets=[cli.dataset], common_flags=sw.common_flags + " --track")
        finish(cli.sweep, lambda: run(cli.sweep, only=[cli.label], sw=sw))


def finish(sweep: str, go: Callable[[], list[str]]) -> None:
    """`go()`, a sweep's runs, ended as one line: the runs left undone (exit status 1), or the signal that
    stopped it (exit status 128 + its number, as a shell reports it; the trainer has ended by then)."""
    try:
        left = go()
    except Stopped as e:
        print(f"sweep {sweep}: stopped by {e}; run the same command again to resume", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    if left:
        raise SystemExit(f"sweep {sweep}: {len(left)} runs not done: " + "; ".join(left))


def slurm_main(cli: Cli) -> None:
    checks = {"--time-min": (cli.time_min >= 1, "at least 1"), "--gpus-per-task": (cli.gpus_per_task >= 0, "0 or more"),
              "--cpus-per-task": (cli.cpus_per_task >= 1, "at least 1"), "--mem-gb": (cli.mem_gb > 0, "positive"),
              "--max-timeouts": (cli.max_timeouts >= 0, "0 or more")}
    bad = [f"{flag} must be {what}" for flag, (ok, what) in checks.items() if not ok]
    if bad:
        raise SystemExit("; ".join(bad))
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None] if cli.executor == "slurm" and not cli.dry_run else []
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: run this on a SLURM login node, or use --executor "
                         "local to run the jobs on this machine")
    import submitit

    try:
        jobs = slurm_sweep(cli.sweep, executor=cli.executor, partition=cli.partition, time_min=cli.time_min,
                           gpus_per_task=cli.gpus_per_task, cpus_per_task=cli.cpus_per_task, mem_gb=cli.mem_gb,
                           log_folder=Path(cli.log_folder) if cli.log_folder else None, max_timeouts=cli.max_timeouts,
                           dry_run=cli.dry_run)
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError) as e:
        # sbatch refused the array (unknown partition, over a limit...) or answered something unexpected
        raise SystemExit(f"submission failed: {str(e).strip()}")
    if cli.executor == "slurm" or not jobs:
        if jobs:
            print("follow with squeue; when they finish: python benchmarks/report.py")
        return
    # local and debug jobs run here: wait for them, then say which failed
    failed = [job for job in jobs if job.exception() is not None]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(jobs)} runs failed; logs: "
                         + ", ".join(str(job.paths.stderr) for job in failed))
    print(f"all {len(jobs)} runs finished; summaries in {SUMMARIES / cli.sweep}")


if __name__ == "__main__":
    # run as benchmarks.sweep (this checkout's), not __main__: submitit's jobs unpickle SweepTask by module name
    sys.path.insert(0, str(ROOT))
    from benchmarks import sweep as module

    module.main(tyro.cli(module.Cli))

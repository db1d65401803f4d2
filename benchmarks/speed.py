"""Updates per second of an algorithm file's compiled, seed-vmapped training chunk.

    python benchmarks/speed.py --algos td3_bc --num-seeds 1 5 10 --out results/speed.md
    python benchmarks/speed.py --algos misa misa:hmc_chains=parallel misa:objective=misa-biased --num-seeds 1 5 --chunk 10

An entry of --algos is `name` or `name:field=value,field=value` (fields of that file's Args), so
variants of one algorithm (e.g. MISA's two HMC layouts, or MISA without the sampler, which gives
the sampler's share of the update time) are measured side by side. `name@commit` measures the file
as it was at that git commit (e.g. `misa@HEAD~3 misa`: a change's cost, in one run).

For each number of seeds it builds the program with the algorithm's own `make_train`, times the
first chunk (compile + run) and then `--repeats` further chunks of `--chunk` updates, and reports
the median. The dataset is synthetic (Hopper shapes: obs 11, act 3, `--dataset-size` rows); the
update cost does not depend on the values. It also records the machine, the JAX device and the
CPU load of other processes during the measurement, because a busy machine slows everything.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import jax
import jax.numpy as jnp
import numpy as np
import tyro

from common import data

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    algos: list[str] = dataclasses.field(default_factory=lambda: ["td3_bc"])
    """algorithm files under algorithms/ to measure, each optionally with Args overrides (name:k=v,k=v)"""
    num_seeds: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10])
    """numbers of vmapped seeds to measure"""
    chunk: int = 1000
    """updates per timed chunk"""
    repeats: int = 3
    """timed chunks after the first (compile) chunk; the median is reported"""
    dataset_size: int = 100_000
    """rows of the synthetic dataset"""
    out: str | None = "results/speed.md"
    """markdown file to append the table to (a .json with the raw numbers goes beside it)"""


def cpu_seconds_of_others() -> float:
    """Busy CPU seconds of the whole machine minus this process (from /proc)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    own = float(parts[11]) + float(parts[12])  # utime + stime
    return (busy - own) / os.sysconf("SC_CLK_TCK")


def parse(entry: str) -> tuple[str, dict]:
    """'misa:hmc_chains=parallel,num_samples=20' -> ('misa', {'hmc_chains': 'parallel', 'num_samples': 20})"""
    name, _, rest = entry.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return name, overrides


def load_algorithm(name: str):
    """algorithms/<name>.py, or with name@commit the file as it was at that commit."""
    algo, _, commit = name.partition("@")
    if not commit:
        return importlib.import_module(f"algorithms.{algo}")
    source = subprocess.run(["git", "show", f"{commit}:algorithms/{algo}.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{algo}_at_{commit.replace('~', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


OBS_DIM, ACT_DIM = 11, 3  # Hopper's shapes


def synthetic_dataset(n: int) -> data.Transitions:
    """n random transitions with Hopper's shapes (the update cost does not depend on the values)."""
    rng = np.random.default_rng(0)
    return data.Transitions(
        obs=jnp.asarray(rng.normal(size=(n, OBS_DIM)), jnp.float32),
        action=jnp.asarray(rng.uniform(-1, 1, (n, ACT_DIM)), jnp.float32),
        reward=jnp.asarray(rng.normal(size=n), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(n, OBS_DIM)), jnp.float32),
        done=jnp.asarray(rng.random(n) < 0.01, jnp.float32))


def build_args(entry: str, num_seeds: int, log_every: int, num_updates: int, extra: dict | None = None):
    """(module, resolved Args) of `entry` at `num_seeds` seeds; `extra` are Args overrides applied where
    the file has the field (the entry's own win). `log_every` is the chunk length of files from before
    the traced count (`name@commit`)."""
    algo, overrides = parse(entry)
    module = load_algorithm(algo)
    fields = {f.name for f in dataclasses.fields(module.Args)}
    overrides = {**{k: v for k, v in (extra or {}).items() if k in fields}, **overrides}
    args = module.Args(num_seeds=num_seeds, log_every=log_every, eval_every=log_every, num_updates=num_updates,
                       **overrides)
    if hasattr(module, "resolve_args"):  # the locomotion preset (the data are hopper-shaped)
        args = module.resolve_args(args, "locomotion")
    return module, args


def build(entry: str, num_seeds: int, log_every: int, num_updates: int, extra: dict | None = None):
    """(module, resolved args, train_v, initial state, train keys) of `entry` at `num_seeds` vmapped seeds."""
    module, args = build_args(entry, num_seeds, log_every, num_updates, extra)
    init_v, train_v = module.make_train(args, OBS_DIM, ACT_DIM)
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(jnp.arange(num_seeds))
    return module, args, train_v, init_v(keys[:, 0]), keys[:, 1]


def measure(entry: str, num_seeds: int, cfg: Config) -> dict:
    dataset = synthetic_dataset(cfg.dataset_size)
    _, _, train_v, state, train_keys = build(entry, num_seeds, cfg.chunk, 1000 * cfg.chunk)

    count = (jnp.int32(cfg.chunk),)  # the chunk length, traced (older commits' chunks ran log_every updates)

    def chunk():
        nonlocal state, train_keys
        t = time.perf_counter()
        state, train_keys, metrics = train_v(dataset, state, train_keys, *count)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    try:
        first = chunk()
    except TypeError:  # a file from before the traced count (`name@commit`)
        count = ()
        first = chunk()
    others0, wall0 = cpu_seconds_of_others(), time.perf_counter()
    times = [chunk() for _ in range(cfg.repeats)]
    others_load = (cpu_seconds_of_others() - others0) / (time.perf_counter() - wall0)
    median = float(np.median(times))
    return {"algo": entry, "num_seeds": num_seeds, "chunk": cfg.chunk,
            "updates_per_s": cfg.chunk / median, "seed_updates_per_s": cfg.chunk * num_seeds / median,
            "compile_s": first - median, "chunk_s": times, "other_processes_cores": others_load}


def main(cfg: Config) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} on {jax.devices()[0].device_kind}"
    rows = []
    for algo in cfg.algos:
        for s in cfg.num_seeds:
            r = measure(algo, s, cfg)
            rows.append(r)
            print(f"{algo:8s} seeds={s:3d}  {r['updates_per_s']:8.1f} updates/s per seed  "
                  f"{r['seed_updates_per_s']:8.1f} seed-updates/s  compile {r['compile_s']:.1f} s  "
                  f"other load {r['other_processes_cores']:.2f} cores", flush=True)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {machine}\n",
                 f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`\n",
                 "| algorithm | seeds | updates/s (per seed) | seed-updates/s (total) | compile s | other processes (cores busy) |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['algo']} | {r['num_seeds']} | {r['updates_per_s']:.1f} | {r['seed_updates_per_s']:.1f} | "
                  f"{r['compile_s']:.1f} | {r['other_processes_cores']:.2f} |" for r in rows]
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n")
        with open(out.with_suffix(".json"), "a") as f:
            f.write(json.dumps({"machine": machine, "argv": sys.argv[1:], "rows": rows}) + "\n")
        print(f"appended to {out}")


if __name__ == "__main__":
    main(tyro.cli(Config))

"""One unattended command for a lent GPU: every algorithm's speed, compile time and memory at 1 to 50
vmapped seeds, a CPU-GPU agreement check and TD3+BC's wall time for 1M updates, within a wall-time
budget that it enforces itself.

    pip install "jax[cuda12]==0.10.2"        # README, Install
    python benchmarks/gpu_check.py           # at most 8 min on one GPU: results/speed-gpu.md and speed-gpu.json
    python benchmarks/gpu_check.py --tiny --out /tmp/check.md   # the same on a CPU in seconds (tests/test_gpu_check.py)

In this order, so that a budget that runs out cuts the least needed part:
1. MISA's two HMC chain layouts (`--hmc-chains sequential`, `parallel`) at 5 seeds;
2. the first-chunk agreement: the same 5-seed MISA chunk (same data, initial state and keys) on the
   CPU and on the GPU; the largest difference of any state array after it, relative to that array's
   largest magnitude, with float32 matmuls on the GPU (`highest` precision), must be within
   `--agree-factor` times what float32 rounding alone does to the chunk on the CPU (`agreement`);
   the difference at JAX's default precision (TF32 on recent NVIDIA GPUs) is reported beside it.
   With one backend it says "skipped: one backend";
3. TD3+BC at 1 and 10 seeds, then trained for `--long-s` seconds in all (half each), extrapolated to
   1M updates, beside JAX-CORL's published 9 minutes (one seed, GTX 1080 Ti). Meanwhile, with the
   GPU busy and the host idle, a background thread compiles the next rows (labelled so);
4. the rest of the table: MISA at 1, 50 and 10 seeds, `misa --objective official`, CQL, TD3+BC.

Each row is one `benchmarks/speed.py` measurement of the file's own seed-vmapped training chunk on
Hopper-shaped synthetic data at the paper's settings, plus: the compile time on its own (tracing,
lowering and XLA), the first run, the chunk length chosen from a short run so that one timed chunk
takes about `--chunk-s`, XLA's memory plan (arguments + outputs + temporaries), the device's peak
memory in use (JAX's memory_stats; a process-wide maximum, so it is this configuration's peak only
where it rose, otherwise "<=") and the kernels one update launches (from the optimised HLO,
benchmarks/gpu_estimates.py), to compare with the estimates in results/speed.md.

The budget: a measurement starts only if its expected time (the compile time of the same algorithm
so far, or `--compile-guess-s`, plus its runs) ends `--reserve-s` before the budget; the results
file is rewritten after every step, labelled "in progress" while it runs, so even a killed run leaves
a labelled partial table; a watchdog thread writes what there is and exits (status 3) at the budget
if a step overruns. A failing measurement (e.g. out of memory) is recorded and the rest goes on.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here, imports included

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from benchmarks import gpu_estimates, speed  # noqa: E402

JAX_CORL_TD3_BC_1M_MIN = 9.0  # JAX-CORL's README: TD3+BC, 1M updates, one seed, GTX 1080 Ti (not re-run here)
MISA_SEQ, MISA_PAR = "misa:hmc_chains=sequential", "misa:hmc_chains=parallel"


@dataclasses.dataclass
class Config:
    budget_s: float = 480.0
    """wall-time budget of the whole command, from its start (imports included)"""
    reserve_s: float = 15.0
    """seconds kept free at the end of the budget (writing, a step that takes longer than expected)"""
    variants: list[str] = dataclasses.field(default_factory=lambda: [
        "td3_bc", "cql", MISA_SEQ, MISA_PAR, "misa:objective=official"])
    """algorithm files with Args overrides (as in benchmarks/speed.py), each at its paper settings"""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10, 50])
    """numbers of vmapped seeds of the table"""
    chunk_s: float = 0.5
    """target seconds of one timed chunk (its length in updates comes from a short run)"""
    repeats: int = 3
    """timed chunks per row; the median is reported"""
    long_s: float = 120.0
    """seconds of the TD3+BC run, shared equally by --long-seeds"""
    long_seeds: list[int] = dataclasses.field(default_factory=lambda: [1, 10])
    """seed counts of the TD3+BC run"""
    agree_variant: str = MISA_SEQ
    """the variant of the agreement chunk"""
    agree_seeds: int = 5
    """seeds of the agreement chunk"""
    agree_updates: int = 10
    """updates of the agreement chunk (a run's first chunk is 10)"""
    agree_factor: float = 10.0
    """the GPU agrees if its state differs from the CPU's by at most this times float32 rounding's own spread on the CPU"""
    agree_rtol: float = 1e-5
    """the smallest tolerance (relative to each state array's largest |value|), where rounding moves nothing"""
    compile_guess_s: float = 60.0
    """compile time assumed for an algorithm before its first compile (for the budget)"""
    dataset_size: int = 100_000
    """rows of the synthetic dataset"""
    tiny: bool = False
    """the CPU smoke configuration: 32-wide networks, batch 32, K = 4, one burn-in step, and for every
    setting left at its default: 2 seeds, 1000 rows, short chunks, a 1 s TD3+BC run"""
    out: str = "results/speed-gpu.md"
    """markdown file to append this run's section to (a .json with the raw numbers goes beside it)"""


TINY_ARGS = dict(hidden_dim=32, batch_size=32, num_samples=4, hmc_burnin=1)
TINY_DEFAULTS = dict(seeds=[2], long_seeds=[2], long_s=1.0, chunk_s=0.05, repeats=1, agree_seeds=2,
                     agree_updates=2, dataset_size=1000, compile_guess_s=5.0)


class Clock:
    def __init__(self, cfg: Config):
        self.end = T0 + cfg.budget_s
        self.reserve = cfg.reserve_s

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def left(self) -> float:
        """Seconds a new step may still take."""
        return self.end - self.reserve - time.monotonic()


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device": dev.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "cpu_cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "CUDA_VISIBLE"))}}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for dist in ("jax-cuda12-plugin", "jax-cuda12-pjrt"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    stats = memory_stats()
    if stats and "bytes_limit" in stats:
        info["memory_limit_bytes"] = stats["bytes_limit"]
    if dev.platform == "gpu":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired, IndexError) as e:
            info["nvidia_smi"] = f"unavailable ({e.__class__.__name__})"
    return info


def memory_stats() -> dict | None:
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # not every backend has them
        return None


def machine_line(m: dict) -> str:
    gpu = f" ({m['nvidia_smi']})" if "nvidia_smi" in m else ""
    plugin = f", jax-cuda12-plugin {m['jax-cuda12-plugin']}" if "jax-cuda12-plugin" in m else ""
    return (f"{m['device']}{gpu} x {m['device_count']}, JAX {m['jax']} (jaxlib {m['jaxlib']}{plugin}), "
            f"{m['cpu']}, {m['cpu_cores']} cores")


# -------------------------------------------------------------------------------------- measurement
class Program:
    """One variant at one seed count, built and compiled, with its state; `run(n)` times n updates."""

    def __init__(self, entry: str, num_seeds: int, cfg: Config, dataset, device=None, precision: str | None = None,
                 state=None, keys=None):
        t = time.perf_counter()
        self.module, self.args, train_v, state0, keys0 = speed.build(entry, num_seeds, 1_000_000, 1_000_000,
                                                                     TINY_ARGS if cfg.tiny else None)
        self.step = getattr(self.args, "policy_delay", 1)  # updates per loop step: chunk lengths are multiples
        state = state0 if state is None else state
        keys = keys0 if keys is None else keys
        if device is not None:  # computation follows data: commit everything to `device`
            dataset, state, keys = put(dataset, device), put(state, device), put(keys, device)
        self.dataset, self.state, self.keys = dataset, state, keys
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            self.compiled = train_v.lower(dataset, state, keys, jnp.int32(self.step)).compile()
        self.compile_s = time.perf_counter() - t
        xla = self.compiled.compiled
        try:
            mem = xla.memory_analysis()
            self.xla_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        except Exception:
            self.xla_bytes = None
        try:
            self.kernels_per_update = gpu_estimates.step_kernels(xla.as_text())[0] / self.step
        except Exception:
            self.kernels_per_update = None

    def run(self, updates: int) -> float:
        t = time.perf_counter()
        self.state, self.keys, metrics = self.compiled(self.dataset, self.state, self.keys, jnp.int32(updates))
        jax.block_until_ready((self.state, metrics))
        self.metrics = metrics
        return time.perf_counter() - t


def put(tree, device):
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, device), static)


def measure(entry: str, num_seeds: int, cfg: Config, dataset, clock: Clock,
            prog: Program | None = None) -> tuple[dict, Program]:
    """One row; with `prog`, a program compiled in the background during the TD3+BC run."""
    peak0 = (memory_stats() or {}).get("peak_bytes_in_use")
    status = "measured" if prog is None else "measured (compiled during the TD3+BC run)"
    prog = prog or Program(entry, num_seeds, cfg, dataset)
    step = prog.step
    first_s = prog.run(step)
    probe_s = prog.run(2 * step)  # after the first run's one-off costs
    n = step * max(1, round(cfg.chunk_s / (probe_s / (2 * step)) / step))
    others0, wall0 = speed.cpu_seconds_of_others(), time.perf_counter()
    times = []
    for _ in range(cfg.repeats):  # at least one; no further one that would end past the budget
        if times and clock.left() < times[-1]:
            break
        times.append(prog.run(n))
    others = (speed.cpu_seconds_of_others() - others0) / (time.perf_counter() - wall0)
    median = float(np.median(times))
    peak = (memory_stats() or {}).get("peak_bytes_in_use")
    return {"algo": entry, "num_seeds": num_seeds, "chunk": n, "updates_per_s": n / median,
            "seed_updates_per_s": n * num_seeds / median, "compile_s": prog.compile_s, "first_chunk_s": first_s,
            "first_chunk_updates": step, "chunk_s": times, "other_processes_cores": others,
            "xla_memory_bytes": prog.xla_bytes, "device_peak_bytes": peak,
            "device_peak_rose": None if peak is None else peak0 is None or peak > peak0,
            "kernels_per_update": prog.kernels_per_update, "status": status if len(times) == cfg.repeats
            else f"{status}, {len(times)} of {cfg.repeats} timed chunks: budget"}, prog


def long_run(prog: Program, seconds: float, rate: float) -> dict:
    """Train for `seconds` in chunks of about 5 s (none started that would end past it)."""
    n = prog.step * max(1, round(min(5.0, seconds / 4) * rate / prog.step))
    done, spent = 0, 0.0
    while spent + n / rate <= seconds or done == 0:
        dt = prog.run(n)
        done, spent = done + n, spent + dt
        rate = done / spent
    per_1m_s = 1e6 / rate + prog.compile_s
    return {"algo": "td3_bc", "num_seeds": int(prog.args.num_seeds), "updates": done, "seconds": spent,
            "updates_per_s": rate, "seed_updates_per_s": rate * prog.args.num_seeds, "compile_s": prog.compile_s,
            "wall_1m_updates_min": per_1m_s / 60,
            "vs_jax_corl": JAX_CORL_TD3_BC_1M_MIN * prog.args.num_seeds / (per_1m_s / 60)}


class Prefetch(threading.Thread):
    """Compiles the next rows of the plan while the TD3+BC run keeps the GPU busy and the host idle;
    it starts no compile that it expects to end after `until` (monotonic time)."""

    def __init__(self, cells: list[tuple[str, int]], cfg: Config, dataset, until: float, compile_guess):
        super().__init__(daemon=True)
        self.cells, self.cfg, self.dataset, self.until, self.compile_guess = cells, cfg, dataset, until, compile_guess
        self.done: dict[tuple[str, int], Program | Exception] = {}

    def run(self) -> None:
        for entry, seeds in self.cells:
            if time.monotonic() + self.compile_guess(entry) > self.until:
                return
            try:
                self.done[(entry, seeds)] = Program(entry, seeds, self.cfg, self.dataset)
            except Exception as e:  # raised again when its row is measured
                self.done[(entry, seeds)] = e


def agreement(cfg: Config, dataset, measured: Program | None, reference, target) -> dict:
    """The same chunk of --agree-variant (data, initial state, keys) on the `reference` device (the
    CPU) and on the `target` (the GPU), there at float32 matmul precision and at JAX's default (with
    `measured`, the table's program of this size on the target, when there is one).

    The difference of a state array is its largest |target - reference| relative to the reference's
    largest |value|; of the state, the largest over its arrays. What float32 rounding alone does to
    this chunk is measured beside it, on the reference device: each seed trained alone (a 1-seed
    program, whose matmuls round in another order than the vmapped one's) against the same seed in
    the vmapped chunk; in MISA it is not small, since a rounding difference can flip an HMC accept
    decision. The target agrees if its float32 difference is at most `--agree-factor` times that
    spread (and at least `--agree-rtol` is allowed)."""
    ref = Program(cfg.agree_variant, cfg.agree_seeds, cfg, dataset, device=reference)
    start = ref.state, ref.keys  # made on the reference device: every run starts from these values
    n = ref.step * max(1, cfg.agree_updates // ref.step)
    runs = {"reference": ref,
            "default": measured or Program(cfg.agree_variant, cfg.agree_seeds, cfg, dataset, device=target),
            "float32": Program(cfg.agree_variant, cfg.agree_seeds, cfg, dataset, device=target, precision="highest")}
    results = {}
    for name, prog in runs.items():
        device = reference if name == "reference" else target
        prog.dataset, prog.state, prog.keys = put(dataset, device), put(start[0], device), put(start[1], device)
        prog.run(n)
        results[name] = (jax.device_get(eqx.filter(prog.state, eqx.is_array)), jax.device_get(prog.metrics["mean"]))
    alone = Program(cfg.agree_variant, 1, cfg, dataset, device=reference)
    seeds = []
    for i in range(cfg.agree_seeds):
        one = lambda tree: jax.tree.map(lambda x: x[i:i + 1] if eqx.is_array(x) else x, tree)
        alone.state, alone.keys = put(one(start[0]), reference), put(one(start[1]), reference)
        alone.run(n)
        seeds.append(jax.device_get(eqx.filter(alone.state, eqx.is_array)))
    results["seeds_alone"] = (jax.tree.map(lambda *xs: np.concatenate(xs), *seeds), None)

    def worst(a, b) -> tuple[float, str]:
        rel = {jax.tree_util.keystr(path): float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
               for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))}
        key = max(rel, key=rel.get)
        return rel[key], key

    out = {"status": "", "updates": n, "seeds": cfg.agree_seeds, "factor": cfg.agree_factor, "rtol": cfg.agree_rtol,
           "reference_device": str(reference), "target_device": str(target)}
    for name in ("float32", "default"):
        out[f"{name}_state_rel"], out[f"{name}_worst_array"] = worst(results[name][0], results["reference"][0])
        out[f"{name}_metrics_rel"], out[f"{name}_worst_metric"] = worst(results[name][1], results["reference"][1])
    out["rounding_state_rel"], out["rounding_worst_array"] = worst(results["seeds_alone"][0], results["reference"][0])
    out["tolerance"] = max(cfg.agree_rtol, cfg.agree_factor * out["rounding_state_rel"])
    out["status"] = "agrees" if out["float32_state_rel"] <= out["tolerance"] else "DIFFERS"
    return out


# ------------------------------------------------------------------------------------------- report
class Report:
    """This run's section of the markdown file and its JSON line, rewritten whole after every step."""

    def __init__(self, cfg: Config, info: dict):
        self.cfg, self.info, self.lock = cfg, info, threading.Lock()
        self.out = Path(cfg.out)
        self.json_path = self.out.with_suffix(".json")
        self.md_before = self.out.read_text() if self.out.exists() else (
            "# Speed on a GPU\n\nEach section is one run of `benchmarks/gpu_check.py` (command in the section; raw numbers, "
            "one JSON line per run, in the .json beside this file). Method: benchmarks/gpu_check.py's docstring.\n")
        self.json_before = self.json_path.read_text() if self.json_path.exists() else ""
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        cells = [(v, s) for v in cfg.variants for s in cfg.seeds]
        cells += [("td3_bc", s) for s in cfg.long_seeds if ("td3_bc", s) not in cells]  # the long run's
        self.rows = {c: {"algo": c[0], "num_seeds": c[1], "status": "not measured yet"} for c in cells}
        self.long = [{"num_seeds": s, "status": "not run yet"} for s in cfg.long_seeds]
        self.agree: dict = {"status": "not run yet"}
        self.status = "in progress"

    def write(self, status: str | None = None) -> None:
        with self.lock:
            if status:
                self.status = status
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(self.md_before.rstrip("\n") + "\n\n" + self.markdown() + "\n")
            os.replace(tmp, self.out)
            record = {"machine": machine_line(self.info), "argv": sys.argv[1:], "status": self.status,
                      "elapsed_s": time.monotonic() - T0, "info": self.info, "rows": list(self.rows.values()),
                      "long_run": self.long, "agreement": self.agree}
            tmp = self.json_path.with_name(self.json_path.name + ".tmp")
            tmp.write_text(self.json_before + json.dumps(record) + "\n")
            os.replace(tmp, self.json_path)

    def markdown(self) -> str:
        mb = lambda b: "" if b is None else f"{b / 2**20:,.1f}"
        lines = [f"## {self.started}: {machine_line(self.info)}", "",
                 f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`", "",
                 f"Status: **{self.status}** ({time.monotonic() - T0:.0f} s of a {self.cfg.budget_s:.0f} s budget)."
                 + (" Tiny CPU configuration: not a measurement of the paper's settings." if self.cfg.tiny else ""), "",
                 "| algorithm | seeds | updates/s (per seed) | seed-updates/s (total) | compile s | first chunk s | "
                 "updates per timed chunk | XLA memory MB (args + out + temp) | device peak MB | kernels per update | "
                 "other processes (cores busy) | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows.values():
            if "updates_per_s" not in r:
                lines.append(f"| {r['algo']} | {r['num_seeds']} | | | | | | | | | | {r['status']} |")
                continue
            peak = mb(r["device_peak_bytes"])
            peak = peak if r["device_peak_rose"] or not peak else f"<= {peak}"
            kernels = "" if r["kernels_per_update"] is None else f"{r['kernels_per_update']:.0f}"
            lines.append(f"| {r['algo']} | {r['num_seeds']} | {r['updates_per_s']:.1f} | {r['seed_updates_per_s']:.1f} | "
                         f"{r['compile_s']:.1f} | {r['first_chunk_s']:.2f} | {r['chunk']} | {mb(r['xla_memory_bytes'])} | "
                         f"{peak or 'n/a'} | {kernels} | {r['other_processes_cores']:.2f} | {r['status']} |")
        lines += ["", f"TD3+BC for {self.cfg.long_s:g} s in all (1M updates extrapolated, compile included; JAX-CORL: "
                  f"{JAX_CORL_TD3_BC_1M_MIN:g} min per seed on a GTX 1080 Ti, so N seeds one after the other take N x that):", "",
                  "| seeds | updates run | s | updates/s (per seed) | seed-updates/s | 1M updates, min | JAX-CORL's time / ours |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.long:
            if "updates" in r:
                lines.append(f"| {r['num_seeds']} | {r['updates']:,} | {r['seconds']:.1f} | {r['updates_per_s']:.0f} | "
                             f"{r['seed_updates_per_s']:.0f} | {r['wall_1m_updates_min']:.1f} | {r['vs_jax_corl']:.2f} |")
            else:
                lines.append(f"| {r['num_seeds']} | {r['status']} | | | | | |")
        meanwhile = self.long[0].get("compiled_meanwhile") if self.long else None
        if meanwhile:
            lines += ["", "Compiled in the background during this run (their autotuning shares the GPU with it): "
                      + ", ".join(meanwhile) + "."]
        a = self.agree
        lines += ["", f"First-chunk agreement ({self.cfg.agree_variant}, {self.cfg.agree_seeds} seeds, {self.cfg.agree_updates} updates, the same "
                  "data, initial state and keys on the CPU and the GPU): "]
        if "float32_state_rel" in a:
            lines[-1] += (f"**{a['status']}**. Largest |GPU - CPU| of a state array relative to its largest |value|: "
                          f"{a['float32_state_rel']:.1e} with float32 matmuls ({a['float32_worst_array']}), "
                          f"{a['default_state_rel']:.1e} at JAX's default precision ({a['default_worst_array']}); "
                          f"float32 rounding alone on the CPU (each seed trained alone vs vmapped): "
                          f"{a['rounding_state_rel']:.1e} ({a['rounding_worst_array']}); tolerance "
                          f"{a['tolerance']:.1e} (max({a['rtol']:g}, {a['factor']:g} x that)). Of the chunk's mean "
                          f"metrics: {a['float32_metrics_rel']:.1e} and {a['default_metrics_rel']:.1e}.")
        else:
            lines[-1] += a["status"] + "."
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def plan(cfg: Config) -> list[tuple]:
    """The steps in the order of what is needed most: ("row", variant, seeds), ("agree",), ("long",)."""
    order = [s for s in (5, 1, 50, 10) if s in cfg.seeds] + [s for s in cfg.seeds if s not in (5, 1, 50, 10)]
    first = [("row", v, s) for s in order[:1] for v in (MISA_SEQ, MISA_PAR) if v in cfg.variants]
    td3 = [("row", "td3_bc", s) for s in cfg.long_seeds]
    rest = [("row", v, s) for v in (MISA_SEQ, MISA_PAR) if v in cfg.variants for s in order[1:]]
    rest += [("row", v, s) for v in cfg.variants if v not in (MISA_SEQ, MISA_PAR) for s in order]
    steps = first + [("agree",)] + td3 + [("long",)] + rest
    seen, unique = set(), []
    for s in steps:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def check(cfg: Config) -> list[str]:
    problems = []
    for entry in set(cfg.variants) | {cfg.agree_variant, "td3_bc"}:
        try:
            speed.build_args(entry, 1, 1_000_000, 1_000_000, TINY_ARGS if cfg.tiny else None)
        except Exception as e:
            problems.append(f"--variants {entry}: {e.__class__.__name__}: {e}")
    if cfg.budget_s <= 0 or cfg.reserve_s < 0 or cfg.chunk_s <= 0 or cfg.repeats < 1 or cfg.long_s < 0:
        problems.append("--budget-s, --chunk-s and --repeats must be positive, --reserve-s and --long-s not negative")
    if any(s < 1 for s in cfg.seeds + cfg.long_seeds) or cfg.agree_seeds < 1 or cfg.agree_updates < 1:
        problems.append("seed counts and --agree-updates must be at least 1")
    try:  # the results must be writable before anything is measured
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=Path(cfg.out).parent).close()
    except OSError as e:
        problems.append(f"--out {cfg.out} cannot be written ({e.strerror}); give another path")
    return problems


def main(cfg: Config) -> int:
    if cfg.tiny:  # the smoke preset fills what was left at its default
        default = Config()
        cfg = dataclasses.replace(cfg, **{k: v for k, v in TINY_DEFAULTS.items() if getattr(cfg, k) == getattr(default, k)})
    problems = check(cfg)
    if problems:
        print("gpu_check: " + "; ".join(problems), file=sys.stderr)
        return 2
    clock = Clock(cfg)
    info = machine()
    report = Report(cfg, info)
    print(f"gpu_check: {machine_line(info)}; budget {cfg.budget_s:.0f} s, {clock.elapsed():.0f} s spent starting",
          flush=True)
    report.write()

    current = {"step": "start"}

    def watchdog():
        report.write(f"PARTIAL: stopped by the watchdog at the budget, during {current['step']}")
        print(f"gpu_check: budget reached during {current['step']}; wrote {report.out}", flush=True)
        os._exit(3)

    timer = threading.Timer(max(0.0, T0 + cfg.budget_s - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()

    dataset = speed.synthetic_dataset(cfg.dataset_size)
    programs: dict[tuple[str, int], tuple[Program, float]] = {}  # kept for the long run and the agreement
    compile_seen: dict[str, float] = {}
    skipped = []

    prefetched: dict[tuple[str, int], Program | Exception] = {}
    runs_s = (cfg.repeats + 2) * cfg.chunk_s  # a row's runs after its compile

    def compile_guess(entry: str) -> float:
        algo = entry.split(":")[0]
        return max([t for k, t in compile_seen.items() if k == entry] or
                   [t for k, t in compile_seen.items() if k.split(":")[0] == algo] or [cfg.compile_guess_s])

    def expected(entry: str) -> float:
        return compile_guess(entry) + runs_s

    def failure(e: Exception) -> str:
        return f"failed: {e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:200]}"

    steps = plan(cfg)
    for index, step in enumerate(steps):
        kind = step[0]
        if kind == "row":
            _, entry, seeds = step
            key = (entry, seeds)
            need = runs_s if key in prefetched else expected(entry)
            if clock.left() < need:
                report.rows[key]["status"] = f"not measured: budget ({need:.0f} s needed, {max(clock.left(), 0):.0f} s left)"
                skipped.append(f"{entry} x {seeds}")
                continue
            current["step"] = f"{entry} at {seeds} seeds"
            report.rows[key]["status"] = "in progress (the run stopped here)"
            report.write()
            print(f"[{clock.elapsed():5.0f} s] {entry}, {seeds} seeds ...", end=" ", flush=True)
            try:
                prog = prefetched.pop(key, None)
                if isinstance(prog, Exception):
                    raise prog
                row, prog = measure(entry, seeds, cfg, dataset, clock, prog)
                compile_seen[entry] = max(compile_seen.get(entry, 0.0), row["compile_s"])
                report.rows[key] = row
                if key in [("td3_bc", s) for s in cfg.long_seeds] + [(cfg.agree_variant, cfg.agree_seeds)]:
                    programs[key] = prog, row["updates_per_s"]  # for the long run and the agreement
                del prog
                print(f"{row['updates_per_s']:.1f} updates/s, {row['seed_updates_per_s']:.1f} seed-updates/s, "
                      f"compile {row['compile_s']:.1f} s", flush=True)
            except Exception as e:  # e.g. out of memory at 50 seeds: recorded, and the rest goes on
                report.rows[key]["status"] = failure(e)
                print(report.rows[key]["status"], flush=True)
                traceback.print_exc()
        elif kind == "agree":
            need = (3 if (cfg.agree_variant, cfg.agree_seeds) in programs else 4) * expected(cfg.agree_variant)
            if jax.devices()[0].platform == "cpu":
                report.agree = {"status": "skipped: one backend (cpu)"}
                continue
            if clock.left() < need:
                report.agree = {"status": f"not run: budget ({need:.0f} s needed, {max(clock.left(), 0):.0f} s left)"}
                skipped.append("agreement")
                continue
            current["step"] = "the agreement check"
            report.agree = {"status": "in progress (the run stopped here)"}
            report.write()
            print(f"[{clock.elapsed():5.0f} s] first-chunk agreement ...", end=" ", flush=True)
            try:
                report.agree = agreement(cfg, dataset, programs.pop((cfg.agree_variant, cfg.agree_seeds), (None,))[0],
                                         jax.devices("cpu")[0], jax.devices()[0])
            except Exception as e:
                report.agree = {"status": failure(e)}
                traceback.print_exc()
            print(report.agree["status"], flush=True)
        elif kind == "long":
            share = cfg.long_s / max(len(cfg.long_seeds), 1)
            planned = sum(share for s in cfg.long_seeds if ("td3_bc", s) in programs)
            fetch = Prefetch([st[1:] for st in steps[index + 1:] if st[0] == "row"], cfg, dataset,
                             time.monotonic() + min(planned, max(clock.left(), 0.0)), compile_guess)
            fetch.start()
            for i, s in enumerate(cfg.long_seeds):
                if ("td3_bc", s) not in programs:
                    report.long[i] = {"num_seeds": s, "status": "not run: its table row was not measured"}
                    continue
                if clock.left() < share:
                    report.long[i] = {"num_seeds": s, "status": f"not run: budget ({share:.0f} s needed)"}
                    skipped.append(f"TD3+BC run x {s}")
                    continue
                current["step"] = f"the TD3+BC run at {s} seeds"
                report.long[i] = {"num_seeds": s, "status": "in progress (the run stopped here)"}
                report.write()
                print(f"[{clock.elapsed():5.0f} s] TD3+BC for {share:.0f} s at {s} seeds ...", end=" ", flush=True)
                prog, rate = programs.pop(("td3_bc", s))
                try:
                    report.long[i] = long_run(prog, share, rate)
                    print(f"{report.long[i]['updates']:,} updates, 1M in {report.long[i]['wall_1m_updates_min']:.1f} min",
                          flush=True)
                except Exception as e:
                    report.long[i] = {"num_seeds": s, "status": failure(e)}
                    traceback.print_exc()
                del prog
            current["step"] = "the compiles started during the TD3+BC run"
            fetch.join()  # nothing else runs while a compile may still use the GPU (autotuning)
            prefetched = fetch.done
            for (entry, _), prog in prefetched.items():
                if isinstance(prog, Program):
                    compile_seen[entry] = max(compile_seen.get(entry, 0.0), prog.compile_s)
            for r in report.long:
                r["compiled_meanwhile"] = [f"{e} x {n}" for e, n in prefetched]
        report.write()

    timer.cancel()
    status = (f"PARTIAL: the budget ran out before {', '.join(skipped)}" if skipped else "complete")
    report.write(status)
    print(f"gpu_check: {status} in {clock.elapsed():.0f} s; wrote {report.out} and {report.json_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Config)))

"""The GPU design on paper: what each algorithm's compiled update costs on a GPU, from XLA on a CPU.

    python benchmarks/gpu_estimates.py --out results/speed.md

For each variant (as in benchmarks/speed.py, `name:field=value`) at the paper's settings it builds the
seed-vmapped training chunk with the file's own `make_train`, and reads one loop step (one update;
TD3+BC: `policy_delay` updates) of it three ways:

- the jaxpr: its loops and their trip counts (MISA's HMC: burn-in and sampling scans around the
  leapfrog scan), hence the gradient passes that must run one after the other, and the matmul FLOPs
  of one step with every loop's trip count applied (XLA's cost_analysis counts a loop body once);
- the optimised HLO of the CPU compile: the kernels one step launches (every instruction outside a
  fusion that does work, times the trip counts of its loops; the CPU's rolled threefry loops, which a
  GPU computes in one fusion, count as one). A GPU fuses somewhat differently: this is a proxy;
- XLA's memory analysis at 1 and 2 seeds: arguments, outputs and temporaries, so the cost of one
  more seed, and the state (parameters, targets, optimiser) by field.

From them: a latency floor per update (kernels x the assumed time of one small kernel), a compute
floor (FLOPs / the device's peak), the seeds at which the two meet, and how many seeds fit in a
GPU's memory. The numbers are written as a section of `--out` (replaced on every run) and as JSON
beside it (`speed-estimates.json`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import tyro

from benchmarks import speed

BEGIN, END = "<!-- begin: benchmarks/gpu_estimates.py -->", "<!-- end: benchmarks/gpu_estimates.py -->"
# the largest gym-locomotion D4RL datasets (*-medium-expert-v2, *-full-replay-v2): about 2M rows of
# HalfCheetah/Walker2d shapes, obs 17, act 6; one copy serves every seed (in_axes None)
PAPER_DATASET_BYTES = 2_000_000 * (17 + 6 + 1 + 17 + 1) * 4


@dataclasses.dataclass
class Config:
    variants: list[str] = dataclasses.field(default_factory=lambda: [
        "td3_bc", "cql", "misa:hmc_chains=sequential", "misa:hmc_chains=parallel", "misa:objective=official"])
    """algorithm files (with Args overrides, as in speed.py), each at its paper settings"""
    kernel_us: float = 4.0
    """assumed wall time of one small dependent kernel on a GPU (launch + minimal run), in microseconds"""
    peak_tflops: float = 67.0
    """the GPU's float32 peak (H100/H200 SXM: 67 TFLOPS without tensor cores)"""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10, 50])
    """seed counts of the floor table"""
    sensitivity_kernel_us: list[float] = dataclasses.field(default_factory=lambda: [2.0, 4.0, 8.0])
    """kernel times of the chain-layout sensitivity table"""
    sensitivity_tflops: list[float] = dataclasses.field(default_factory=lambda: [20.0, 67.0, 200.0])
    """achieved TFLOPS of the sensitivity table (TF32 tensor cores can exceed the float32 peak)"""
    memory_gb: list[float] = dataclasses.field(default_factory=lambda: [80.0, 141.0])
    """GPU memory sizes for the seeds-per-GPU column (A100/H100 80 GB, H200 141 GB)"""
    mem_fraction: float = 0.75
    """share of the GPU memory JAX takes (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)"""
    out: str | None = None
    """markdown file whose generated section is replaced (or appended); JSON goes to speed-estimates.json beside it"""


# ---------------------------------------------------------------------------------------------- HLO
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
        "partition-id", "replica-id"}  # no kernel of their own


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
    """Computations of an optimised HLO module: name -> [(result type, opcode, rest of line)], and ENTRY's name."""
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if head:
            cur = head.group(2)
            comps[cur] = []
            entry = cur if head.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            inst = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((.*)$", line)
            if inst:
                comps[cur].append(inst.groups())
    return comps, entry


def kernels(comps: dict, name: str) -> tuple[int, int]:
    """(kernels launched, while-loop iterations without a known trip count) by one run of computation `name`."""
    total = syncs = 0
    for typ, op, rest in comps[name]:
        if op in FREE:
            continue
        if op == "while":
            body, cond = (re.search(rf"{k}=%?([\w.\-]+)", rest).group(1) for k in ("body", "condition"))
            if not re.search(r"\b(f16|bf16|f32|f64|pred)\[", typ):  # integer-only state: a rolled threefry hash (CPU)
                total += 1
                continue
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)
            (kb, sb), (kc, sc) = kernels(comps, body), kernels(comps, cond)
            n = int(trips.group(1)) if trips else 1
            total, syncs = total + n * (kb + kc), syncs + n * (sb + sc) + (0 if trips else 1)
        elif op == "conditional":
            branches = re.findall(r"%?([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", rest).group(1))
            costs = [kernels(comps, b) for b in branches]
            total, syncs = total + 1 + max(c[0] for c in costs), syncs + 1 + max(c[1] for c in costs)
        elif op == "call":
            k, s = kernels(comps, re.search(r"to_apply=%?([\w.\-]+)", rest).group(1))
            total, syncs = total + k, syncs + s
        else:
            total += 1
    return total, syncs


def step_kernels(hlo_text: str) -> tuple[int, int]:
    """(kernels, while iterations without a known trip count) of one step of the chunk's loop: the
    body and condition of the ENTRY's while loop whose trip count is the traced chunk length."""
    comps, entry = parse_hlo(hlo_text)
    for typ, op, rest in comps[entry]:
        if op == "while" and "known_trip_count" not in rest:
            body, cond = (re.search(rf"{k}=%?([\w.\-]+)", rest).group(1) for k in ("body", "condition"))
            (kb, sb), (kc, sc) = kernels(comps, body), kernels(comps, cond)
            return kb + kc, sb + sc
    raise ValueError("no loop with a traced trip count in ENTRY: is this a training chunk?")


# -------------------------------------------------------------------------------------------- jaxpr
def sub_jaxprs(eqn) -> list:
    subs = []
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                subs.append(x.jaxpr)
            elif isinstance(x, jax.extend.core.Jaxpr):
                subs.append(x)
    return subs


def dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lhs_contract]))


def profile(jaxpr) -> tuple[int, list[str], int]:
    """(matmul FLOPs, loop structure as strings like '50 x [2]', gradient passes in sequence: the
    iterations of the innermost loops, times their enclosing trip counts) of one run of `jaxpr`."""
    flops, loops, passes = 0, [], 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += dot_flops(eqn)
        elif name == "scan":
            f, inner, p = profile(eqn.params["jaxpr"].jaxpr)
            n = eqn.params["length"]
            flops, passes = flops + n * f, passes + n * (p or 1)
            loops.append(f"{n} x [{' + '.join(inner)}]" if inner else str(n))
        elif name == "cond":
            costs = [profile(b.jaxpr) for b in eqn.params["branches"]]
            best = max(costs, key=lambda c: c[0])
            flops, passes, loops = flops + best[0], passes + best[2], loops + best[1]
        else:
            for sub in sub_jaxprs(eqn):
                f, inner, p = profile(sub)
                flops, passes, loops = flops + f, passes + p, loops + inner
    return flops, loops, passes


def step_jaxpr(jaxpr):
    """The body of the chunk's loop (the while whose trip count is traced), searched depth-first."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            return eqn.params["body_jaxpr"].jaxpr
        for sub in sub_jaxprs(eqn):
            found = step_jaxpr(sub)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------------------------------- memory
def state_bytes(state) -> dict[str, int]:
    """Bytes of each field of the (vmapped) agent state, summed over its arrays."""
    return {f.name: sum(x.nbytes for x in jax.tree.leaves(eqx.filter(getattr(state, f.name), eqx.is_array)))
            for f in dataclasses.fields(state)}


def analyse(entry: str, num_seeds: int) -> dict:
    dataset = speed.synthetic_dataset(100_000)
    module, args, train_v, state, keys = speed.build(entry, num_seeds, 1000, 1_000_000)
    count = jnp.int32(10)
    t = time.perf_counter()
    compiled = train_v.lower(dataset, state, keys, count).compile().compiled
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    row = {"variant": entry, "num_seeds": num_seeds, "compile_s": compile_s,
           "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
           "temp_bytes": mem.temp_size_in_bytes, "dataset_bytes": sum(x.nbytes for x in jax.tree.leaves(dataset)),
           "state_bytes": state_bytes(state), "updates_per_step": getattr(args, "policy_delay", 1)}
    if num_seeds == 1:
        jaxpr = eqx.filter_make_jaxpr(train_v)(dataset, state, keys, count)[0].jaxpr
        flops, loops, passes = profile(step_jaxpr(jaxpr))
        row.update(step_flops=flops, loops=loops, sequential_passes=passes,
                   rows_per_pass=(args.batch_size * args.num_samples if getattr(args, "hmc_chains", "") == "parallel"
                                  else args.batch_size) if passes else None)
        row["step_kernels"], row["step_host_syncs"] = step_kernels(compiled.as_text())
        row["cost_analysis_flops_loop_bodies_once"] = compiled.cost_analysis().get("flops")
    return row


def summarise(one: dict, two: dict, cfg: Config) -> dict:
    """Per-update figures from the 1- and 2-seed analyses."""
    u = one["updates_per_step"]
    total = lambda r: r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
    per_seed = total(two) - total(one)
    fixed = total(one) - per_seed - one["dataset_bytes"]  # what does not grow with the seeds, less our dataset
    state = one["state_bytes"]
    params = sum(v for k, v in state.items() if not k.endswith("_opt"))
    opt = sum(v for k, v in state.items() if k.endswith("_opt"))
    latency_ms = one["step_kernels"] * cfg.kernel_us / 1e3 / u
    compute_ms = one["step_flops"] / (cfg.peak_tflops * 1e12) * 1e3 / u  # per seed
    fits = {gb: int((gb * 1e9 * cfg.mem_fraction - fixed - PAPER_DATASET_BYTES) // per_seed) for gb in cfg.memory_gb}
    return {"variant": one["variant"], "loops": one["loops"], "sequential_passes": one["sequential_passes"],
            "rows_per_pass": one["rows_per_pass"], "kernels_per_update": one["step_kernels"] / u,
            "host_syncs_per_update": one["step_host_syncs"] / u, "gflop_per_update_per_seed": one["step_flops"] / u / 1e9,
            "latency_floor_ms": latency_ms, "compute_floor_ms_per_seed": compute_ms,
            "seeds_where_compute_meets_latency": latency_ms / compute_ms,
            "floor_updates_per_s": {s: 1e3 / max(latency_ms, s * compute_ms) for s in cfg.seeds},
            "params_bytes_per_seed": params, "optimiser_bytes_per_seed": opt,
            "temp_bytes_per_seed": two["temp_bytes"] - one["temp_bytes"], "bytes_per_seed": per_seed,
            "fixed_bytes": fixed, "seeds_that_fit": fits,
            "cost_analysis_flops_loop_bodies_once": one["cost_analysis_flops_loop_bodies_once"],
            "compile_s_cpu": one["compile_s"]}


def markdown(rows: list[dict], cfg: Config) -> str:
    mb = lambda b: f"{b / 2**20:.1f}"
    lines = [BEGIN, f"Command: `python benchmarks/gpu_estimates.py {' '.join(sys.argv[1:])}` "
             f"({time.strftime('%Y-%m-%d', time.gmtime())}, JAX {jax.__version__}, XLA on {jax.devices()[0].platform}). "
             "Per update at the paper's settings (256-wide networks, batch 256; MISA K = 50, HMC 5 + 50, 2 leapfrog steps; "
             "CQL 10 samples); TD3+BC's loop step is `policy_delay` = 2 updates, halved here.", "",
             "| variant | loops in one update (trip counts) | gradient passes in sequence (rows each) | kernels per update | "
             "matmul GFLOP per update per seed | latency floor ms | compute floor ms per seed | seeds where compute = latency |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        passes = f"{r['sequential_passes']} ({r['rows_per_pass']})" if r["sequential_passes"] else "1"
        lines.append(f"| {r['variant']} | {' + '.join(r['loops']) or 'none'} | {passes} | {r['kernels_per_update']:.0f} | "
                     f"{r['gflop_per_update_per_seed']:.3f} | {r['latency_floor_ms']:.2f} | {r['compute_floor_ms_per_seed']:.3f} | "
                     f"{r['seeds_where_compute_meets_latency']:.0f} |")
    lines += ["", f"Floor on updates/s per seed, max(latency, seeds x compute) at {cfg.kernel_us:g} us per kernel and "
              f"{cfg.peak_tflops:g} TFLOPS (seed-updates/s = seeds x this):", "",
              "| variant | " + " | ".join(f"{s} seed{'s' * (s > 1)}" for s in cfg.seeds) + " |",
              "|---|" + "---|" * len(cfg.seeds)]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r['floor_updates_per_s'][s]:.0f}" for s in cfg.seeds) + " |" for r in rows]
    gbs = " | ".join(f"seeds on {gb:g} GB" for gb in cfg.memory_gb)
    lines += ["", f"Memory per seed (XLA's buffer assignment on CPU; the chunk keeps its input and output state, "
              f"no donation) and seeds that fit in {cfg.mem_fraction:.0%} of a GPU (JAX's default share) beside "
              f"one {PAPER_DATASET_BYTES / 1e6:.0f} MB dataset (the largest gym-locomotion D4RL files, 2M rows):", "",
              f"| variant | parameters + targets MB | optimiser MB | temporaries MB | total MB per seed | {gbs} |",
              "|---|---|---|---|---|" + "---|" * len(cfg.memory_gb)]
    lines += [f"| {r['variant']} | {mb(r['params_bytes_per_seed'])} | {mb(r['optimiser_bytes_per_seed'])} | "
              f"{mb(r['temp_bytes_per_seed'])} | {mb(r['bytes_per_seed'])} | "
              + " | ".join(f"{r['seeds_that_fit'][gb]:,}" for gb in cfg.memory_gb) + " |" for r in rows]
    lines += ["", decision(rows, cfg), END]
    return "\n".join(lines)


def floor_ms(r: dict, seeds: int, kernel_us: float, tflops: float) -> float:
    """max(latency, compute) per update of summary row `r` under other assumptions."""
    return max(r["kernels_per_update"] * kernel_us / 1e3, seeds * r["gflop_per_update_per_seed"] / tflops)


def decision(rows: list[dict], cfg: Config) -> str:
    """Which MISA chain layout has the lower floor, by seeds, and how that depends on the assumptions;
    and TD3+BC's floor beside JAX-CORL's measured rate."""
    by = {r["variant"]: r for r in rows}
    lines = []
    td3 = by.get("td3_bc")
    if td3:
        us = 9 * 60 / 1e6 * 1e6 / td3["kernels_per_update"]  # JAX-CORL: 1M updates in 9 min
        lines.append(f"Check against a measurement: JAX-CORL's TD3+BC runs 1M updates in 9 min on a GTX 1080 Ti, "
                     f"{1e6 / 540:.0f} updates/s, above our floor of {td3['floor_updates_per_s'][cfg.seeds[0]]:.0f}: "
                     f"at our kernel count ({td3['kernels_per_update']:.0f}) that is at most {us:.1f} us per kernel, "
                     f"so {cfg.kernel_us:g} us (or the CPU's kernel count) is pessimistic.")
    seq, par = by.get("misa:hmc_chains=sequential"), by.get("misa:hmc_chains=parallel")
    if not (seq and par):
        return "\n\n".join(lines + ["(no chain-layout comparison: both MISA layouts are needed)"])
    name = lambda a, b: "sequential" if a <= b else "parallel"
    faster = [f"{s}: {name(*(floor_ms(r, s, cfg.kernel_us, cfg.peak_tflops) for r in (seq, par)))} "
              f"({seq['floor_updates_per_s'][s]:.0f} vs {par['floor_updates_per_s'][s]:.0f} updates/s)" for s in cfg.seeds]
    lines.append("MISA's chain layout with the higher floor, by seeds (sequential vs parallel): " + "; ".join(faster) + ".")
    default = 5  # the scripts' --num-seeds
    lines += ["", f"The same at {default} seeds (the default --num-seeds) under other assumptions: the faster layout "
              "and by how much (rows: us per kernel; columns: achieved TFLOPS):", "",
              "| us per kernel | " + " | ".join(f"{t:g} TFLOPS" for t in cfg.sensitivity_tflops) + " |",
              "|---|" + "---|" * len(cfg.sensitivity_tflops)]
    for us in cfg.sensitivity_kernel_us:
        cells = []
        for t in cfg.sensitivity_tflops:
            a, b = floor_ms(seq, default, us, t), floor_ms(par, default, us, t)
            cells.append(f"{name(a, b)} {max(a, b) / min(a, b):.1f}x")
        lines.append(f"| {us:g} | " + " | ".join(cells) + " |")
    # where the sequential layout is latency-bound and the parallel one compute-bound, they tie at
    # seeds x FLOPs(parallel) / TFLOPS = kernels(sequential) x kernel time
    tie = [f"{default * par['gflop_per_update_per_seed'] / (seq['kernels_per_update'] * us * 1e-6) / 1e3:.0f} TFLOPS "
           f"with {us:g} us kernels" for us in cfg.sensitivity_kernel_us]
    lines += ["", f"At {default} seeds the parallel layout is the faster while the GPU runs these matmuls faster than "
              + ", ".join(tie) + "."]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(cfg: Config) -> None:
    rows, raw = [], []
    for entry in cfg.variants:
        one, two = analyse(entry, 1), analyse(entry, 2)
        raw += [one, two]
        rows.append(summarise(one, two, cfg))
        r = rows[-1]
        print(f"{entry}: {r['kernels_per_update']:.0f} kernels, {r['sequential_passes'] or 1} passes in sequence, "
              f"{r['gflop_per_update_per_seed']:.3f} GFLOP per update per seed, {r['bytes_per_seed'] / 2**20:.0f} MB per seed",
              flush=True)
    section = markdown(rows, cfg)
    print(section)
    if cfg.out:
        out = Path(cfg.out)
        write_section(out, section)
        out.with_name("speed-estimates.json").write_text(json.dumps(
            {"argv": sys.argv[1:], "config": dataclasses.asdict(cfg), "rows": rows, "raw": raw}, indent=1) + "\n")
        print(f"wrote the section of {out} and {out.with_name('speed-estimates.json')}")


if __name__ == "__main__":
    main(tyro.cli(Config))

"""How right MISA's HMC sampler is where training takes it: the grid of tests/hmc_reference.py.

    python benchmarks/hmc_accuracy.py                                   # today's sampler, results/hmc-accuracy.md
    python benchmarks/hmc_accuracy.py --entries misa misa@1a4e5e9 misa:hmc_adapt=False

For each target (the official update's networks; policy log-std shift -1, -3 or a per-dimension mix;
Q spreads of 1, 10, 30, 100 units over the policy's actions) and each start of the chains (the
dataset actions, "inside", or actions at +-0.999, "edge"; a sampler that starts from a resample of
policy actions ignores them), the sampler runs as in training: 30 updates carry the step size from one
to the next, then the samples of 20 more updates (20 x 50 per state) are pooled and compared with the
NUTS reference: the largest error of a state's mean (in reference stds), the range of the ratio of
sample std to reference std over states and dimensions, the kept steps' acceptance, the final step
and the Stein scale (the accuracy proxy logged in training: 1 for exact samples). A cell passes when
acceptance >= 0.5, mean error <= 0.2 and every std ratio within 1.3x. An entry is `algo[@commit][:field=value,...]`
(benchmarks/speed.py's syntax: @commit measures the file as it was then).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from benchmarks.speed import load_algorithm, parse  # noqa: E402
import hmc_reference as reference  # noqa: E402

K, CARRIED, POOLED = 50, 30, 20
LIMITS = dict(acceptance=0.5, mean_error=0.2, std_ratio=1.3)


def passes(row: dict) -> bool:
    return (row["acceptance"] >= LIMITS["acceptance"] and row["mean_error"] <= LIMITS["mean_error"]
            and 1 / LIMITS["std_ratio"] <= row["std_ratio_min"] and row["std_ratio_max"] <= LIMITS["std_ratio"])


def sampler(module, args):
    """One update's sampling as `update` does it: the start (an exp(Q) resample of K policy actions, or
    the given dataset actions), then module.sample_improved_actions. Compiled once per entry."""
    start_kind = getattr(args, "hmc_start", "dataset")

    @eqx.filter_jit
    def one(actor, critic, obs, dataset_u, log_step, key):
        k_policy, k_resample, k_chain = jax.random.split(key, 3)
        mu, log_std = jax.vmap(actor)(obs)
        u_policy = mu[:, None] + jnp.exp(log_std)[:, None] * jax.random.normal(k_policy, (obs.shape[0], K, mu.shape[1]))
        q = jax.vmap(jax.vmap(lambda o, u: critic(o, jnp.tanh(u)).min(), in_axes=(None, 0)))(obs, u_policy)
        if start_kind == "resample":
            start = module.resample_policy_samples(u_policy, q, k_resample, args.temperature)
            start = start[:, 0] if args.hmc_chains == "sequential" else start
        else:
            start = dataset_u if args.hmc_chains == "sequential" else jnp.broadcast_to(dataset_u[:, None], u_policy.shape)
        return module.sample_improved_actions(actor, critic, obs, start, log_step, k_chain, args)

    return one, start_kind


def run_cell(one, args, actor, critic, obs, dataset_u, mean, std, seed: int = 0) -> dict:
    """CARRIED updates carrying the step, then POOLED updates whose samples are compared with the reference."""
    log_step = jnp.log(args.hmc_step_size)
    samples, accept, stein = [], [], []
    for i, key in enumerate(jax.random.split(jax.random.PRNGKey(seed), CARRIED + POOLED)):
        u, info = one(actor, critic, obs, dataset_u, log_step, key)
        if args.hmc_adapt:
            log_step = info["log_step"]
        if i >= CARRIED:
            samples.append(np.asarray(u))
            accept.append(float(info["hmc_acceptance"]))
            stein.append(float(info.get("hmc_stein_scale", np.nan)))
    u = np.concatenate(samples, axis=1)  # (states, POOLED * K, A)
    ratio = u.std(1) / std
    return {"acceptance": float(np.mean(accept)), "step": float(np.exp(log_step)),
            "mean_error": float((np.abs(u.mean(1) - mean) / std).max()), "std_ratio_min": float(ratio.min()),
            "std_ratio_max": float(ratio.max()), "stein_scale": float(np.mean(stein))}


def grid(entry: str, seed: int = 0, cells: list[tuple[str, float]] | None = None) -> list[dict]:
    """Every cell of the grid (or those (shift, spread) in `cells`) for one sampler entry."""
    name, overrides = parse(entry)
    module = load_algorithm(name)
    args = module.Args(**{"num_samples": K, "hmc_burnin": 5, "hmc_leapfrog": 2, **overrides})  # an entry may override these
    one, start_kind = sampler(module, args)
    ref, rows = reference.stored(), []
    for shift in reference.SHIFTS:
        for spread in reference.SPREADS:
            if cells is not None and (shift, spread) not in cells:
                continue
            key = f"{shift}/{spread:g}"
            actor, critic, obs, data, _ = reference.target(shift, spread, float(ref[f"{key}/scale"]))
            edge = 0.999 * jnp.sign(jax.random.normal(jax.random.PRNGKey(3), data.shape))
            for start, actions in ([("any", data)] if start_kind == "resample" else [("inside", data), ("edge", edge)]):
                row = run_cell(one, args, actor, critic, obs, jnp.arctanh(jnp.clip(actions, -0.999, 0.999)),
                               ref[f"{key}/mean"], ref[f"{key}/std"], seed)
                rows.append({"entry": entry, "shift": shift, "spread": spread, "start": start, **row, "ok": passes(row)})
    return rows


@dataclasses.dataclass
class Config:
    entries: list[str] = dataclasses.field(default_factory=lambda: ["misa"])
    """samplers to measure, benchmarks/speed.py's entry syntax"""
    out: str = "results/hmc-accuracy.md"
    """markdown table (a JSON of the rows is written beside it)"""
    spreads: list[float] = dataclasses.field(default_factory=lambda: list(reference.SPREADS))
    """only the cells of these Q spreads (a quicker look at one regime)"""


def main(cfg: Config) -> None:
    t = time.time()
    cells = [(shift, spread) for shift in reference.SHIFTS for spread in cfg.spreads]
    rows = [row for entry in cfg.entries for row in grid(entry, cells=cells)]
    lines = ["# HMC sampler accuracy in trained regimes", "",
             f"Written by `python benchmarks/hmc_accuracy.py {' '.join(sys.argv[1:])}` "
             f"({time.time() - t:.0f} s); method in that file's docstring, targets and NUTS reference in "
             "`tests/hmc_reference.py`. Pass: acceptance >= 0.5, every state's mean within 0.2 reference std, "
             "every std ratio within 1.3x.", "",
             "| sampler | log-std shift | Q spread | start | acceptance | step (policy stds) | max mean error (ref std) "
             "| std ratio (min-max) | Stein scale | pass |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['entry']}` | {r['shift']} | {r['spread']:g} | {r['start']} | {r['acceptance']:.2f} | "
                     f"{r['step']:.2f} | {r['mean_error']:.2f} | {r['std_ratio_min']:.2f}-{r['std_ratio_max']:.2f} | "
                     f"{r['stein_scale']:.2f} | {'yes' if r['ok'] else '**no**'} |")
    for entry in cfg.entries:
        mine = [r for r in rows if r["entry"] == entry]
        lines.append(f"\n`{entry}`: {sum(r['ok'] for r in mine)} of {len(mine)} cells pass.")
    out = ROOT / cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Config))

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
acceptance >= 0.5, mean error <= 0.2 and every std ratio within 1.3x. --hmc-chains auto resolves as in
training on this backend (sequential on a CPU: one chain per state; `:hmc_chains=parallel` measures the GPU
layout, K chains per state). An entry is `algo[@commit][:field=value,...]`
(benchmarks/speed.py's syntax: @commit measures the file as it was then).

    python benchmarks/hmc_accuracy.py --run-dir RUN --out results/hmc-run.md

measures the same on the networks of a trained MISA run instead (its checkpoint's actor and critic of
one seed, 16 of its dataset's states, chains started at their dataset actions where a start is
taken; the NUTS reference computed there, minutes): where that run sits in the grid (its policy's
log-std, its Q spread) and whether the sampler is right there.
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
    """One update's sampling as `update` does it: the start (module.resample_start from K policy actions,
    or the given dataset actions), then module.sample_improved_actions. Compiled once per entry."""
    start_kind = getattr(args, "hmc_start", "dataset")

    @eqx.filter_jit
    def one(actor, critic, obs, dataset_u, log_step, key):
        k_policy, k_resample, k_chain = jax.random.split(key, 3)
        mu, log_std = jax.vmap(actor)(obs)
        u_policy = mu[:, None] + jnp.exp(log_std)[:, None] * jax.random.normal(k_policy, (obs.shape[0], K, mu.shape[1]))
        if start_kind == "resample" and hasattr(module, "chain_starts"):
            start = module.chain_starts(actor, critic, obs, u_policy, k_resample, args)
        elif start_kind == "resample" and hasattr(module, "resample_start"):  # @commit: the widened start, no fit
            start = module.resample_start(actor, critic, obs, u_policy, k_resample, args)
        elif start_kind == "resample":  # an entry @commit before the widened start: exp(Q) among the K
            q = jax.vmap(jax.vmap(lambda o, u: critic(o, jnp.tanh(u)).min(), in_axes=(None, 0)))(obs, u_policy)
            start = module.resample_policy_samples(u_policy, q, k_resample, args.temperature)
        else:
            start = jnp.broadcast_to(dataset_u[:, None], u_policy.shape)
        if not hasattr(args, "hmc_fit_ascent") and args.hmc_chains == "sequential":
            start = start[:, 0]  # an entry @commit before the fit took every chain's start
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


def run_target(run_dir: str, seed: int | None = None) -> tuple[dict, tuple]:
    """The sampler's target in a trained run: (a description, (actor, critic, observations, dataset
    actions) of one seed at its checkpoint and 16 dataset states, observations normalised as in training)."""
    from common import data
    from common.errors import UserError
    from tools.agent import LoadError, load_agents

    try:
        agents = load_agents(run_dir, None if seed is None else [seed])
    except LoadError as e:
        raise UserError(str(e)) from None
    if not hasattr(agents.module, "sample_improved_actions"):
        raise UserError(f"{run_dir} is a {agents.algo} run: --run-dir takes a run of misa, misa_dv or misa_f (their "
                        "sampler's target needs the MISA policy and critic)")
    first = lambda tree: jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, tree)
    actor, critic = first(agents.states.actor), first(agents.states.critic)
    dataset, _ = data.load(agents.args.env)
    rows = np.random.default_rng(0).choice(len(dataset.obs), reference.STATES, replace=False)
    obs = jnp.asarray((np.asarray(dataset.obs)[rows] - agents.obs_mean) / agents.obs_std)
    _, log_std = jax.vmap(actor)(obs)
    about = {"run": str(run_dir), "seed": agents.seeds[0], "update": agents.update, "env": agents.args.env,
             "log_std": [round(float(x), 2) for x in np.asarray(log_std).mean(0)],
             "spread": reference.q_spread(actor, critic, obs)}
    return about, (actor, critic, obs, jnp.asarray(np.asarray(dataset.action)[rows]))


def run_rows(entry: str, target: tuple, mean: np.ndarray, std: np.ndarray, about: dict, seed: int = 0) -> list[dict]:
    """One row (start: the dataset actions, or a resample of policy actions) for a run's target."""
    name, overrides = parse(entry)
    module = load_algorithm(name)
    args = configured(module, {"num_samples": K, "hmc_burnin": 5, "hmc_leapfrog": 2, **overrides})
    one, start_kind = sampler(module, args)
    actor, critic, obs, actions = target
    row = run_cell(one, args, actor, critic, obs, jnp.arctanh(jnp.clip(actions, -0.999, 0.999)), mean, std, seed)
    return [{"entry": entry, "chains": args.hmc_chains, "shift": "run", "spread": about["spread"],
             "start": "any" if start_kind == "resample" else "inside", **row, "ok": passes(row)}]


def configured(module, overrides: dict):
    """The entry's Args with --hmc-chains auto resolved as training resolves it on this backend (sequential
    on a CPU, parallel on a GPU)."""
    args = module.Args(**overrides)
    return module.resolve_hmc_chains(args) if hasattr(module, "resolve_hmc_chains") else args


def grid(entry: str, seed: int = 0, cells: list[tuple[str, float]] | None = None) -> list[dict]:
    """Every cell of the grid (or those (shift, spread) in `cells`) for one sampler entry."""
    name, overrides = parse(entry)
    module = load_algorithm(name)
    args = configured(module, {"num_samples": K, "hmc_burnin": 5, "hmc_leapfrog": 2, **overrides})  # an entry may override these
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
                rows.append({"entry": entry, "chains": args.hmc_chains, "shift": shift, "spread": spread, "start": start,
                             **row, "ok": passes(row)})
    return rows


@dataclasses.dataclass
class Config:
    entries: list[str] = dataclasses.field(default_factory=lambda: ["misa"])
    """samplers to measure, benchmarks/speed.py's entry syntax"""
    out: str = "results/hmc-accuracy.md"
    """markdown table (a JSON of the rows is written beside it)"""
    spreads: list[float] = dataclasses.field(default_factory=lambda: list(reference.SPREADS))
    """only the cells of these Q spreads (a quicker look at one regime)"""
    run_dir: str | None = None
    """measure on this trained MISA run's networks instead of the grid's targets"""
    run_seed: int | None = None
    """with --run-dir: the seed whose agent to take (default: the run's first)"""
    seed: int = 0
    """seed of the sampler's random draws (the grid's targets and references stay)"""


def main(cfg: Config) -> None:
    t = time.time()
    target_lines = []
    if cfg.run_dir is not None:
        about, target = run_target(cfg.run_dir, cfg.run_seed)
        mean, std, accept, divergent = map(np.asarray, reference.nuts_moments(*target[:3], jax.random.PRNGKey(0)))
        rows = [row for entry in cfg.entries for row in run_rows(entry, target, mean, std, about, cfg.seed)]
        target_lines = [f"Target: the networks of seed {about['seed']} of `{about['run']}` ({about['env']}) at update "
                        f"{about['update']}, on {reference.STATES} of its dataset's states: policy log-std per action "
                        f"dimension {about['log_std']} (mean over the states), Q spread {about['spread']:.2f} units over 50 "
                        f"policy actions; NUTS reference acceptance {accept.mean():.2f}, {int(divergent.sum())} divergences.", ""]
    else:
        cells = [(shift, spread) for shift in reference.SHIFTS for spread in cfg.spreads]
        rows = [row for entry in cfg.entries for row in grid(entry, cfg.seed, cells)]
    lines = ["# HMC sampler accuracy in trained regimes", "",
             f"Written by `python benchmarks/hmc_accuracy.py {' '.join(sys.argv[1:])}` "
             f"({time.time() - t:.0f} s); method in that file's docstring, targets and NUTS reference in "
             "`tests/hmc_reference.py`. Pass: acceptance >= 0.5, every state's mean within 0.2 reference std, "
             "every std ratio within 1.3x.", "", *target_lines,
             "| sampler | chains | log-std shift | Q spread | start | acceptance | step (mass units) | max mean error (ref std) "
             "| std ratio (min-max) | Stein scale | pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['entry']}` | {r['chains']} | {r['shift']} | {r['spread']:.3g} | {r['start']} | {r['acceptance']:.2f} | "
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
    from common import runlog

    runlog.cli(main, Config)

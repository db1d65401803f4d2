"""Mutation check of algorithms/misa.py: each entry of MUTATIONS is a one-line change that makes MISA
wrong (or silently changes a documented default); the tests that guard the file must fail on every one.

    python benchmarks/mutate.py                      # every mutation; the table goes to results/mutations.md
    python benchmarks/mutate.py --only 1 7 --out ''  # some of them, nothing written

Each mutation is applied to a copy of the checkout's algorithms/, common/, benchmarks/ and tests/ in a
temporary directory (its text must occur exactly once in misa.py; where the same line stands once in
misa_dv.py and misa_f.py, the sections the three files share, it is changed there too, so that the test
that the files differ only in the bound does not catch what the maths tests miss), and TESTS run there with
`pytest -x` (stop at the first failure). Caught: pytest's exit status 1, a test failed. A mutation the
tests cannot even collect (status 2 or more) is reported as broken, which is not caught. Slow (one
pytest session per mutation, minutes each on 2 busy CPU cores): not part of the default suite.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
TARGET = "algorithms/misa.py"
TWINS = ["algorithms/misa_dv.py", "algorithms/misa_f.py"]  # the same sections but the bound
# The guarding tests: the official parity (losses, the whole update, float64 references, documented
# defaults), MISA's maths and its sampler; the end-to-end runs and trainings of test_misa.py are left out
# (minutes each).
TESTS = ["tests/test_official_parity.py", "tests/test_misa.py", "tests/test_hmc.py",
         "-k", "not end_to_end and not bandit and not seed_i and not earlier_version"]

# (what the change breaks, text in misa.py, its replacement)
MUTATIONS: list[tuple[str, str, str]] = [
    ("the Lagrange-weighted regulariser doubled inside the update",
     "gamma_1 = args.min_q_weight * multiplier *", "gamma_1 = 2 * args.min_q_weight * multiplier *"),
    ("the actor (and HMC) see the pre-update critic",
     'actor_critic = critic if args.actor_sees == "updated" else state.critic', "actor_critic = state.critic"),
    ("the Polyak rate doubled", "polyak(state.critic_target, critic, args.tau)",
     "polyak(state.critic_target, critic, 2 * args.tau)"),
    ("the targets follow the pre-update critic", "polyak(state.critic_target, critic, args.tau)",
     "polyak(state.critic_target, state.critic, args.tau)"),
    ("the bound ignores the temperature's rescaling", "log_z = t * (jax.nn.logsumexp(q_samples / t, axis=1)",
     "log_z = (jax.nn.logsumexp(q_samples / t, axis=1)"),
    ("the correction's weights ignore the temperature",
     "weights = jnp.full(q_samples.shape[0], t / q_samples.shape[0])",
     "weights = jnp.full(q_samples.shape[0], 1.0 / q_samples.shape[0])"),
    ("the upper log-std clip moved", "jnp.clip(scale * raw + shift, -5.0, 2.0)", "jnp.clip(scale * raw + shift, -5.0, 3.0)"),
    ("the lower log-std clip moved", "jnp.clip(scale * raw + shift, -5.0, 2.0)", "jnp.clip(scale * raw + shift, -6.0, 2.0)"),
    ("the mean clip moved", "jnp.clip(mu, -9.0, 9.0)", "jnp.clip(mu, -10.0, 10.0)"),
    ("the dataset-action clip moved", "jnp.clip(action, -0.999, 0.999)", "jnp.clip(action, -0.9999, 0.9999)"),
    ("default unbiased_weight", "unbiased_weight: float = 0.1", "unbiased_weight: float = 0.2"),
    ("default min_q_weight", "min_q_weight: float = 5.0", "min_q_weight: float = 4.0"),
    ("default discount", "discount: float = 0.99", "discount: float = 0.98"),
    ("default lagrange_init", "lagrange_init: float = 1.0", "lagrange_init: float = 0.0"),
    ("default bc_weight", "bc_weight: float = 0.5", "bc_weight: float = 1.0"),
    ("default tau", "tau: float = 0.005", "tau: float = 0.01"),
    ("default actor_lr", "actor_lr: float = 1e-4", "actor_lr: float = 3e-4"),
    ("default lagrange_lr", "lagrange_lr: float = 3e-4", "lagrange_lr: float = 1e-4"),
    ("the temperature's optimiser at the critic's learning rate", "alpha=optax.adam(args.actor_lr)",
     "alpha=optax.adam(args.critic_lr)"),
    ("the default entropy target", "target_entropy = -batch.action.shape[1] if",
     "target_entropy = -2 * batch.action.shape[1] if"),
    ("the temperature loss's sign", "return -(log_alpha * (jax.lax.stop_gradient(log_pi) + target_entropy)).mean()",
     "return (log_alpha * (jax.lax.stop_gradient(log_pi) + target_entropy)).mean()"),
    ("the Lagrange loss's sign", "return -jnp.clip(jnp.exp(log_lagrange), 0.0, 1e6) * args.min_q_weight",
     "return jnp.clip(jnp.exp(log_lagrange), 0.0, 1e6) * args.min_q_weight"),
    ("the Lagrange budget's shift reversed",
     'return args.lagrange_tau - (official_norm_shift(args) if args.lse_norm == "samples" else 0.0)',
     'return args.lagrange_tau + (official_norm_shift(args) if args.lse_norm == "samples" else 0.0)'),
    ("the official normalisation's sign", "float(np.log(args.num_samples) - np.log(args.batch_size))",
     "float(np.log(args.batch_size) - np.log(args.num_samples))"),
    ("the TD target from the online critic",
     "next_q = jax.vmap(critic_target)(batch.next_obs, next_action).min(axis=-1)",
     "next_q = jax.vmap(critic)(batch.next_obs, next_action).min(axis=-1)"),
    ("the TD target takes the max of the twin critics",
     "next_q = jax.vmap(critic_target)(batch.next_obs, next_action).min(axis=-1)",
     "next_q = jax.vmap(critic_target)(batch.next_obs, next_action).max(axis=-1)"),
    ("the TD error averaged over the critics instead of summed",
     "td = ((q_data - target[:, None]) ** 2).mean(axis=0).sum()", "td = ((q_data - target[:, None]) ** 2).mean()"),
    ("the actor's Q is the mean of the twin critics", "q_new = jax.vmap(critic)(batch.obs, new_action).min(axis=-1)",
     "q_new = jax.vmap(critic)(batch.obs, new_action).mean(axis=-1)"),
    ("no-ba keeps the BC term", '(0.0 if args.objective == "no-ba" else log_pi_data.mean())', "log_pi_data.mean()"),
    ("misa-biased keeps the correction",
     'if args.objective in ("misa", "no-ba", "official"):  # the Eq. 15 correction',
     'if args.objective in ("misa", "no-ba", "official", "misa-biased"):'),
    ("ba keeps the Q regulariser", 'multiplier * (args.objective != "ba")', "multiplier"),
    ("the reparameterisation uses the variance", "u = mu + jnp.exp(log_std) * eps", "u = mu + jnp.exp(2 * log_std) * eps"),
    ("the tanh Jacobian halved", "jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)",
     "jnp.sum(jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u), axis=-1)"),
    ("the log-std affine frozen when it should learn", "if not self.learn_affine:", "if self.learn_affine:"),
    ("the log-std shift starts at -2", "jnp.ones(()), -jnp.ones(())", "jnp.ones(()), -2 * jnp.ones(())"),
    ("the start's candidates weighted without their mixture density",
     "jax.random.categorical(pick_key, log_p - log_mixture,", "jax.random.categorical(pick_key, log_p,"),
    ("the widened proposals' densities without their factor w^-A", " - A * jnp.log(w), axis=-1)", ", axis=-1)"),
    ("the default start without widened candidates", "hmc_start_widths: tuple[float, ...] = (3.0, 10.0, 30.0)",
     "hmc_start_widths: tuple[float, ...] = ()"),
    ("the fit takes the gradients' inverse covariance alone (no geometric mean with the draws')",
     "fit_root, _ = sqrt_and_inverse_sqrt(symmetric(C_half @ M_inv_half @ C_half))", "_, fit_root = sqrt_and_inverse_sqrt(M)"),
    ("the fit ignores the draws' own covariance (C = I: only right on average)",
     "C, G = covariance(z), covariance(g)", "C, G = jnp.eye(A), covariance(g)"),
    ("the chains run in the policy's coordinates after the fit",
     "centre, factor = fit_to_p(log_density, starts, jnp.exp(ls), fit_key, args)",
     "centre, _ = fit_to_p(log_density, starts, jnp.exp(ls), fit_key, args); factor = jnp.diag(jnp.exp(ls))"),
    ("the ascent keeps steps that lower log p", "up = value_new > value  # False for NaN", "up = value_new == value_new"),
    ("the fit climbs from the worst candidates", "idx = jax.lax.top_k(log_p,", "idx = jax.lax.top_k(-log_p,"),
    ("the default sampler without the fit", "hmc_fit_ascent: tuple[int, ...] = (0, 10, 5, 0)",
     "hmc_fit_ascent: tuple[int, ...] = ()"),
]


@dataclasses.dataclass
class Config:
    only: list[int] = dataclasses.field(default_factory=list)
    """numbers (1-based) of the mutations to run (default: all)"""
    out: str = "results/mutations.md"
    """markdown file for the table ('' for none)"""


def check_applicable(text: str) -> None:
    bad = [f"{i}. {what}: found {text.count(old)} times" for i, (what, old, _) in enumerate(MUTATIONS, 1)
           if text.count(old) != 1]
    if bad:
        raise SystemExit("mutations whose text is not in misa.py exactly once:\n  " + "\n  ".join(bad))


def run_one(old: str, new: str) -> tuple[str, str, float]:
    """(caught / SURVIVED / broken, the first failing test, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("algorithms", "common", "benchmarks", "tests"):
            shutil.copytree(ROOT / sub, Path(tmp) / sub, ignore=shutil.ignore_patterns("__pycache__"))
        for path in [Path(tmp) / TARGET, *(Path(tmp) / twin for twin in TWINS)]:
            text = path.read_text()
            if text.count(old) == 1:
                path.write_text(text.replace(old, new))
        start = time.time()
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *TESTS],
                             cwd=tmp, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tmp})
        seconds = time.time() - start
    failed = re.findall(r"^FAILED (\S+)", out.stdout, re.M)
    status = {0: "SURVIVED", 1: "caught"}.get(out.returncode, f"broken (pytest status {out.returncode})")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return status, failed[0] if failed else last, seconds


def main(cfg: Config) -> None:
    check_applicable((ROOT / TARGET).read_text())
    chosen = cfg.only or list(range(1, len(MUTATIONS) + 1))
    rows = []
    for i in chosen:
        what, old, new = MUTATIONS[i - 1]
        status, test, seconds = run_one(old, new)
        rows.append((i, what, status, test, seconds))
        print(f"{i:2d}. {what}: {status} by {test} ({seconds:.0f} s)", flush=True)
    caught = sum(r[2] == "caught" for r in rows)
    print(f"{caught} of {len(rows)} mutations caught")
    if cfg.out:
        only = f" --only {' '.join(map(str, cfg.only))}" if cfg.only else ""
        lines = [f"# Mutation check of `{TARGET}`", "",
                 f"Command: `python benchmarks/mutate.py{only}` (each mutation on a copy of the checkout, then "
                 f"`pytest -x {' '.join(TESTS[:-2])} -k \"{TESTS[-1]}\"`). **{caught} of {len(rows)} caught.**", "",
                 "| # | mutation | result | first failing test | s |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {what} | {status} | `{test}` | {seconds:.0f} |" for i, what, status, test, seconds in rows]
        (ROOT / cfg.out).write_text("\n".join(lines) + "\n")
    if caught < len(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main(tyro.cli(Config))

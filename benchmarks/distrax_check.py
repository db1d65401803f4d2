"""Why the MISA files' tanh-Gaussian is not distrax's: numerics and speed, ours against distrax's.

    pip install distrax==0.1.9 tfp-nightly==0.26.0.dev20261027   # not in requirements.txt (README, Install)
    python benchmarks/distrax_check.py

Numerics: log pi(tanh u | s) of algorithms/misa.py (`tanh_gaussian_log_prob`, from the pre-tanh u) and
of distrax's Transformed(MultivariateNormalDiag, Block(Tanh)) in two forms, at the pre-tanh point
(`distribution.log_prob(u) - bijector.forward_log_det_jacobian(u)`) and through its own API
(`log_prob(a)`, which inverts tanh), each against a float64 reference: at typical points, at the
log-std clip edges (-5, 2), at dataset actions clipped to +-0.999, and where tanh saturates.
Speed: the log-probability and sampling work of one MISA update at the paper's sizes (B = 256, K = 50,
A = 3: the K policy samples with their log pi, the new action's, the data's and the HMC samples'
log pi, and the gradient with respect to mu and log-std), jitted, both ways alternately, median of
`--repeats`. The whole update is timed by benchmarks/speed.py (results/speed.md).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from algorithms import misa


@dataclasses.dataclass
class Config:
    repeats: int = 200
    """timed calls of each implementation (alternating); the median is reported"""
    points: int = 20_000
    """points per numerics case"""


def reference(u: np.ndarray, mu: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    """log pi(tanh u) in float64, log(1 - tanh^2 u) = 2 (log 2 - |u| - log1p(exp(-2 |u|)))."""
    u, mu, log_std = (np.asarray(x, np.float64) for x in (u, mu, log_std))
    gauss = np.sum(-0.5 * ((u - mu) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi), -1)
    return gauss - np.sum(2 * (np.log(2) - np.abs(u) - np.log1p(np.exp(-2 * np.abs(u)))), -1)


def main(cfg: Config) -> None:
    try:
        import distrax
    except ImportError:
        raise SystemExit("distrax is not installed: pip install distrax==0.1.9 tfp-nightly==0.26.0.dev20261027")

    def policy(mu, log_std):
        return distrax.Transformed(distrax.MultivariateNormalDiag(mu, jnp.exp(log_std)), distrax.Block(distrax.Tanh(), 1))

    def distrax_at_u(u, mu, log_std):
        dist = policy(mu, log_std)
        return dist.distribution.log_prob(u) - dist.bijector.forward_log_det_jacobian(u)

    implementations = {"ours": jax.jit(misa.tanh_gaussian_log_prob), "distrax at u": jax.jit(distrax_at_u),
                       "distrax log_prob(a)": jax.jit(lambda a, mu, log_std: policy(mu, log_std).log_prob(a))}

    rng, n, A = np.random.default_rng(0), cfg.points, 3
    normal = lambda: rng.normal(size=(n, A))
    cases = {}
    mu, ls = rng.uniform(-2, 2, (n, A)), rng.uniform(-3, 0.5, (n, A))
    cases["typical: mu in [-2, 2], log-std in [-3, 0.5]"] = (mu + np.exp(ls) * normal(), mu, ls)
    for edge in (-5.0, 2.0):
        mu, ls = rng.uniform(-9, 9, (n, A)), np.full((n, A), edge)
        cases[f"log-std at its clip {edge:+g}, mu in [-9, 9]"] = (mu + np.exp(ls) * normal(), mu, ls)
    cases["dataset actions at the clip +-0.999"] = (
        np.asarray(misa.pre_tanh(jnp.asarray(np.sign(normal()), jnp.float32))), rng.uniform(-2, 2, (n, A)),
        rng.uniform(-3, 0.5, (n, A)))
    for size in (5.0, 9.0, 15.0, 30.0):
        u = np.sign(normal()) * size
        cases[f"saturated tanh: u = +-{size:g}"] = (u, np.clip(u + normal(), -9, 9), np.ones((n, A)))

    print("Largest error of log pi, |x - ref| / max(|ref|, 1), and the share of finite values (float32):\n")
    print("| case | " + " | ".join(implementations) + " |\n|---|---|---|---|")
    for name, (u, mu, ls) in cases.items():
        u, mu, ls = (np.asarray(x, np.float32) for x in (u, mu, ls))
        ref = reference(u, mu, ls)
        cells = []
        for label, fn in implementations.items():
            x = np.asarray(fn(np.tanh(u) if "(a)" in label else u, mu, ls), np.float64)
            finite = np.isfinite(x)
            err = np.max(np.abs(x - ref)[finite] / np.maximum(np.abs(ref[finite]), 1.0)) if finite.any() else np.nan
            cells.append(f"{err:.1e}" + ("" if finite.all() else f" ({finite.mean():.0%} finite)"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    mu, ls = rng.uniform(-9, 9, (n, A)), rng.uniform(-5, 2, (n, A))
    u = (mu + np.exp(ls) * normal()).astype(np.float32)
    print(f"\nPolicy samples whose float32 tanh is exactly +-1 (mu ~ U[-9, 9], log-std ~ U[-5, 2]): "
          f"{np.mean(np.any(np.abs(np.tanh(u)) == 1.0, -1)):.1%}")

    # speed: one update's log-probability and sampling work, with the gradient, at B = 256, K = 50, A = 3
    B, K = 256, 50
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    mu, log_std = jax.random.normal(keys[0], (B, A)), -1.0 + 0.3 * jax.random.normal(keys[1], (B, A))
    eps_policy, eps_new = jax.random.normal(keys[2], (B, K, A)), jax.random.normal(keys[3], (B, A))
    u_data, u_hmc = jax.random.normal(keys[4], (B, A)), jax.random.normal(keys[5], (B, K, A))

    def work(log_prob):
        def total(mu, log_std):
            u = mu[:, None] + jnp.exp(log_std[:, None]) * eps_policy
            u_new = mu + jnp.exp(log_std) * eps_new
            return (log_prob(u, mu[:, None], log_std[:, None]).mean() + log_prob(u_new, mu, log_std).mean()
                    + log_prob(u_data, mu, log_std).mean() + log_prob(u_hmc, mu[:, None], log_std[:, None]).mean()
                    + jnp.tanh(u).mean())
        return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))

    timed = {"ours": work(misa.tanh_gaussian_log_prob), "distrax at u": work(distrax_at_u)}
    times = {k: [] for k in timed}
    for fn in timed.values():
        jax.block_until_ready(fn(mu, log_std))  # compile
    for _ in range(cfg.repeats):
        for k, fn in timed.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(mu, log_std))
            times[k].append(time.perf_counter() - t)
    ours, theirs = (float(np.median(times[k])) * 1e6 for k in timed)
    flops = {k: fn.lower(mu, log_std).compile().cost_analysis()["flops"] for k, fn in timed.items()}
    print(f"\nLog-prob and sampling work of one update with its gradient (B {B}, K {K}, A {A}), median of "
          f"{cfg.repeats}: ours {ours:.0f} us, distrax at u {theirs:.0f} us ({theirs / ours - 1:+.1%}); "
          f"XLA's flop count of the compiled work: ours {flops['ours']:.0f}, distrax at u {flops['distrax at u']:.0f}")


if __name__ == "__main__":
    main(tyro.cli(Config))

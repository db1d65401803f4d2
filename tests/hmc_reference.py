"""Sampler targets in the regimes training reaches, and an independent reference for each.

A target is p(u|s) ∝ N(u; mu(s), sigma(s)) exp(min_i Q_i(s, tanh u)) on the networks of the recorded
official update (tests/fixtures/official_misa), for 16 of its states, with
- the policy's log-std shift (the trainable scalar of the official policy) at -1 (its default), -3 (a
  narrow, trained-like policy) or a per-dimension mix (-1, -3, -2);
- the critic scaled so that min Q varies over the policy's actions by a given *spread*: the mean over
  states of (max - min) of min Q over 50 policy actions (a fixed draw) is 1, 10, 30 or 100 units.
The reference moments (per state and dimension: mean and std of u under p) come from blackjax NUTS with
Stan's window adaptation, 4 chains per state started from the policy, 500 warm-up steps and 2000 draws
each: no part of MISA's sampler is used. Regenerate the stored references (minutes) with

    python tests/hmc_reference.py          # writes tests/fixtures/hmc_reference.npz
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import blackjax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from algorithms import misa  # noqa: E402
from test_official_parity import OFFICIAL, load, official_models  # noqa: E402

FILE = Path(__file__).parent / "fixtures" / "hmc_reference.npz"
STATES = 16
SHIFTS = {"-1": -1.0, "-3": -3.0, "mix": (-1.0, -3.0, -2.0)}  # log-std shift of the official policy
SPREADS = (1.0, 10.0, 30.0, 100.0)  # units of Q over the policy's actions
WARMUP, DRAWS, CHAINS = 500, 2000, 4


def networks() -> tuple[misa.Actor, misa.Critic, jax.Array, jax.Array]:
    """The official update's actor and critic (flax parameters in our modules), its first STATES
    observations and dataset actions."""
    fx = load("official_update")
    actor, critic, _ = official_models(fx, misa.Args(**OFFICIAL))
    return actor, critic, jnp.asarray(fx["batch/observations"][:STATES]), jnp.asarray(fx["batch/actions"][:STATES])


def q_spread(actor: misa.Actor, critic: misa.Critic, obs: jax.Array) -> float:
    """Mean over states of the range of min Q over 50 policy actions (a fixed normal draw)."""
    mu, log_std = jax.vmap(actor)(obs)
    u = mu[:, None] + jnp.exp(log_std)[:, None] * jax.random.normal(jax.random.PRNGKey(1), (obs.shape[0], 50, mu.shape[1]))
    q = jax.vmap(jax.vmap(lambda o, a: critic(o, a).min(), in_axes=(None, 0)))(obs, jnp.tanh(u))
    return float((q.max(1) - q.min(1)).mean())


def scale_critic(critic: misa.Critic, c: float) -> misa.Critic:
    """c * Q for both critics (their last layer scaled)."""
    last = lambda cr: (cr.nets.layers[-1].weight, cr.nets.layers[-1].bias)
    w, b = last(critic)
    return eqx.tree_at(last, critic, (w * c, b * c))


def target(shift: str, spread: float, scale: float | None = None) -> tuple[misa.Actor, misa.Critic, jax.Array, jax.Array, float]:
    """(actor, critic, observations, dataset actions, critic scale) of one target; `scale` (stored with
    the reference) skips computing the critic scale that gives `spread`."""
    actor, critic, obs, data = networks()
    actor = eqx.tree_at(lambda a: a.log_std_shift, actor, jnp.asarray(SHIFTS[shift], jnp.float32))
    if scale is None:
        scale = spread / q_spread(actor, critic, obs)  # Q is linear in its last layer: the range scales with it
    return actor, scale_critic(critic, scale), obs, data, scale


@eqx.filter_jit
def nuts_moments(actor: misa.Actor, critic: misa.Critic, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, ...]:
    """Per state: mean and std of u under p (STATES, A), and the NUTS acceptance rate and divergence count."""
    mu, log_std = jax.vmap(actor)(obs)

    def one_state(args):
        o, m, ls, k = args
        logdensity = lambda u: misa.improved_log_density(u, o, m, ls, critic, 1.0)

        def one_chain(k):
            k_start, k_warm, k_draw = jax.random.split(k, 3)
            start = m + jnp.exp(ls) * jax.random.normal(k_start, m.shape)
            warmup = blackjax.window_adaptation(blackjax.nuts, logdensity, initial_inverse_mass_matrix=jnp.exp(2 * ls))
            (state, params), _ = warmup.run(k_warm, start, WARMUP)
            kernel = blackjax.nuts(logdensity, **params)

            def step(s, k):
                s, info = kernel.step(k, s)
                return s, (s.position, info.acceptance_rate, info.is_divergent)

            _, (u, accept, divergent) = jax.lax.scan(step, state, jax.random.split(k_draw, DRAWS))
            return u, accept.mean(), divergent.sum()

        u, accept, divergent = jax.vmap(one_chain)(jax.random.split(k, CHAINS))
        u = u.reshape(-1, u.shape[-1])
        return u.mean(0), u.std(0), accept.mean(), divergent.sum()

    # one state at a time (lax.map): under vmap every state would run to the deepest tree of any
    return jax.lax.map(one_state, (obs, mu, log_std, jax.random.split(key, obs.shape[0])))


def stored() -> dict[str, np.ndarray]:
    with np.load(FILE) as f:
        return {k: f[k] for k in f.files}


def main() -> None:
    out = {}
    for shift in SHIFTS:
        for spread in SPREADS:
            t = time.time()
            name = f"{shift}/{spread:g}"
            actor, critic, obs, _, scale = target(shift, spread)
            mean, std, accept, divergent = nuts_moments(actor, critic, obs, jax.random.PRNGKey(0))
            out.update({f"{name}/scale": np.float64(scale), f"{name}/mean": np.asarray(mean),
                        f"{name}/std": np.asarray(std), f"{name}/nuts_acceptance": np.asarray(accept),
                        f"{name}/nuts_divergences": np.asarray(divergent)})
            print(f"{name}: critic x{scale:.4g}, NUTS acceptance {float(accept.mean()):.2f}, "
                  f"divergences {int(divergent.sum())}, {time.time() - t:.0f} s", flush=True)
            FILE.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(FILE, **out)  # after every target: a long regeneration keeps what it has
    print(f"wrote {FILE}")


if __name__ == "__main__":
    main()

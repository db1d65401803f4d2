"""MISA's sampler of the improved policy p(u|s) ∝ N(u; mu, sigma) exp(Q(s, tanh u)), and the Eq. 15
gradient estimator built on it, against targets with known answers.

Targets are "n x sharper than the policy": Q = -n (u - c)^2 / (2 sigma^2), so p is Gaussian with
precision (1 + n) / sigma^2 (1-D, exact KS test), or that plus a skewing term in 3-D (reference
moments by importance sampling from pi). Training carries the adapted step from one update to the
next; the tests do the same by calling the sampler a few times and passing the step on.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from algorithms import misa
from conftest import GaussActor

MU, SIGMA, C = 0.3, 0.5, 0.8  # policy mean and std (pre-tanh), location of Q's peak
B, K = 256, 50


class SharpCritic(eqx.Module):
    """Q(s, a) = sharpness * (-|u - c|^2 / (2 sigma^2) + skew * tanh(u_0 - c_0)), u = atanh(a)
    (c = C and sigma = SIGMA unless given)."""

    sharpness: jax.Array
    skew: float = eqx.field(static=True, default=0.0)
    center: float = eqx.field(static=True, default=C)
    sigma: float = eqx.field(static=True, default=SIGMA)

    def __call__(self, obs, action):
        u = jnp.arctanh(action)
        q = self.sharpness * (-jnp.sum((u - self.center) ** 2) / (2 * self.sigma**2)
                              + self.skew * jnp.tanh(u[0] - self.center))
        return jnp.stack([q, q + 1.0])  # the sampler uses the min over the twin critics


@functools.lru_cache(maxsize=None)
def sampler_update(adapt: bool, chains: str, dim: int, start: str = "resample", fit: bool = True):
    """One training update's sampling, compiled once per layout (the target is an argument): the
    chains start as `update` starts them (misa.chain_starts from K policy actions, or the dataset
    actions, here drawn from pi), then `misa.sample_improved_actions`; fit=False: without
    --hmc-fit-ascent (the policy's covariance as inverse mass)."""
    args = misa.Args(num_samples=K, hmc_burnin=5, hmc_leapfrog=2, hmc_step_size=1.0, hmc_adapt=adapt, hmc_chains=chains,
                     hmc_start=start, **({} if fit else {"hmc_fit_ascent": ()}))
    actor = GaussActor(jnp.full(dim, MU), jnp.full(dim, np.log(SIGMA)))
    obs = jnp.zeros((B, 1))

    @eqx.filter_jit
    def one_update(critic, log_step, key):
        start_key, chain_key = jax.random.split(key)
        u_policy = MU + SIGMA * jax.random.normal(start_key, (B, K, dim))
        if start == "dataset":
            u = u_policy[:, :1]  # one start per state, as update passes the dataset action
        else:
            u = misa.chain_starts(actor, critic, obs, u_policy, jax.random.fold_in(start_key, 1), args)
        return misa.sample_improved_actions(actor, critic, obs, u, log_step, chain_key, args)

    return one_update


def run_sampler(sharpness: float, adapt: bool, chains: str = "sequential", dim: int = 1, skew: float = 0.0,
                updates: int = 15, seed: int = 0, start: str = "resample", fit: bool = True, critic=None):
    """`updates` successive calls, as in training, the step carried over (moved by each call's
    acceptance). Returns the last call's samples (B, K, dim) and diagnostics."""
    critic = SharpCritic(jnp.asarray(sharpness, jnp.float32), skew) if critic is None else critic
    one_update = sampler_update(adapt, chains, dim, start, fit)
    log_step = jnp.log(1.0)
    for key in jax.random.split(jax.random.PRNGKey(seed), updates):
        u, info = one_update(critic, log_step, key)
        log_step = info["log_step"] if adapt else log_step
    return np.asarray(u), {k: float(v) for k, v in info.items()}


def exact_1d(sharpness: float) -> stats.rv_continuous:
    precision = (1 + sharpness) / SIGMA**2
    return stats.norm((MU + sharpness * C) / SIGMA**2 / precision, precision**-0.5)


@pytest.mark.parametrize("chains", ["sequential", "parallel"])
@pytest.mark.parametrize("sharpness", [1.0, 10.0, 30.0])
def test_adaptive_hmc_matches_the_exact_density_as_q_sharpens(chains, sharpness):
    u, info = run_sampler(sharpness, adapt=True, chains=chains)
    ks = stats.kstest(u.ravel(), exact_1d(sharpness).cdf).statistic
    print(f"{chains} x{sharpness:g}: acceptance {info['hmc_acceptance']:.3f}, step {info['hmc_step']:.3f} sigma, KS {ks:.3f}")
    assert 0.6 <= info["hmc_acceptance"] <= 0.9  # around --hmc-target-accept 0.75
    assert ks < 0.05
    assert 0.5 < info["hmc_step"] < 2.0  # in units of the fitted std of p, whatever its width


@pytest.mark.parametrize("chains", ["sequential", "parallel"])
def test_a_fixed_step_of_one_policy_std_freezes_at_30x(chains):
    """Without adaptation or the fit, in policy-std units, chains started at the dataset action (the
    official start; one point per state for all K chains) barely move on a sharp target: the failure
    the adaptation exists for. Sequential is the official layout."""
    u, info = run_sampler(30.0, adapt=False, chains=chains, start="dataset", fit=False)
    assert info["hmc_acceptance"] < 0.05 and info["hmc_step"] == pytest.approx(1.0)
    assert stats.kstest(u.ravel(), exact_1d(30.0).cdf).statistic > 0.3


@pytest.mark.parametrize("sharpness", [1.0, 10.0, 30.0])
def test_adaptive_hmc_means_in_3d_match_importance_sampling(sharpness):
    """A skewed 3-D target: the sample means per dimension are within 0.1 reference std of the
    self-normalised importance-sampling estimate from 2M policy samples."""
    u, info = run_sampler(sharpness, adapt=True, dim=3, skew=0.5)
    draws = MU + SIGMA * jax.random.normal(jax.random.PRNGKey(7), (2_000_000, 3))
    critic = SharpCritic(jnp.asarray(sharpness, jnp.float32), 0.5)
    log_w = jax.vmap(lambda x: critic(None, jnp.tanh(x)).min())(draws)
    w = np.asarray(jax.nn.softmax(log_w), np.float64)
    draws = np.asarray(draws, np.float64)
    ref_mean = w @ draws
    ref_std = np.sqrt(w @ (draws - ref_mean) ** 2)
    assert 1.0 / np.sum(w**2) > 5000  # the reference has enough effective samples
    err = (u.reshape(-1, 3).mean(axis=0) - ref_mean) / ref_std
    print(f"x{sharpness:g}: acceptance {info['hmc_acceptance']:.3f}, mean errors {np.round(err, 3)} ref std")
    assert 0.6 <= info["hmc_acceptance"] <= 0.9
    assert np.abs(err).max() < 0.1


@pytest.mark.parametrize("fit", [False, True], ids=["resample", "fit-starts"])
@pytest.mark.parametrize("widths", [(), None], ids=["policy-actions-only", "default"])
def test_the_start_reaches_p_far_from_the_policy_only_with_widened_candidates(widths, fit):
    """1-D, exact: pi = N(0.3, 0.05^2) and Q 900x sharper than pi, peaked so that p (Gaussian, mean
    (mu + n c) / (1 + n)) sits 10 policy stds from pi's mean. Among the K policy actions alone, the
    resampled starts (and the best candidates the fit climbs from) stay within a few stds of pi; with the
    widened candidates their mean is within 1 policy std of p's."""
    sigma, n = 0.05, 900.0
    p_mean = MU + 10 * sigma
    critic = SharpCritic(jnp.asarray(n), center=MU + (p_mean - MU) * (1 + n) / n, sigma=sigma)
    actor = GaussActor(jnp.full(1, MU), jnp.full(1, np.log(sigma)))
    u_policy = MU + sigma * jax.random.normal(jax.random.PRNGKey(0), (B, K, 1))
    args = misa.Args(**({} if widths is None else {"hmc_start_widths": widths}), **({} if fit else {"hmc_fit_ascent": ()}))
    start = misa.chain_starts(actor, critic, jnp.zeros((B, 1)), u_policy, jax.random.PRNGKey(1), args)
    error = abs(float(np.asarray(start).mean()) - p_mean) / sigma
    print(f"widths {widths}: starts' mean {float(np.asarray(start).mean()):.3f}, p's {p_mean:.3f}: {error:.2f} stds off")
    assert error < 1.0 if widths is None else error > 5.0


class FlatCritic(eqx.Module):
    """Q = 0 at every action, saturated ones included (SharpCritic's atanh is infinite there)."""

    def __call__(self, obs, action):
        return jnp.zeros(2)


def test_the_widened_start_is_a_sample_of_p_when_q_is_flat():
    """3-D, Q = 0, so p = pi: with the default widened candidates the resampled starts (without the fit)
    have pi's mean and std in every dimension (the mixture density and its per-dimension factor w^A in the
    weights; without either the starts come out some 25 % too narrow)."""
    sigma = jnp.asarray([0.05, 0.3, 1.0])
    actor = GaussActor(jnp.asarray([MU, -MU, 0.0]), jnp.log(sigma))
    u_policy = actor.mu[None, None] + sigma[None, None] * jax.random.normal(jax.random.PRNGKey(0), (B, K, 3))
    start = np.asarray(misa.chain_starts(actor, FlatCritic(), jnp.zeros((B, 1)), u_policy, jax.random.PRNGKey(1),
                                         misa.Args(hmc_fit_ascent=())))
    z = (start.reshape(-1, 3) - np.asarray(actor.mu)) / np.asarray(sigma)
    print("starts' mean and std in policy stds:", z.mean(0), z.std(0))
    assert np.abs(z.mean(0)).max() < 0.05
    assert np.abs(z.std(0) - 1).max() < 0.05


def gaussian_log_density(mean: jax.Array, cov: jax.Array):
    precision = jnp.linalg.inv(cov)
    return lambda u: -0.5 * (u - mean) @ precision @ (u - mean)


CORRELATED = jnp.asarray([[0.0025, 0.0135, 0.0], [0.0135, 0.09, 0.03], [0.0, 0.03, 1.0]])  # stds 0.05, 0.3, 1; corr 0.9


@pytest.mark.parametrize("guess", [np.diag([0.05, 0.3, 1.0]), np.diag([0.15, 0.1, 2.0])], ids=["uncorrelated", "badly-scaled"])
def test_fit_factor_is_exact_for_a_gaussian_whatever_the_guess(guess):
    """For a Gaussian p the fit (the geometric mean of the draws' covariance and the inverse covariance of
    grad log p at them) is p's covariance exactly, from 10 draws around the centre, whatever the guess (a factor
    L, covariance L L^T; here without p's correlation of 0.9, or also 3x off in std) and the centre: the fit's
    defining property. One fit is exact where the guess is within ~18x of p's stds in every direction (the cap
    on M's condition number, 1e5); the badly-scaled guess is 21x off along p's narrowest axis, so its first fit
    is some 10 % off there and the second, from the first, exact (fit_to_p fits four times)."""
    mean = jnp.asarray([0.3, -0.2, 1.0])
    log_density = gaussian_log_density(mean, CORRELATED)
    first = misa.fit_factor(log_density, mean + 0.5, jnp.asarray(guess, jnp.float32), jax.random.PRNGKey(0), 10)
    tolerance = 0.05 if guess[0, 0] == 0.05 else 0.2
    np.testing.assert_allclose(np.asarray(first @ first.T), np.asarray(CORRELATED), rtol=tolerance, atol=tolerance / 20)
    second = misa.fit_factor(log_density, mean - 0.3, first, jax.random.PRNGKey(1), 10)
    np.testing.assert_allclose(np.asarray(second @ second.T), np.asarray(CORRELATED), rtol=2e-3, atol=2e-5)


def test_four_fits_find_a_ridge_450x_narrower_than_the_guess_in_float32():
    """fit_to_p's four successive fits, for 256 states at once (vmapped, as in training), on the Gaussian ridge
    of RidgeCritic with n up to 1e5 (p's std across is 1/447 of the guess's): every fit finite and p's
    covariance within 2 % in every direction. (Rooting G before the product lost positive-definiteness in
    float32 at n = 1e3 and returned NaN for some states.)"""

    @jax.jit
    def fits(n):
        v = jnp.asarray([1.0, -1.0, 0.0]) / jnp.sqrt(2.0)
        log_density = gaussian_log_density(jnp.full(3, MU), SIGMA**2 * jnp.linalg.inv(jnp.eye(3) + 2 * n * jnp.outer(v, v)))

        def one_state(key):
            factor = jnp.diag(jnp.full(3, SIGMA))
            for i in range(4):
                factor = misa.fit_factor(log_density, jnp.full(3, MU + 0.1), factor, jax.random.fold_in(key, i), 10)
            return factor

        return jax.vmap(one_state)(jax.random.split(jax.random.PRNGKey(0), 256))

    for n in [1e3, 1e5]:
        factors = np.asarray(fits(jnp.float32(n)), np.float64)
        assert np.isfinite(factors).all()
        v = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
        whiten = np.linalg.cholesky(np.eye(3) + 2 * n * np.outer(v, v)).T / SIGMA  # S^-1 = whiten^T whiten
        relative = np.linalg.eigvalsh(whiten @ factors @ np.swapaxes(factors, 1, 2) @ whiten.T)
        np.testing.assert_allclose(relative, 1.0, atol=0.02)


def test_sqrt_and_inverse_sqrt_by_matrix_products():
    """Newton-Schulz against the eigendecomposition, up to a condition number of 1e6."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    w = np.logspace(0, -6, 5) * 37.0
    root, inverse_root = misa.sqrt_and_inverse_sqrt(jnp.asarray((q * w) @ q.T, jnp.float32))
    np.testing.assert_allclose(np.asarray(root), (q * np.sqrt(w)) @ q.T, rtol=0, atol=1e-4 * np.sqrt(w.max()))
    np.testing.assert_allclose(np.asarray(inverse_root), (q / np.sqrt(w)) @ q.T, rtol=0, atol=3e-3 / np.sqrt(w.min()))


def test_ascend_climbs_to_a_far_mode_and_never_goes_down():
    """From 25 stds away (in the metric of the guess), the default 15 ascent steps end within one std of a
    Gaussian's mode, in p's bulk; every step that would lower log p is undone, so the value returned is log p
    at the point returned and above the start's."""
    mean = jnp.asarray([0.3, -0.2, 1.0])
    log_density = gaussian_log_density(mean, CORRELATED)
    start = mean + 25 * jnp.sqrt(jnp.diag(CORRELATED))
    x, value = misa.ascend(log_density, start, jnp.linalg.cholesky(CORRELATED), sum(misa.Args().hmc_fit_ascent))
    distance = float(jnp.sqrt((x - mean) @ jnp.linalg.inv(CORRELATED) @ (x - mean)))
    assert distance < 1.0
    assert float(value) == pytest.approx(float(log_density(x)), rel=1e-5) and float(value) > float(log_density(start))


class RidgeCritic(eqx.Module):
    """Q = -n (u_0 - u_1)^2 / (2 sigma^2), u = atanh(a): with pi = N(MU, SIGMA^2 I), p is Gaussian with
    covariance SIGMA^2 (I + n v v^T)^-1, v = (1, -1, 0): a ridge 1 / sqrt(1 + 2n) times as wide across as along.
    Actions where tanh rounds to +-1 are clipped just inside: there atanh(a_0) - atanh(a_1) would be inf - inf,
    and a NaN or +inf Q would outrank every real candidate start (p has no mass there, |u| > 8 = 16 sigma)."""

    n: float = eqx.field(static=True)

    def __call__(self, obs, action):
        u = jnp.arctanh(jnp.clip(action, -1 + 1e-7, 1 - 1e-7))
        q = -self.n * (u[0] - u[1]) ** 2 / (2 * SIGMA**2)
        return jnp.stack([q, q + 1.0])


@pytest.mark.parametrize("fit", [True, pytest.param(False, marks=pytest.mark.xfail(strict=True, reason="the sampler before the fit"))],
                         ids=["fit", "policy-mass"])
def test_the_chains_move_along_a_narrow_ridge(fit):
    """3-D, exact: a ridge 45x narrower across than along (n = 1000). Each chain's 50 samples must spread
    along the ridge (their variance there, averaged over chains, at least 70 % of p's: a chain that creeps
    has a fraction of it), and the pooled samples have p's mean and covariance. With the policy's covariance
    as inverse mass the step must be as short as the ridge is narrow, and the chains creep."""
    n = 1000.0
    u, info = run_sampler(0.0, adapt=True, dim=3, critic=RidgeCritic(n), fit=fit)
    v = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    cov = SIGMA**2 * np.linalg.inv(np.eye(3) + n * 2 * np.outer(v, v))
    along = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    within = (u @ along).var(axis=1).mean() / (along @ cov @ along)
    axes = np.stack([along, v, [0.0, 0.0, 1.0]])  # p's principal axes
    pooled = u.reshape(-1, 3) @ axes.T
    print(f"fit {fit}: acceptance {info['hmc_acceptance']:.2f}, within-chain variance along the ridge {within:.2f} of p's")
    assert within > 0.7
    np.testing.assert_allclose(pooled.mean(0), axes @ np.full(3, MU), atol=0.03)
    np.testing.assert_allclose(pooled.var(0), np.diag(axes @ cov @ axes.T), rtol=0.1)


def test_eq15_gradient_matches_the_exact_gradient():
    """d/dmu E_s log E_pi exp Q = (c - mu) / (sigma^2 + tau^2) for Q = -(u - c)^2 / (2 tau^2); the
    estimator is E_{u~p}[d/dmu log pi(u)], computed from the sampler's output as the actor loss does."""
    sharpness = 10.0  # tau^2 = sigma^2 / sharpness
    u, _ = run_sampler(sharpness, adapt=True, seed=1)
    actor = GaussActor(jnp.array([MU]), jnp.array([np.log(SIGMA)]))
    _, weights = misa.mi_bound(jnp.zeros((B, K)), jnp.zeros(B), 1.0)

    def correction(act):
        mu, log_std = jax.vmap(act)(jnp.zeros((B, 1)))
        log_pi = misa.tanh_gaussian_log_prob(jnp.asarray(u), mu[:, None], log_std[:, None])
        return jnp.sum(weights * log_pi.mean(axis=1))

    grad = float(eqx.filter_grad(correction)(actor).mu[0])
    exact = (C - MU) / (SIGMA**2 + SIGMA**2 / sharpness)
    assert grad == pytest.approx(exact, rel=0.05)


def test_the_adapted_step_is_carried_into_the_next_update_and_logged():
    """In training, the state's hmc_log_step moves from log(--hmc-step-size) to the adapted value,
    and hmc_acceptance / hmc_step are logged; with --no-hmc-adapt it stays at the flag's value."""
    from conftest import bandit_dataset, tiny_misa_args as tiny_args, train_in_process

    ds = bandit_dataset()
    state, metrics = train_in_process(misa, tiny_args(misa, hmc_step_size=3.0, log_every=50), ds, chunks=1)
    assert "hmc_step" in metrics and "hmc_acceptance" in metrics
    assert float(state.hmc_log_step[0]) < np.log(3.0) - 0.3  # a step of 3 policy stds is too long: it shrank
    state, metrics = train_in_process(misa, tiny_args(misa, hmc_step_size=3.0, hmc_adapt=False, log_every=50), ds, chunks=1)
    assert float(state.hmc_log_step[0]) == pytest.approx(np.log(3.0))
    np.testing.assert_allclose(metrics["hmc_step"], 3.0, rtol=1e-5)


def test_training_starts_the_fit_at_each_states_dataset_action_with_hmc_start_dataset():
    """--hmc-start dataset (the official start): `update` passes one point per state, the dataset action, which
    the fit climbs from; training runs, its chains move and their samples are finite."""
    from conftest import bandit_dataset, tiny_misa_args as tiny_args, train_in_process

    state, metrics = train_in_process(misa, tiny_args(misa, hmc_start="dataset", log_every=50), bandit_dataset(), chunks=1)
    print({k: float(np.mean(v)) for k, v in metrics.items()})
    assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values())
    assert metrics["hmc_acceptance"] > 0.3 and metrics["hmc_stein_scale"] > 0.3


def test_stein_scale_is_one_for_exact_samples_zero_for_a_stuck_chain_and_above_one_when_too_wide():
    """The sampler's accuracy proxy on N(0, diag(s^2)) in 3-D: grad log p(u) = -u / s^2."""
    s = jnp.array([[0.5, 1.0, 2.0]])
    u = s * jax.random.normal(jax.random.PRNGKey(0), (20_000, 3))
    scale = lambda u: float(misa.stein_scale(u, -u / s**2))
    assert scale(u) == pytest.approx(1.0, abs=0.03)
    assert scale(jnp.broadcast_to(u[0], u.shape)) == pytest.approx(0.0, abs=1e-6)
    assert scale(2.0 * u) == pytest.approx(4.0, rel=0.05)


# --------------------------------------------------------------------------- where training takes the sampler
# The grid of tests/hmc_reference.py: the recorded official networks, the policy's log-std shift at -1,
# -3 and a per-dimension mix, Q spreads of 1 to 100 units over the policy's actions, against NUTS
# reference moments; the step carried over 30 updates, then 20 updates' samples pooled
# (benchmarks/hmc_accuracy.py, which writes the same grid to results/hmc-accuracy.md).
from hmc_reference import SHIFTS, SPREADS  # noqa: E402

# Cells where today's default is measured to fail (results/hmc-accuracy.md, seed 0), per chain layout
# (--hmc-chains auto: sequential on a CPU, parallel on a GPU). With the fit to p (--hmc-fit-ascent) every cell
# passes with one chain per state; with K chains per state two spread-100 cells miss (mean error 0.25 and 0.26
# reference std), measured on a CPU with `misa:hmc_chains=parallel`. Strict: a fix that makes one pass fails
# here until it is removed from the list.
KNOWN_FAILING = {"sequential": set(), "parallel": {("-1", 100.0), ("-3", 100.0)}}
CELLS = [(shift, spread) for spread in SPREADS for shift in SHIFTS]


@pytest.fixture(scope="module")
def default_grid(request):
    """The default sampler on every cell this session runs (the spread-1 cells by default, all with -m slow),
    compiled at XLA's default level as users' runs are: its time goes into sampling, not compiling."""
    from benchmarks.hmc_accuracy import grid
    from conftest import at_default_level

    wanted = [c for c in CELLS if c[1] == 1.0 or "slow" in request.config.getoption("-m")]
    return {(r["shift"], r["spread"]): r for r in at_default_level(grid, "misa", 0, wanted, timeout=3600)}


@pytest.mark.parametrize("shift, spread", [pytest.param(*c, marks=() if c[1] == 1.0 else pytest.mark.slow) for c in CELLS])
def test_the_default_sampler_matches_nuts_where_training_goes(default_grid, shift, spread, request):
    """Acceptance >= 0.5, every state's mean within 0.2 reference std, every dimension's std within 1.3x."""
    r = default_grid[(shift, spread)]
    if (shift, spread) in KNOWN_FAILING[r["chains"]]:
        request.applymarker(pytest.mark.xfail(strict=True, reason="measured: p out of reach (results/hmc-accuracy.md)"))
    print(r)
    assert r["acceptance"] >= 0.5
    assert r["mean_error"] <= 0.2
    assert 1 / 1.3 <= r["std_ratio_min"] and r["std_ratio_max"] <= 1.3

"""The mathematics of MISA (bounds, sampler, gradient estimator), then the scripts end to end."""

import difflib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import misa, misa_dv, misa_f
from conftest import assert_same_agent, bandit_dataset, tiny_misa_args, train_in_process

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- Theorem 4.1
def gaussian_logpdf(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)


def bounds_on_joint_gaussian(lam, shift=lambda s: 1.0, rho=0.8, n_states=4000, k=1000, seed=0):
    """(s, a) jointly Gaussian, unit variances, correlation rho: I(S; A) = -0.5 log(1 - rho^2).
    Fixed variational policy pi(a|s) = N(0.7 rho s, 0.7), fixed critic T = lam log(p(a|s)/pi(a|s)) + shift(s).
    Returns the true I and the BA, MISA, MISA-DV, MISA-f estimates (the last three from the scripts)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n_states)
    a = rho * s + np.sqrt(1 - rho**2) * rng.normal(size=n_states)
    pi_mean, pi_var = 0.7 * rho * s, 0.7
    log_p = lambda a_, s_: gaussian_logpdf(a_, rho * s_, 1 - rho**2)
    log_pi = lambda a_, s_m, s_v: gaussian_logpdf(a_, s_m, s_v)
    T = lambda a_, s_: lam * (log_p(a_, s_) - log_pi(a_, 0.7 * rho * s_, pi_var)) + shift(s_)
    a_pi = pi_mean[:, None] + np.sqrt(pi_var) * rng.normal(size=(n_states, k))  # a ~ pi(.|s)
    q_samples = jnp.asarray(T(a_pi, s[:, None]), jnp.float32)
    q_data = jnp.asarray(T(a, s), jnp.float32)
    ba = np.mean(log_pi(a, pi_mean, pi_var) - gaussian_logpdf(a, 0.0, 1.0))
    est = {"BA": ba}
    for name, module in [("MISA", misa), ("MISA-DV", misa_dv), ("MISA-f", misa_f)]:
        regulariser, _ = module.mi_bound(q_samples, q_data, 1.0)
        est[name] = ba - float(regulariser)  # I_X = BA + E_D[T] - (normaliser term)
    return -0.5 * np.log(1 - rho**2), est


def test_theorem_4_1_ordering_of_the_bounds():
    """I >= I_MISA >= I_MISA-DV >= I_MISA-f for any fixed critic; a state-dependent shift of T leaves
    MISA unchanged (one normaliser per state) but loosens DV and f, so the gaps are large here."""
    mc = 0.02  # Monte-Carlo error of these sample sizes (the estimates move by < 0.01 across seeds)
    true_i, est = bounds_on_joint_gaussian(lam=0.5, shift=lambda s: 0.5 * s)
    assert true_i + mc >= est["MISA"] >= est["BA"] - mc
    assert est["MISA"] > est["MISA-DV"] + 0.05 and est["MISA-DV"] > est["MISA-f"] + 0.05
    _, unshifted = bounds_on_joint_gaussian(lam=0.5)
    assert unshifted["MISA"] == pytest.approx(est["MISA"], abs=1e-4)


def test_every_bound_is_above_ba_when_the_critic_is_a_scaled_log_ratio():
    """T = lam log(p/pi) + 1 with lam in [0, 1]: E_pi exp T <= e per state, so all three bounds >= BA."""
    mc = 0.02
    true_i, est = bounds_on_joint_gaussian(lam=0.5)
    assert true_i + mc >= est["MISA"] >= est["MISA-DV"] >= est["MISA-f"] >= est["BA"] - mc
    assert est["MISA-f"] > est["BA"] + 0.05


def test_misa_bound_is_tight_at_the_optimal_critic():
    """With T = log p(a|s)/pi(a|s) + c, E_pi exp T = e^c per state, so I_MISA = I exactly."""
    true_i, est = bounds_on_joint_gaussian(lam=1.0)
    assert est["MISA"] == pytest.approx(true_i, abs=0.03)
    assert est["BA"] < true_i - 0.05  # the variational policy alone is not tight


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    mu, log_std = jnp.array([0.2, -0.4]), jnp.array([-0.3, 0.1])
    u = jnp.array([0.5, -1.0])
    a = jnp.tanh(u)
    direct = gaussian_logpdf(np.asarray(u), np.asarray(mu), np.exp(2 * np.asarray(log_std))).sum() - np.log(1 - np.asarray(a) ** 2).sum()
    assert float(misa.tanh_gaussian_log_prob(u, mu, log_std)) == pytest.approx(direct, rel=1e-5)


def test_weights_of_the_three_estimators():
    q = jnp.array([[0.0, 0.0], [np.log(3.0), np.log(3.0)]])  # E_pi exp Q = 1 and 3
    np.testing.assert_allclose(misa.mi_bound(q, jnp.zeros(2), 1.0)[1], [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(misa_dv.mi_bound(q, jnp.zeros(2), 1.0)[1], [0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(misa_f.mi_bound(q, jnp.zeros(2), 1.0)[1], [0.5 / np.e, 1.5 / np.e], rtol=1e-6)


def test_the_three_files_differ_only_in_the_bound():
    """Outside the module docstring and the bound (its section of Args: the Lagrange budget, and its
    functions from `mi_bound` to `critic_loss`: the bound, its normalisation and its budget), misa_dv.py
    and misa_f.py are misa.py with their own name in ALGO and the usage lines."""
    def body(module: str) -> str:
        text = (ROOT / "algorithms" / f"{module}.py").read_text()
        args_start = text.index("    # --- The bound's Lagrange budget")
        args_end = text.index("\n    # ---", args_start + 5)
        start, end = text.index("def mi_bound("), text.index("def critic_loss(")
        text = text[text.index("Where each equation lives"):args_start] + text[args_end:start] + text[end:]
        return text.replace(f'ALGO = "{module}"', "ALGO").replace(f"python algorithms/{module}.py", "python algorithms/X")

    for variant in ("misa_dv", "misa_f"):
        diff = [l for l in difflib.unified_diff(body("misa").splitlines(), body(variant).splitlines(), lineterm="", n=0)
                if l[:1] in "+-" and not l.startswith(("+++", "---"))]
        assert not diff, f"{variant}.py differs from misa.py outside the bound: {diff[:5]}"


# --------------------------------------------------------------------------- training
def test_bandit_misa_keeps_q_and_policy_in_the_data():
    ds = bandit_dataset()
    q_at = lambda state, a: float(eqx.filter_vmap(lambda c: c(jnp.zeros(1), jnp.array([a])).min())(state.critic)[0])
    misa_state, metrics = train_in_process(misa, tiny_misa_args(misa), ds)
    sac_state, _ = train_in_process(misa, tiny_misa_args(misa, objective="ba", bc_weight=0.0), ds)  # no regulariser, no BC
    assert np.isfinite(metrics["critic_loss"]).all() and 0.0 < float(metrics["hmc_acceptance"].mean()) <= 1.0
    q_data_misa, q_ood_misa = q_at(misa_state, 0.5), q_at(misa_state, 0.99)
    q_data_sac, q_ood_sac = q_at(sac_state, 0.5), q_at(sac_state, 0.99)
    mean_action = lambda state: float(jnp.tanh(eqx.filter_vmap(lambda a: a(jnp.zeros(1))[0])(state.actor))[0, 0])
    pi_mean, sac_mean = mean_action(misa_state), mean_action(sac_state)
    print(f"Q(0.5), Q(0.99), policy mean: MISA {q_data_misa:.3f} {q_ood_misa:.3f} {pi_mean:.3f}; "
          f"unregularised {q_data_sac:.3f} {q_ood_sac:.3f} {sac_mean:.3f}")
    assert q_ood_sac > q_data_sac + 0.2  # the plain critic overestimates actions it never saw
    # MISA does not: Q at the unseen action stays below Q at the best action in the data (reward 0.7)
    assert q_ood_misa < q_at(misa_state, 0.7) and q_ood_misa < q_ood_sac - 0.2
    assert 0.25 <= pi_mean <= 0.75 and sac_mean > 0.8  # MISA's policy stays in the data, SAC's leaves


def test_seed_i_of_a_multi_seed_run_is_the_single_seed_run():
    ds = bandit_dataset(128)
    args = tiny_misa_args(misa, log_every=10, num_samples=4, batch_size=16)
    many, _ = train_in_process(misa, args, ds, seeds=(0, 1), chunks=1)
    one, _ = train_in_process(misa, args, ds, seeds=(1,), chunks=1)
    assert_same_agent(many, 1, one)


def test_presets_follow_the_paper():
    ant = misa.resolve_args(misa.Args(), "antmaze")
    assert (ant.num_layers, ant.lagrange, ant.lagrange_tau, ant.eval_episodes) == (3, True, 10.0, 100)
    assert ant.reward_scale * 1.0 + ant.reward_bias == pytest.approx((1.0 - 0.5) * 4)
    loco = misa.resolve_args(misa.Args(), "locomotion")
    assert not loco.lagrange and not loco.reward_norm and (loco.reward_scale, loco.reward_bias) == (1.0, 0.0)
    door = misa.resolve_args(misa.Args(), "adroit", rewards=np.array([-1.0, 3.0]))
    assert door.lagrange and door.lagrange_tau == 3.0 and door.reward_norm
    assert door.reward_scale * 3.0 + door.reward_bias == pytest.approx(1.0)
    assert door.reward_scale * -1.0 + door.reward_bias == pytest.approx(-1.0)
    # the command line wins, and says what it means: a budget turns the multiplier on, an explicit
    # affine reward transform replaces the min-max scaling
    assert misa.resolve_args(misa.Args(lagrange_tau=5.0), "locomotion").lagrange
    assert not misa.resolve_args(misa.Args(lagrange=False), "antmaze").lagrange
    explicit = misa.resolve_args(misa.Args(reward_scale=2.0), "adroit", rewards=np.array([-1.0, 3.0]))
    assert (explicit.reward_norm, explicit.reward_scale, explicit.reward_bias) == (False, 2.0, 0.0)
    assert misa.check_args(misa.Args(reward_norm=True, reward_bias=1.0))  # both: refused


@pytest.mark.parametrize("algo", ["misa", "misa_dv", "misa_f"])
def test_end_to_end_two_seeds(algo, tiny_hopper, tmp_path, run_script):
    _, local = tiny_hopper
    results, _, _ = run_script(algo, str(local), num_seeds=2, num_updates=40, log_every=20, eval_episodes=1)
    assert results["seeds"] == [0, 1] and len(results["final_per_seed"]) == 2
    header = (tmp_path / "run" / "train.csv").read_text().splitlines()[0]
    assert "hmc_acceptance" in header and "mi_regulariser" in header


def test_tanh_gaussian_log_prob_is_exact_where_tanh_saturates():
    """log pi(tanh u | s) is computed from u, so it stays exact (float32 rounding of a float64 reference)
    where tanh(u) rounds to +-1 (|u| > 9), at both log-std clip edges and at the dataset-action clip,
    where a density of the action itself (log N(atanh a) - log(1 - a^2)) is infinite or inexact
    (distrax's log_prob(a) among them: benchmarks/distrax_check.py)."""
    rng = np.random.default_rng(0)
    u = np.concatenate([rng.normal(size=(40, 3)), np.sign(rng.normal(size=(40, 3))) * rng.uniform(9, 30, (40, 3)),
                        np.full((40, 3), np.arctanh(0.999))]).astype(np.float32)
    mu = np.clip(u + rng.normal(size=u.shape), -9, 9).astype(np.float32)
    for log_std in (np.full(u.shape, -5.0, np.float32), np.full(u.shape, 2.0, np.float32),
                    rng.uniform(-5, 2, u.shape).astype(np.float32)):
        x = np.asarray(u, np.float64)
        ref = np.sum(gaussian_logpdf(x, mu, np.exp(2.0 * log_std.astype(np.float64)))
                     - 2 * (np.log(2) - np.abs(x) - np.log1p(np.exp(-2 * np.abs(x)))), axis=-1)
        ours = np.asarray(misa.tanh_gaussian_log_prob(jnp.asarray(u), jnp.asarray(mu), jnp.asarray(log_std)))
        assert np.all(np.abs(ours - ref) <= 1e-5 * np.maximum(np.abs(ref), 1.0))
    assert np.any(np.abs(np.tanh(u)) == 1.0)  # the saturated points are saturated in float32


def test_misa_f_bound_is_finite_for_large_critics():
    """exp(Q - 1) overflows float32 at Q > 89: the bound shifts Q by a batch constant there, and is
    the exact f-bound below (value and gradient)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    exact = lambda q: jnp.exp(q - 1.0).mean() - q[:, 0].mean()
    value, weights = misa_f.mi_bound(q, q[:, 0], 1.0)
    assert float(value) == pytest.approx(float(exact(q)), rel=1e-6)
    grad = jax.grad(lambda q: misa_f.mi_bound(q, q[:, 0], 1.0)[0])(q)
    np.testing.assert_allclose(grad, jax.grad(exact)(q), rtol=1e-5)
    big = q * 50.0 + 1000.0  # a trained critic's scale
    value, weights = misa_f.mi_bound(big, big[:, 0], 1.0)
    grad = jax.grad(lambda q: misa_f.mi_bound(q, q[:, 0], 1.0)[0])(big)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(weights)).all() and np.isfinite(np.asarray(grad)).all()
    assert float(jnp.abs(grad).max()) > 0.0
    # the shifted bound is still a lower bound of the same family: its value is E exp(T - 1) - E_D[T] at T = Q - c
    c = float(jax.nn.logsumexp(big, axis=1).max() - np.log(16) - 30.0)
    assert float(value) == pytest.approx(float(jnp.exp(big - c - 1.0).mean() - (big[:, 0] - c).mean()), rel=1e-5)



def test_a_flag_of_an_earlier_version_is_refused_with_its_replacement(monkeypatch, capsys):
    import subprocess
    import sys

    from common import runlog

    out = subprocess.run([sys.executable, str(ROOT / "algorithms" / "misa.py"), "--ba-only"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)  # as a user types it
    assert out.returncode == 2 and "--objective ba" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    for old, new in [("--no-unbiased", "--objective misa-biased"), ("--correction=dataset", "--objective official"),
                     ("--no-ba", "--objective no-ba")]:
        monkeypatch.setattr(sys, "argv", ["misa.py", old])
        with pytest.raises(SystemExit) as stop:
            runlog.cli(lambda args: pytest.fail("main ran"), misa.Args, misa.REPLACED)
        assert stop.value.code == 2 and new in capsys.readouterr().err


# --------------------------------------------------------------------------- each bound's regulariser and budget
class StubActor(eqx.Module):
    """pi(u|s) = N(w s, exp(log_std)^2), pre-tanh."""

    w: jax.Array
    log_std: jax.Array

    def __call__(self, obs):
        return self.w @ obs, self.log_std


class StubCritic(eqx.Module):
    """Q_i(s, a) = -scale_i |a - centre_i|^2 + sum(s): twin critics with a closed form."""

    centre: jax.Array
    scale: jax.Array

    def __call__(self, obs, action):
        return -self.scale * jnp.sum((action[None] - self.centre) ** 2, axis=-1) + jnp.sum(obs)


def logsumexp64(x, axis=None):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


# what --lagrange-tau bounds in each file, in float64: misa the official code's regulariser (its log-mean-exp
# divides by the batch size B, not K), misa_dv and misa_f their own regulariser as the bound defines it
REFERENCE_REGULARISER = {
    "misa": lambda q, qd, t: t * (logsumexp64(q / t, axis=1) - np.log(q.shape[1])).mean() - qd.mean(),
    "misa_dv": lambda q, qd, t: t * (logsumexp64(q / t) - np.log(q.size)) - qd.mean(),
    "misa_f": lambda q, qd, t: t * np.exp(q / t - 1.0).mean() - qd.mean(),
}
OFFICIAL_UNITS = {"misa": lambda r, t, B, K: r - t * np.log(B / K), "misa_dv": lambda r, t, B, K: r,
                  "misa_f": lambda r, t, B, K: r}


@pytest.mark.parametrize("name, lagrange, temperature, extra", [
    (name, lagrange, t, {}) for name in ("misa", "misa_dv", "misa_f") for lagrange, t in [(False, 1.0), (True, 1.0), (True, 2.5)]
] + [("misa", False, 1.0, {"lse_norm": "batch"}), ("misa", True, 2.5, {"lse_norm": "batch"})])
def test_each_bound_and_its_lagrange_budget_against_float64(name, lagrange, temperature, extra):
    """The critic's regulariser part gamma_1 * sum_i (R_i - budget) in train_step, and the Lagrange
    multiplier's gradient, against a float64 reference: --lagrange-tau bounds MISA's regulariser in the
    official units and each other bound's own regulariser (it once carried MISA's log(B/K) into all three)."""
    module = {"misa": misa, "misa_dv": misa_dv, "misa_f": misa_f}[name]
    B, K, A, O = 16, 8, 2, 3
    args = module.Args(batch_size=B, num_samples=K, temperature=temperature, lagrange=lagrange, lagrange_tau=0.7,
                       objective="misa-biased", cosine_schedule=False, **extra)
    rng = np.random.default_rng(0)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    actor = StubActor(0.5 * f32(A, O), jnp.asarray([-0.7, -0.2], jnp.float32))
    critic = StubCritic(0.4 * f32(2, A), jnp.asarray([3.0, 2.0], jnp.float32))
    batch = module.Transitions(obs=f32(B, O), action=jnp.tanh(f32(B, A)), reward=f32(B), next_obs=f32(B, O),
                               done=jnp.zeros(B, jnp.float32))
    noise = module.Noise(next=f32(B, A), policy=f32(B, K, A), new=f32(B, A))
    opt = module.optimisers(args)
    log_lagrange = jnp.asarray(0.3, jnp.float32)
    state = module.AgentState(actor, critic, critic, jnp.zeros(()), log_lagrange, jnp.zeros(()),
                              opt.actor.init(actor), opt.critic.init(critic), opt.alpha.init(jnp.zeros(())),
                              opt.lagrange.init(log_lagrange))
    new, metrics = module.train_step(state, batch, noise, None, args, opt)

    obs, act, eps = (np.asarray(x, np.float64) for x in (batch.obs, batch.action, noise.policy))
    w, log_std = np.asarray(actor.w, np.float64), np.asarray(actor.log_std, np.float64)
    centre, scale = np.asarray(critic.centre, np.float64), np.asarray(critic.scale, np.float64)
    q = lambda s, a, i: -scale[i] * np.sum((a - centre[i]) ** 2, axis=-1) + s.sum(-1)
    policy_actions = np.tanh((obs @ w.T)[:, None] + np.exp(log_std) * eps)  # (B, K, A)
    regs = np.array([REFERENCE_REGULARISER[name](q(obs[:, None], policy_actions, i), q(obs, act, i), temperature)
                     for i in range(2)])
    official = OFFICIAL_UNITS[name](regs, temperature, B, K)
    shown = official if extra.get("lse_norm") == "batch" else regs  # the units the regulariser is logged in
    multiplier = np.exp(0.3) if lagrange else 1.0
    part = 5.0 * multiplier * ((official - 0.7).sum() if lagrange else shown.sum())
    np.testing.assert_allclose(float(metrics["mi_regulariser"]), shown.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["critic_loss"] - metrics["td_loss"]), part, rtol=1e-5, atol=1e-5)
    lagrange_grad = float(new.lagrange_opt[0].mu) / 0.1  # Adam's first moment after one step: 0.1 * gradient
    np.testing.assert_allclose(lagrange_grad, -5.0 * multiplier * (official - 0.7).mean() if lagrange else 0.0,
                               rtol=1e-5, atol=1e-7)

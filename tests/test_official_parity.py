"""One MISA update against the official code (github.com/sail-sg/MISA, commit bd350e5), term by term.

The fixtures in tests/fixtures/official_misa/ (README there; a copy of shared/fidelity/) hold one
`MISA._train_step` of the official code: parameters, batch, the normal draws, the HMC samples, and
every loss part and gradient it computed (hopper shapes, K = 50, with and without Lagrange). We load
the official flax parameters into our Equinox modules, feed the same draws and samples to our loss
functions, and require every loss, part and gradient to agree to a relative error of 1e-5.

Each deliberate difference between our defaults and the official code is set to the official choice
in OFFICIAL below, named with the reason it exists. Anything else that changes the meaning of a loss
line makes this test fail.
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import misa
from common import data

FIXTURES = Path(__file__).parent / "fixtures" / "official_misa"
RTOL = 1e-5

OFFICIAL = dict(
    actor_activation="relu",  # the official TanhGaussianPolicy does not pass its activation on: ReLU (paper: ELU)
    lse_norm="batch",  # its log-mean-exp subtracts log(batch size), where the mean over K subtracts log K
    num_samples=50, batch_size=256, hidden_dim=256, num_layers=2,  # the recorded shapes
    min_q_weight=5.0, bc_weight=0.5, unbiased_weight=0.1, temperature=1.0, target_entropy=-3.0, discount=0.99,
    reward_scale=1.0, reward_bias=0.0,
)
# Not a field of the losses, set by how the test calls them: the official actor loss sees the critic
# *before* its update (ours: --actor-sees pre-update; default: the updated one, as in Algorithm 1), and
# the official HMC samples are the dataset actions (its sampler never accepts a move; ours: --correction dataset).


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def dense(fx: dict, prefix: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """flax Dense_i of `prefix` as equinox (weight (out, in), bias)."""
    return fx[f"{prefix}/Dense_{i}/kernel"].T, fx[f"{prefix}/Dense_{i}/bias"]


def with_layers(mlp: eqx.nn.MLP, params: list[tuple[np.ndarray, np.ndarray]]) -> eqx.nn.MLP:
    for i, (w, b) in enumerate(params):
        mlp = eqx.tree_at(lambda m: (m.layers[i].weight, m.layers[i].bias), mlp, (jnp.asarray(w), jnp.asarray(b)))
    return mlp


def official_models(fx: dict, args: misa.Args, prefix: str = "param") -> tuple[misa.Actor, misa.Critic, misa.Critic]:
    """Our Actor and twin Critics (online, target) holding the official parameters."""
    key = jax.random.PRNGKey(0)
    actor = misa.Actor(11, 3, args, key=key)
    pol = f"{prefix}/policy/params"
    actor = eqx.tree_at(lambda a: a.net, actor, with_layers(actor.net, [dense(fx, f"{pol}/base_network", i) for i in range(3)]))
    actor = eqx.tree_at(lambda a: (a.log_std_scale, a.log_std_shift), actor,
                        (jnp.asarray(fx[f"{pol}/log_std_multiplier_module/value"]),
                         jnp.asarray(fx[f"{pol}/log_std_offset_module/value"])))

    def critic(q1: str, q2: str) -> misa.Critic:
        c = misa.Critic(11, 3, args, key=key)
        layers = [tuple(np.stack(x) for x in zip(dense(fx, f"{prefix}/{q1}/params/FullyConnectedNetwork_0", i),
                                                 dense(fx, f"{prefix}/{q2}/params/FullyConnectedNetwork_0", i)))
                  for i in range(3)]
        layers[-1] = (layers[-1][0], layers[-1][1][:, 0])  # equinox's "scalar" output layer: bias of shape ()
        return eqx.tree_at(lambda c: c.nets, c, with_layers(c.nets, layers))

    return actor, critic("qf1", "qf2"), critic("tqf1", "tqf2")


def rel_err(ours, official) -> float:
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    return float(np.linalg.norm(ours - official) / max(np.linalg.norm(official), 1e-12))


def assert_close(ours, official, what: str) -> None:
    err = rel_err(np.reshape(ours, np.shape(official)), official)
    assert err <= RTOL, f"{what}: relative error {err:.2e} (ours {np.ravel(ours)[:3]}, official {np.ravel(official)[:3]})"


def setup(name: str, **overrides):
    fx = load(name)
    args = misa.Args(**{**OFFICIAL, **overrides})
    actor, critic, target = official_models(fx, args)
    batch = data.Transitions(obs=jnp.asarray(fx["batch/observations"]), action=jnp.asarray(fx["batch/actions"]),
                             reward=jnp.asarray(fx["batch/rewards"]), next_obs=jnp.asarray(fx["batch/next_observations"]),
                             done=jnp.asarray(fx["batch/dones"]))
    noise = misa.Noise(next=jnp.asarray(fx["eps/next"]), policy=jnp.asarray(fx["eps/cur"]), new=jnp.asarray(fx["eps/new"]))
    return fx, args, actor, critic, target, batch, noise


def critic_grads_match(grads: misa.Critic, fx: dict) -> None:
    for i in range(3):
        for j, q in enumerate(("qf1", "qf2")):
            w, b = dense(fx, f"off/grad/{q}/params/FullyConnectedNetwork_0", i)
            assert_close(grads.nets.layers[i].weight[j], w, f"d critic loss / d {q} Dense_{i} kernel")
            assert_close(grads.nets.layers[i].bias[j], b, f"d critic loss / d {q} Dense_{i} bias")


def actor_grads_match(grads: misa.Actor, fx: dict, prefix: str) -> None:
    for i in range(3):
        w, b = dense(fx, f"{prefix}/base_network", i)
        assert_close(grads.net.layers[i].weight, w, f"{prefix} Dense_{i} kernel")
        assert_close(grads.net.layers[i].bias, b, f"{prefix} Dense_{i} bias")
    assert_close(grads.log_std_scale, fx[f"{prefix}/log_std_multiplier_module/value"], f"{prefix} log-std multiplier")
    assert_close(grads.log_std_shift, fx[f"{prefix}/log_std_offset_module/value"], f"{prefix} log-std offset")


@pytest.mark.parametrize("name", ["official_update", "official_update_lagrange"])
def test_critic_loss_parts_and_gradients_equal_the_official(name):
    fx, args, actor, critic, target, batch, noise = setup(name)
    lagrange = "config/lagrange" in fx
    if lagrange:
        args = misa.Args(**{**OFFICIAL, "lagrange": True, "lagrange_tau": float(fx["config/target_action_gap"])})
    log_lagrange = jnp.asarray(1.0)  # the official multiplier's start, log 1.0 (= our --lagrange-init default)
    gamma_1 = args.min_q_weight * (jnp.exp(log_lagrange) if lagrange else 1.0)
    budget = misa.lagrange_budget(args) if lagrange else 0.0
    (loss, (metrics, extras)), grads = eqx.filter_value_and_grad(misa.critic_loss, has_aux=True)(
        critic, batch, actor, target, gamma_1, budget, noise, args)
    assert_close(loss, fx["off/loss/qf1"] + fx["off/loss/qf2"], "critic loss")
    assert_close(metrics["td_loss"], fx["off/aux/qf1_td"] + fx["off/aux/qf2_td"], "TD part")
    assert_close(extras["gaps"] + budget, [fx["off/aux/qf1_diff"], fx["off/aux/qf2_diff"]], "regulariser of each critic")
    critic_grads_match(grads, fx)
    if lagrange:
        assert_close(misa.lagrange_loss(log_lagrange, extras["gaps"], args), fx["off/loss/log_alpha_prime"], "Lagrange loss")
        assert_close(jax.grad(misa.lagrange_loss)(log_lagrange, extras["gaps"], args),
                     fx["off/grad/log_alpha_prime/params/value"], "Lagrange multiplier gradient")


def test_our_log_k_normaliser_changes_values_not_gradients_and_keeps_the_budget():
    """Our default --lse-norm samples subtracts log K: each regulariser is higher by log(B/K), the
    gradients are the same, and with Lagrange the budget moves with it, so tau constrains what it did."""
    fx, _, actor, critic, target, batch, noise = setup("official_update_lagrange")
    tau = float(fx["config/target_action_gap"])
    ours = misa.Args(**{**OFFICIAL, "lse_norm": "samples", "lagrange_tau": tau})
    gamma_1 = ours.min_q_weight * np.e
    (loss, (_, extras)), grads = eqx.filter_value_and_grad(misa.critic_loss, has_aux=True)(
        critic, batch, actor, target, gamma_1, misa.lagrange_budget(ours), noise, ours)
    assert_close(extras["gaps"] + tau, [fx["off/aux/qf1_diff"], fx["off/aux/qf2_diff"]], "constraint gaps")
    assert_close(loss, fx["off/loss/qf1"] + fx["off/loss/qf2"], "Lagrangian critic loss")
    critic_grads_match(grads, fx)
    (_, (metrics, _)) = misa.critic_loss(critic, batch, actor, target, 5.0, 0.0, noise, ours)
    np.testing.assert_allclose(float(metrics["mi_regulariser"]),
                               (fx["off/aux/qf1_diff"] + fx["off/aux/qf2_diff"]) / 2 + np.log(256 / 50), rtol=1e-5)


def test_actor_loss_parts_alpha_loss_and_gradients_equal_the_official():
    fx, args, actor, critic, _, batch, noise = setup("official_update")
    alpha = jnp.exp(jnp.asarray(fx["param/log_alpha"]))
    u_mcmc = misa.pre_tanh(jnp.asarray(fx["off/aux/mcmc_action_samples"]))  # the official samples (= dataset actions)
    assert float(fx["off/aux/is_accepted"].max()) == 0.0  # the official sampler accepted no move
    _, weights = misa.mi_bound(jnp.zeros((256, 50)), jnp.zeros(256), args.temperature)
    loss_fn = lambda a: misa.actor_loss(a, batch, critic, alpha, u_mcmc, weights, noise.new, args)  # pre-update critic
    (loss, (metrics, extras)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(actor)
    assert_close(loss, fx["off/loss/policy"], "actor loss")
    actor_grads_match(grads, fx, "off/grad/policy/params")
    for part, ours in [("bc", "actor_bc"), ("q", "actor_q"), ("corr", "actor_correction")]:
        assert_close(metrics[ours], fx[f"off/part/{part}/value"], f"actor loss part {part}")
        part_grads = eqx.filter_grad(lambda a: loss_fn(a)[1][0][ours])(actor)
        actor_grads_match(part_grads, fx, f"off/part/{part}/grad/params")
    assert_close(extras["log_pi"], fx["off/aux/log_pi"], "log pi of the new actions")
    log_alpha = jnp.asarray(fx["param/log_alpha"])
    assert_close(misa.alpha_loss(log_alpha, extras["log_pi"], args.target_entropy), fx["off/loss/log_alpha"], "alpha loss")
    assert_close(jax.grad(misa.alpha_loss)(log_alpha, extras["log_pi"], args.target_entropy),
                 fx["off/grad/log_alpha/params/value"], "alpha gradient")


def test_the_correction_is_the_official_ones_lower_bc_weight():
    """With the official (frozen) samples, the correction term equals 0.1 * mean log pi(a_D): the
    official actor effectively minimises 0.5 alpha log pi(a_new) - 0.4 log pi(a_D) - min Q."""
    fx, args, actor, critic, _, batch, noise = setup("official_update")
    u_data = jnp.broadcast_to(misa.pre_tanh(batch.action)[:, None], (256, 50, 3))
    _, weights = misa.mi_bound(jnp.zeros((256, 50)), jnp.zeros(256), args.temperature)
    _, (metrics, _) = misa.actor_loss(actor, batch, critic, 1.0, u_data, weights, noise.new, args)
    np.testing.assert_allclose(float(metrics["actor_correction"]), 0.1 * float(metrics["log_pi_data"]), rtol=1e-6)
    assert_close(metrics["actor_correction"], fx["off/part/corr/value"], "correction with dataset actions")


def test_official_initialisation():
    """--init official: flax Dense defaults (lecun-normal kernels, zero biases), last layer
    variance-scaling(1e-2, fan-in, uniform); equinox's default has non-zero biases."""
    args = misa.Args(hidden_dim=256, num_layers=2)
    actor = misa.Actor(11, 3, args, key=jax.random.PRNGKey(0))
    first, last = actor.net.layers[0], actor.net.layers[-1]
    assert float(jnp.abs(first.bias).max()) == 0.0 and float(jnp.abs(last.bias).max()) == 0.0
    assert float(first.weight.std()) == pytest.approx(1 / np.sqrt(11), rel=0.1)  # lecun normal: var 1 / fan_in
    bound = np.sqrt(3 * 1e-2 / 256)  # variance scaling, uniform: limit sqrt(3 scale / fan_in)
    assert float(jnp.abs(last.weight).max()) <= bound and float(jnp.abs(last.weight).max()) > 0.9 * bound
    critic = misa.Critic(11, 3, args, key=jax.random.PRNGKey(0))
    assert not np.allclose(critic.nets.layers[0].weight[0], critic.nets.layers[0].weight[1])  # two independent critics
    eqx_actor = misa.Actor(11, 3, misa.Args(hidden_dim=256, num_layers=2, init="equinox"), key=jax.random.PRNGKey(0))
    assert float(jnp.abs(eqx_actor.net.layers[0].bias).max()) > 0.0

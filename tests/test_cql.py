"""CQL: the regulariser by hand, the Lagrange multiplier, the backup and BC variants, the one-step
bandit (Q of unseen actions pushed below the data's), seeds, then the script end to end."""

import dataclasses
import inspect
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms import cql, misa
from conftest import GaussActor, assert_same_agent, bandit_dataset, train_in_process


# --------------------------------------------------------------------------- the regulariser
def reg(q_rand, q_curr, q_next, q_data, lp_curr, lp_next, act_dim=1, t=1.0, importance_sample=True, **kw):
    f = lambda x: jnp.asarray(x, jnp.float32)
    return float(cql.cql_regulariser(f(q_rand), f(q_curr), f(q_next), f(q_data), f(lp_curr), f(lp_next),
                                     act_dim, t, importance_sample, **kw))


def test_regulariser_hand_computed():
    # one state, K = 1, A = 1, every Q = 0, both log pi = 0: the terms are
    # [0 - log 0.5, 0 - 0, 0 - 0] -> log(2 + 1 + 1) = log 4, minus Q(s, a_data) = 0
    assert reg([[0.0]], [[0.0]], [[0.0]], [0.0], [[0.0]], [[0.0]]) == pytest.approx(np.log(4.0), rel=1e-6)
    # A = 2 doubles the uniform proposal's weight: log(4 + 1 + 1) = log 6
    assert reg([[0.0]], [[0.0]], [[0.0]], [0.0], [[0.0]], [[0.0]], act_dim=2) == pytest.approx(np.log(6.0), rel=1e-6)
    # importance weights: log pi = log 0.5 for both policy samples counts each twice: log(2 + 2 + 2) = log 6
    lh = np.log(0.5)
    assert reg([[0.0]], [[0.0]], [[0.0]], [0.0], [[lh]], [[lh]]) == pytest.approx(np.log(6.0), rel=1e-6)
    # Q values: Q_rand = log 3, Q_curr = log 2, Q_next = 0, Q_data = 1:  log(3 * 2 + 2 + 1) - 1 = log 9 - 1
    assert reg([[np.log(3.0)]], [[np.log(2.0)]], [[0.0]], [1.0], [[0.0]], [[0.0]]) == pytest.approx(np.log(9.0) - 1, rel=1e-6)
    # without importance sampling the data action joins the plain log-sum-exp: log(3 + e + 1 + 2) - 1
    assert reg([[np.log(3.0)]], [[np.log(2.0)]], [[0.0]], [1.0], [[0.0]], [[0.0]], importance_sample=False) == \
        pytest.approx(np.log(6.0 + np.e) - 1, rel=1e-6)
    # temperature t: t log sum exp(c / t);  t = 2, all c = log 4 + ... : check against the formula
    assert reg([[0.0]], [[0.0]], [[0.0]], [0.0], [[0.0]], [[0.0]], t=2.0) == \
        pytest.approx(2 * np.log(np.exp(np.log(2.0) / 2) + 2.0), rel=1e-6)


def test_regulariser_batch_mean_and_clipping():
    rng = np.random.default_rng(0)
    B, K, A, t = 5, 3, 2, 0.7
    q_rand, q_curr, q_next = (rng.normal(size=(B, K)) for _ in range(3))
    lp_curr, lp_next, q_data = rng.normal(size=(B, K)), rng.normal(size=(B, K)), rng.normal(size=B)
    c = np.concatenate([q_rand - A * np.log(0.5), q_next - lp_next, q_curr - lp_curr], axis=1)
    gap = t * np.log(np.exp(c / t).sum(axis=1)) - q_data  # per state
    assert reg(q_rand, q_curr, q_next, q_data, lp_curr, lp_next, A, t) == pytest.approx(gap.mean(), rel=1e-5)
    lo, hi = np.quantile(gap, 0.3), np.quantile(gap, 0.7)
    clipped = reg(q_rand, q_curr, q_next, q_data, lp_curr, lp_next, A, t, clip_min=lo, clip_max=hi)
    assert clipped == pytest.approx(np.clip(gap, lo, hi).mean(), rel=1e-5)


# --------------------------------------------------------------------------- stubs for one update
class LinearCritic(eqx.Module):
    """Q_i(s, a) = w_i sum(a): twin critics with trainable slopes."""

    w: jax.Array

    def __call__(self, obs, action):
        return self.w * action.sum()


def stub_state(args, log_lagrange=1.0):
    actor = GaussActor(jnp.zeros(1), jnp.zeros(1))
    critic = LinearCritic(jnp.array([1.0, 0.5]))
    opt = cql.Optimisers(actor=optax.adam(1e-3), critic=optax.adam(1e-3), alpha=optax.adam(1e-3),
                         lagrange=optax.adam(args.critic_lr))
    lap = jnp.asarray(log_lagrange)
    state = cql.AgentState(actor, critic, critic, jnp.zeros(()), lap, opt.actor.init(actor), opt.critic.init(critic),
                           opt.alpha.init(jnp.zeros(())), opt.lagrange.init(lap), jnp.zeros((), jnp.int32))
    return state, opt


@pytest.mark.parametrize("target_gap, grows", [(1e-3, True), (1e3, False)])
def test_lagrange_multiplier_moves_towards_the_target_gap(target_gap, grows):
    """log lambda takes Adam steps on -lambda min_q_weight (gap - target): up while the regulariser is
    above its target, down while below. Three eager updates on stub networks."""
    args = cql.resolve_args(cql.Args(lagrange_gap=target_gap, num_samples=4, batch_size=16, critic_lr=0.05),
                            "locomotion")
    state, opt = stub_state(args)
    ds, key = bandit_dataset(64), jax.random.PRNGKey(0)
    values = [float(state.log_lagrange)]
    for _ in range(3):
        key, sub = jax.random.split(key)
        state, metrics = cql.update(state, ds, sub, args, opt)
        assert (float(metrics["cql_regulariser"]) > target_gap) == grows
        values.append(float(state.log_lagrange))
    assert metrics["cql_weight"] == pytest.approx(5.0 * np.exp(values[-2]), rel=1e-5)  # alpha = min_q_weight lambda
    steps = np.diff(values)
    assert np.all(steps > 0) if grows else np.all(steps < 0)
    # without --lagrange the multiplier stays put and alpha = min_q_weight
    off = cql.resolve_args(cql.Args(num_samples=4, batch_size=16), "locomotion")
    state, opt = stub_state(off)
    state, metrics = cql.update(state, ds, key, off, opt)
    assert float(state.log_lagrange) == 1.0 and float(metrics["cql_weight"]) == 5.0


def test_max_target_backup_takes_the_best_next_action():
    """Q' = sum(a), pi = tanh N(0, 1), reward 0, discount 1: one next action gives E[target] = 0,
    the max over K = 16 gives E[max_k tanh(u_k)] (about 0.93)."""
    ds = bandit_dataset(256)._replace(done=jnp.zeros(256), reward=jnp.zeros(256))
    actor, critic = GaussActor(jnp.zeros(1), jnp.zeros(1)), LinearCritic(jnp.array([1.0, 1.0]))
    targets = {}
    for backup in (False, True):
        args = cql.resolve_args(cql.Args(discount=1.0, num_samples=16, max_target_backup=backup), "locomotion")
        _, m = cql.critic_loss(critic, ds, actor, critic, 1.0, 1.0, jax.random.PRNGKey(1), args)
        targets[backup] = float(m["q_target"])
    u = np.random.default_rng(0).normal(size=(100_000, 16))
    assert abs(targets[False]) < 0.15
    assert targets[True] == pytest.approx(np.tanh(u).max(axis=1).mean(), abs=0.05)


def test_bc_phase_replaces_q_by_the_data_log_likelihood():
    ds = bandit_dataset(32)
    actor = GaussActor(jnp.array([0.2]), jnp.array([-0.5]))
    args = cql.resolve_args(cql.Args(), "locomotion")
    key = jax.random.PRNGKey(0)
    grad_of = lambda critic, bc: eqx.filter_value_and_grad(cql.actor_loss, has_aux=True)(
        actor, ds, critic, jnp.float32(0.3), jnp.bool_(bc), key, args)
    (bc_a, (aux, _)), g_a = grad_of(LinearCritic(jnp.array([1.0, 1.0])), True)
    (bc_b, _), g_b = grad_of(LinearCritic(jnp.array([-7.0, 3.0])), True)
    assert float(bc_a) == pytest.approx(float(bc_b)) and float(g_a.mu[0]) == pytest.approx(float(g_b.mu[0]))
    assert float(bc_a) == pytest.approx(0.3 * -float(aux["entropy"]) - float(aux["log_pi_data"]), rel=1e-5)
    (rl_a, _), _ = grad_of(LinearCritic(jnp.array([1.0, 1.0])), False)
    (rl_b, _), _ = grad_of(LinearCritic(jnp.array([-7.0, 3.0])), False)
    assert float(rl_a) != pytest.approx(float(rl_b))


# --------------------------------------------------------------------------- training
def tiny_args(**kw):
    base = dict(num_seeds=2, num_updates=1000, log_every=50, eval_every=50, hidden_dim=32, batch_size=64,
                num_samples=4, eval_episodes=1, actor_lr=1e-3, critic_lr=1e-3)
    return cql.resolve_args(cql.Args(**{**base, **kw}), "locomotion")


@pytest.fixture(scope="module")
def programs():
    """Compiled once for the module (compilation dominates on CPU): 2 vmapped seeds, CQL and the same
    SAC without the regulariser (min_q_weight = 0), which shares CQL's init."""
    args = tiny_args()
    init_v, train_cql = cql.make_train(args, 1, 1)
    _, train_plain = cql.make_train(dataclasses.replace(args, min_q_weight=0.0), 1, 1)
    return {"cql": (init_v, train_cql), "plain": (init_v, train_plain)}


def test_bandit_cql_pushes_unseen_actions_below_the_data(programs):
    """1000 updates, 2 seeds: CQL's Q at actions outside the data's [0.3, 0.7] is below Q at the data
    actions, on both sides; without the regulariser the critic extrapolates upwards (Q(0.95) high)."""
    ds = bandit_dataset()
    q_at = lambda state, a: eqx.filter_vmap(lambda c: c(jnp.zeros(1), jnp.array([a])).min())(state.critic)  # (seeds,)
    cql_state, metrics = train_in_process(cql, tiny_args(), ds, (0, 1), chunks=20, programs=programs["cql"])
    plain_state, _ = train_in_process(cql, tiny_args(), ds, (0, 1), chunks=20, programs=programs["plain"])
    assert np.isfinite(metrics["critic_loss"]).all()
    grid = (-0.9, 0.3, 0.5, 0.7, 0.95)
    q_cql = {a: np.asarray(q_at(cql_state, a)) for a in grid}
    q_plain = {a: np.asarray(q_at(plain_state, a)) for a in grid}
    print("Q at a (seed 0, seed 1):", {a: f"CQL {q_cql[a].round(3)} / plain {q_plain[a].round(3)}" for a in grid})
    for s in range(2):
        assert q_plain[0.95][s] > q_plain[0.5][s] + 0.2  # the plain critic extrapolates upwards to unseen actions
        # CQL: Q at unseen actions, on either side, is below Q at every data action, and below the plain critic's
        assert max(q_cql[-0.9][s], q_cql[0.95][s]) < min(q_cql[0.3][s], q_cql[0.5][s], q_cql[0.7][s])
        assert q_cql[0.95][s] < q_plain[0.95][s] - 0.2


def test_seed_i_does_not_depend_on_the_other_seeds(programs):
    """Seed 1 trained next to seed 0 (slot 1) and next to seed 2 (slot 0) is the same agent.
    (The same property across different --num-seeds is tested for td3_bc.py and misa.py, whose
    update shares this file's vmap/scan code; here one compiled program keeps the test fast.)"""
    ds = bandit_dataset()  # the bandit test's shapes: no recompilation
    a, _ = train_in_process(cql, tiny_args(), ds, (0, 1), chunks=1, programs=programs["cql"])
    b, _ = train_in_process(cql, tiny_args(), ds, (1, 2), chunks=1, programs=programs["cql"])
    assert_same_agent(a, 1, b, 0, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- presets, shape, script
def test_presets_follow_the_sources():
    loco = cql.resolve_args(cql.Args(), "locomotion")
    assert (loco.num_layers, loco.actor_lr, loco.critic_lr, loco.min_q_weight, loco.num_samples) == (2, 3e-4, 3e-4, 5.0, 10)
    assert not loco.lagrange and not loco.max_target_backup and loco.bc_steps == 0 and loco.importance_sample
    ant = cql.resolve_args(cql.Args(), "antmaze")
    assert (ant.num_layers, ant.actor_lr, ant.lagrange, ant.lagrange_gap, ant.clip_diff_min, ant.bc_steps) == (
        3, 1e-4, True, 0.2, -200.0, 40_000)
    assert ant.max_target_backup and ant.eval_episodes == 100
    assert ant.reward_scale * 1.0 + ant.reward_bias == pytest.approx(5.0)  # 10 r - 5
    assert not cql.resolve_args(cql.Args(lagrange=False), "antmaze").lagrange  # the command line wins
    assert cql.resolve_args(cql.Args(lagrange_gap=5.0), "locomotion").lagrange  # a gap asks for CQL-Lagrange
    door = cql.resolve_args(cql.Args(), "adroit", rewards=np.array([0.0, 10.0]))
    assert door.reward_norm and door.reward_scale * 10.0 + door.reward_bias == pytest.approx(1.0)


def test_shared_sections_are_misa_verbatim():
    """cql.py and misa.py share their plumbing and main word for word (cql.py's docstring says so). Their
    networks differ: MISA's follow the official MISA code's initialisation and trainable log-std scalars."""
    shared = ["gaussian_log_prob", "tanh_log_det", "tanh_gaussian_log_prob", "apply_grads", "polyak", "draw_minibatch", "act", "main"]
    for name in shared:
        assert inspect.getsource(getattr(cql, name)) == inspect.getsource(getattr(misa, name)), name


def test_end_to_end_two_seeds(tiny_hopper, tmp_path, run_script):
    _, local = tiny_hopper
    results, stdout, _ = run_script("cql", str(local), num_seeds=2, num_updates=40, log_every=20, eval_episodes=1)
    assert "mean +- std" in stdout
    assert results["seeds"] == [0, 1] and results["updates"] == 40 and len(results["final_per_seed"]) == 2
    assert np.isfinite(results["final_per_seed"]).all()
    config = json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    assert config["min_q_weight"] == 5.0 and not config["lagrange"] and config["bc_steps"] == 0
    header = (tmp_path / "run" / "train.csv").read_text().splitlines()[0]
    assert "cql_regulariser" in header and "q_random" in header
    assert np.load(tmp_path / "run" / "returns.npz")["returns"].shape == (2, 2, 1)

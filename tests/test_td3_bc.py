import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import td3_bc
from common import data, runlog
from common.errors import UserError
from conftest import assert_same_agent, train_in_process


class ConstActor(eqx.Module):
    a: jax.Array

    def __call__(self, obs):
        return self.a


class SumCritic(eqx.Module):
    """Q_1 = sum(s) + sum(a), Q_2 = sum(s) + 2 sum(a)."""

    def __call__(self, obs, action):
        return jnp.stack([obs.sum() + action.sum(), obs.sum() + 2 * action.sum()])


BATCH = data.Transitions(
    obs=jnp.array([[0.0], [1.0]]), action=jnp.array([[0.5], [-0.5]]), reward=jnp.array([1.0, 0.0]),
    next_obs=jnp.array([[1.0], [2.0]]), done=jnp.array([0.0, 1.0]))


def test_critic_loss_hand_computed():
    args = td3_bc.Args(discount=0.5, policy_noise=0.0)
    loss, _ = td3_bc.critic_loss(SumCritic(), BATCH, ConstActor(jnp.array([0.9])), SumCritic(), jax.random.PRNGKey(0), args)
    # target: y = r + 0.5 (1 - d) min(s' + 0.9, s' + 1.8) = [1 + 0.5 * 1.9, 0] = [1.95, 0]
    # Q1 = [0.5, 0.5], Q2 = [1.0, 0.0]
    expected = ((0.5 - 1.95) ** 2 + 0.5**2) / 2 + ((1.0 - 1.95) ** 2 + 0.0) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)  # 1.6275


class AffineCritic(eqx.Module):
    """Q_1 = Q_2 = sum(s) (sum(a) + 2): 0 at s = 0, the action plus 2 at s = 1."""

    def __call__(self, obs, action):
        return jnp.stack([obs.sum() * (action.sum() + 2.0)] * 2)


def test_target_smoothing_noise_is_clipped():
    """The target's next action is clip(pi'(s') + clip(noise, -noise_clip, noise_clip), -1, 1). One
    transition with Q(s, a) = 0 and target y = a' + 2 (discount 1, reward 0) has loss 2 y^2, which gives
    the next action back: with policy noise 100 and noise clip 0.5 it is 0.9 - 0.5 or 0.9 + 0.5 clipped
    to 1, never the -1 that the noise alone would reach."""
    one = data.Transitions(obs=jnp.zeros((1, 1)), action=jnp.zeros((1, 1)), reward=jnp.zeros(1),
                           next_obs=jnp.ones((1, 1)), done=jnp.zeros(1))

    def next_actions(noise_clip):
        args = td3_bc.Args(discount=1.0, policy_noise=100.0, noise_clip=noise_clip)
        loss_at = lambda key: td3_bc.critic_loss(AffineCritic(), one, ConstActor(jnp.array([0.9])), AffineCritic(), key,
                                                 args)[0]
        loss = jax.vmap(loss_at)(jax.random.split(jax.random.PRNGKey(3), 100))
        return np.sqrt(np.asarray(loss) / 2.0) - 2.0

    clipped = next_actions(0.5)
    low, high = np.isclose(clipped, 0.4, atol=1e-5), np.isclose(clipped, 1.0, atol=1e-5)
    assert np.all(low | high) and low.any() and high.any(), clipped
    assert np.isclose(next_actions(np.inf), -1.0, atol=1e-5).any()  # unclipped noise does reach -1


def test_actor_loss_and_gradient_hand_computed():
    args = td3_bc.Args(alpha=2.5)
    actor = ConstActor(jnp.array([0.2]))
    (loss, aux), grad = eqx.filter_value_and_grad(td3_bc.actor_loss, has_aux=True)(actor, BATCH, SumCritic(), args)
    # Q_1(s, pi) = s + 0.2 = [0.2, 1.2]; lambda = 2.5 / 0.7; -lambda * 0.7 = -2.5
    # bc = mean((0.2 - [0.5, -0.5])^2) = (0.09 + 0.49) / 2 = 0.29
    assert float(aux["lambda"]) == pytest.approx(2.5 / 0.7, rel=1e-6)
    assert float(loss) == pytest.approx(-2.5 + 0.29, rel=1e-6)
    # d/da: -lambda * 1 + 2 * mean(0.2 - a) = -2.5/0.7 + 0.4 (lambda carries no gradient)
    assert float(grad.a[0]) == pytest.approx(-2.5 / 0.7 + 0.4, rel=1e-5)


def test_polyak():
    t = {"w": jnp.array([0.0, 10.0])}
    o = {"w": jnp.array([1.0, 0.0])}
    np.testing.assert_allclose(td3_bc.polyak(t, o, 0.1)["w"], [0.1, 9.0])


def tiny_dataset(n=200, obs_dim=4, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    return data.Transitions(
        obs=jnp.asarray(rng.normal(size=(n, obs_dim)), jnp.float32),
        action=jnp.asarray(rng.uniform(-1, 1, (n, act_dim)), jnp.float32),
        reward=jnp.asarray(rng.normal(size=n), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(n, obs_dim)), jnp.float32),
        done=jnp.asarray(rng.random(n) < 0.1, jnp.float32))


def train_seeds(seeds, chunks=2):
    args = td3_bc.Args(hidden_dim=32, batch_size=16, log_every=20)
    return train_in_process(td3_bc, args, tiny_dataset(), seeds, chunks)[0]


def test_seed_i_of_a_multi_seed_run_is_the_single_seed_run():
    assert_same_agent(train_seeds([0, 1, 2]), 1, train_seeds([1]))


def small_args(run_dir, env, **kw):
    base = dict(env=env, num_seeds=2, num_updates=40, eval_every=20, log_every=20, eval_episodes=1,
                hidden_dim=32, batch_size=32, run_dir=str(run_dir))
    return td3_bc.Args(**{**base, **kw})


def test_resume_continues_exactly(tiny_hopper, tmp_path):
    _, local = tiny_hopper
    td3_bc.main(small_args(tmp_path / "full", str(local)))
    td3_bc.main(small_args(tmp_path / "cut", str(local), num_updates=20))  # "interrupted" after 20 updates
    td3_bc.main(small_args(tmp_path / "cut", str(local), resume=True, allow_change=["num-updates"]))
    a = (tmp_path / "full" / "checkpoint.eqx").read_bytes()
    b = (tmp_path / "cut" / "checkpoint.eqx").read_bytes()
    assert a == b  # same program, same inputs: the resumed run is bit-identical on CPU
    ra = np.load(tmp_path / "full" / "returns.npz")
    rb = np.load(tmp_path / "cut" / "returns.npz")
    np.testing.assert_array_equal(ra["updates"], rb["updates"])
    np.testing.assert_array_equal(ra["returns"], rb["returns"])
    rows = (tmp_path / "cut" / "train.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["10", "10", "20", "20", "40", "40"]  # a short first chunk, no duplicates
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["args"]["num_updates"] == 40
    assert config["changes"] == [{"field": "num_updates", "from": 20, "to": 40, "at_update": 20}]
    with pytest.raises(UserError, match="already holds a run"):
        td3_bc.main(small_args(tmp_path / "full", str(local)))


def test_non_finite_loss_stops_with_seed_and_update(tiny_hopper, tmp_path):
    """Before the first checkpoint the message says there is none; after it, it names the checkpoint
    and how to continue from it with other settings, which works."""
    _, local = tiny_hopper
    with pytest.raises(UserError, match=r"non-finite .* for seed 0 at update \d+\. Training stopped; no checkpoint"):
        td3_bc.main(small_args(tmp_path / "nan", str(local), critic_lr=1e30, actor_lr=1e30))
    td3_bc.main(small_args(tmp_path / "late", str(local), num_updates=20))
    diverge = dict(critic_lr=1e30, actor_lr=1e30, resume=True, allow_change=["num-updates", "critic-lr", "actor-lr"])
    with pytest.raises(UserError, match=r"at update (2[1-9]|3\d|40)\. .*last good checkpoint \(update 20\).*--allow-change"):
        td3_bc.main(small_args(tmp_path / "late", str(local), **diverge))
    td3_bc.main(small_args(tmp_path / "late", str(local), resume=True, allow_change=["num-updates"]))  # the advice works
    assert json.loads((tmp_path / "late" / "results.json").read_text())["updates"] == 40


def test_bad_arguments_are_explained():
    with pytest.raises(UserError, match="multiples of --policy-delay"):
        runlog.check(td3_bc.Args(num_updates=1501), td3_bc.RULES, td3_bc.check_args(td3_bc.Args(num_updates=1501)))
    args = td3_bc.Args(num_updates=2000)  # fewer updates than --eval-every: evaluated at the end
    runlog.check(args, td3_bc.RULES, td3_bc.check_args(args))


def test_end_to_end_two_seeds_real_env(tiny_hopper, tmp_path, run_script):
    """The script itself, as a user runs it, on a local D4RL-format file, evaluated in Hopper-v5."""
    _, local = tiny_hopper
    results, stdout, _ = run_script("td3_bc", str(local), num_seeds=2, num_updates=400, eval_every=200, log_every=200,
                                    hidden_dim=256, batch_size=256)
    assert "mean +- std" in stdout
    assert results["seeds"] == [0, 1] and results["updates"] == 400 and len(results["final_per_seed"]) == 2
    assert np.isfinite(results["final_per_seed"]).all()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["num_seeds"] == 2 and config["packages"]["jax"] == "0.10.2"
    returns = np.load(tmp_path / "run" / "returns.npz")["returns"]
    assert returns.shape == (2, 2, 2)  # evaluations x seeds x episodes
    eval_rows = (tmp_path / "run" / "eval.csv").read_text().strip().splitlines()
    assert eval_rows[0].startswith("update,seed,return,episode_length,score") and len(eval_rows) == 5


def test_seed_i_of_a_multi_seed_run_starts_bit_identical():
    """What README promises exactly: the same initial parameters (and keys) for agent i of N as for a
    one-seed run with seed + i; after training they agree to rounding (the test above)."""
    assert_same_agent(train_seeds([0, 1, 2], chunks=0), 1, train_seeds([1], chunks=0), rtol=0, atol=0)

"""TD3+BC: "A Minimalist Approach to Offline Reinforcement Learning" (Fujimoto & Gu, NeurIPS 2021).

TD3 with one change to the actor objective, a behaviour-cloning term, and normalised observations:

    critic:  min_Q  sum_i E_D[(Q_i(s, a) - y)^2],  y = r + gamma (1 - d) min_j Q'_j(s', clip(pi'(s') + eps, -1, 1)),
             eps = clip(N(0, policy_noise^2), -noise_clip, noise_clip)
    actor:   max_pi E_D[lambda Q_1(s, pi(s)) - (pi(s) - a)^2],   lambda = alpha / E_D|Q_1(s, pi(s))|  (no gradient)

The actor and the target networks update once every `policy_delay` critic updates.

Usage:
    python algorithms/td3_bc.py                                   # embedded dataset ours/Hopper-v5/medium, 5 seeds
    python algorithms/td3_bc.py --env hopper-medium-v2 --num-seeds 5
    python algorithms/td3_bc.py --env path/to/file.hdf5 --num-seeds 2 --num-updates 2000

File layout (every algorithm file in this repo has the same sections in the same order):
  Args -> networks -> agent state -> losses -> update -> make_train -> main.
Seeds are vmapped: `--num-seeds N` trains N independent agents in one compiled program; agent i
starts exactly as `--num-seeds 1 --seed (seed + i)` (same initial parameters, keys and minibatches)
and agrees with it to float rounding (README: what a run guarantees).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


# ============================================================================ Args
@dataclasses.dataclass
class Args:
    """TD3+BC. One *update* = one critic gradient step on one minibatch of `batch_size`
    transitions; the actor and both target networks are updated on every `policy_delay`-th update
    (so 1M updates = 1M critic steps and 500k actor steps, as in the paper)."""

    # --- Experiment ---
    env: str = "ours/Hopper-v5/medium"
    """dataset: a D4RL name (hopper-medium-v2), a Minari id (mujoco/hopper/medium-v0), a D4RL-format
    .hdf5 path, or one of this project's generated datasets (ours/Hopper-v5/medium)"""
    dataset_dir: str | None = None
    """folder holding D4RL files (default $D4RL_DATASET_DIR or ~/.d4rl/datasets) or, for ours/..., datasets/"""
    num_seeds: int = 5
    """independent agents trained at once (vmapped); agent i uses seed `seed + i`"""
    seed: int = 0
    """seed of the first agent"""
    num_updates: int = 1_000_000
    """total updates per agent (see the class docstring for what one update is)"""
    eval_every: int = 5000
    """updates between evaluations (and checkpoints); the last update is always evaluated"""
    eval_episodes: int = 10
    """evaluation episodes per agent, deterministic policy"""
    log_every: int = 1000
    """updates between rows of train.csv (training metrics are averaged over those updates)"""
    checkpoint_every: int | None = None
    """updates between checkpoints besides those at every evaluation, a multiple of --log-every (for long
    runs on machines that stop: a crash loses at most this many updates); default: at evaluations only"""

    # --- Logging ---
    track: bool = False
    """log to Weights & Biases (mode from $WANDB_MODE, e.g. offline); off by default"""
    wandb_project: str = "misa-jax"
    """wandb project name"""
    run_dir: str | None = None
    """where logs, checkpoints and results go (default runs/td3_bc__<env>__seed<seed>__<time>)"""
    resume: bool = False
    """continue the interrupted run in --run-dir from its last checkpoint"""
    allow_change: list[str] = dataclasses.field(default_factory=list)
    """with --resume: settings that may differ from the saved run's (e.g. num-updates to extend it, critic-lr
    after a NaN stop); each change is recorded in config.json"""

    # --- Optimisation ---
    batch_size: int = 256
    """transitions per minibatch"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""

    # --- TD3+BC ---
    alpha: float = 2.5
    """weight of the Q term relative to behaviour cloning (lambda = alpha / mean|Q|)"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target networks"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    policy_delay: int = 2
    """critic updates per actor / target update"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std"""


# The range of every numeric flag, checked before any work (common.runlog.check: one message, exit 2):
# ">= x", "> x" (finite), or an interval such as "(0, 1]".
RULES = {
    "num_seeds": ">= 1", "seed": ">= 0", "num_updates": ">= 1", "eval_every": ">= 1", "eval_episodes": ">= 1",
    "log_every": ">= 1", "checkpoint_every": ">= 1",
    "batch_size": ">= 1", "actor_lr": "> 0", "critic_lr": "> 0", "hidden_dim": ">= 1",
    "alpha": ">= 0", "discount": "[0, 1]", "tau": "(0, 1]", "policy_noise": ">= 0", "noise_clip": ">= 0",
    "policy_delay": ">= 1",
}

NEVER = jnp.iinfo(jnp.int32).max  # first non-finite step of a metric that stayed finite


# ============================================================================ Networks
class Actor(eqx.Module):
    """Deterministic policy s -> a in [-1, 1]^act_dim. Works on one (unbatched) observation."""

    net: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, *, key: jax.Array):
        self.net = eqx.nn.MLP(obs_dim, act_dim, hidden, depth=2, activation=jax.nn.relu,
                              final_activation=jnp.tanh, key=key)

    def __call__(self, obs: jax.Array) -> jax.Array:
        return self.net(obs)


class Critic(eqx.Module):
    """Twin Q networks, stored as one MLP with a leading axis of 2. (s, a) -> (Q_1, Q_2)."""

    nets: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, *, key: jax.Array):
        make = lambda k: eqx.nn.MLP(obs_dim + act_dim, "scalar", hidden, depth=2, activation=jax.nn.relu, key=k)
        self.nets = eqx.filter_vmap(make)(jax.random.split(key, 2))

    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action])
        return eqx.filter_vmap(lambda net: net(x))(self.nets)


# ============================================================================ Agent state
class Transitions(NamedTuple):
    """Transitions as training reads them (a whole dataset or one minibatch): arrays with a leading row
    axis. Defined here, not imported, so that this file works on its own (copy it, import it)."""

    obs: jax.Array  # (N, obs_dim)
    action: jax.Array  # (N, act_dim), in [-1, 1]
    reward: jax.Array  # (N,)
    next_obs: jax.Array  # (N, obs_dim)
    done: jax.Array  # (N,), 1.0 at true terminals only


class AgentState(eqx.Module):
    """Everything one agent carries between updates. A pytree of arrays: vmappable, serialisable."""

    actor: Actor
    critic: Critic
    actor_target: Actor
    critic_target: Critic
    actor_opt: optax.OptState
    critic_opt: optax.OptState


class Optimisers(NamedTuple):  # closed over by the update, never stored in the state
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation


# ============================================================================ Losses
def critic_loss(critic: Critic, batch: Transitions, actor_target: Actor, critic_target: Critic,
                key: jax.Array, args: Args) -> tuple[jax.Array, dict]:
    """Sum over the two critics of the mean squared TD error against the clipped double-Q target
    with target policy smoothing."""
    noise = jnp.clip(args.policy_noise * jax.random.normal(key, batch.action.shape), -args.noise_clip, args.noise_clip)
    next_action = jnp.clip(jax.vmap(actor_target)(batch.next_obs) + noise, -1.0, 1.0)
    next_q = jax.vmap(critic_target)(batch.next_obs, next_action).min(axis=-1)
    target = jax.lax.stop_gradient(batch.reward + args.discount * (1.0 - batch.done) * next_q)
    q = jax.vmap(critic)(batch.obs, batch.action)  # (B, 2)
    loss = ((q - target[:, None]) ** 2).mean(axis=0).sum()
    return loss, {"critic_loss": loss, "q_mean": q.mean()}


def actor_loss(actor: Actor, batch: Transitions, critic: Critic, args: Args) -> tuple[jax.Array, dict]:
    """-lambda * mean Q_1(s, pi(s)) + mean (pi(s) - a)^2, lambda = alpha / mean |Q_1| held constant."""
    pi = jax.vmap(actor)(batch.obs)
    q = jax.vmap(critic)(batch.obs, pi)[:, 0]
    lmbda = jax.lax.stop_gradient(args.alpha / jnp.abs(q).mean())
    bc = ((pi - batch.action) ** 2).mean()
    loss = -lmbda * q.mean() + bc
    return loss, {"actor_loss": loss, "bc_mse": bc, "lambda": lmbda}


# ============================================================================ Update
def apply_grads(opt: optax.GradientTransformation, model, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state


def polyak(target, online, tau: float):
    """target <- (1 - tau) target + tau online, on the arrays only."""
    return jax.tree.map(lambda t, o: (1 - tau) * t + tau * o if eqx.is_inexact_array(t) else t, target, online)


def sample(dataset: Transitions, key: jax.Array, batch_size: int) -> Transitions:
    idx = jax.random.randint(key, (batch_size,), 0, dataset.obs.shape[0])
    return jax.tree.map(lambda x: x[idx], dataset)


def update(state: AgentState, dataset: Transitions, key: jax.Array, args: Args,
           opt: Optimisers) -> tuple[AgentState, dict]:
    """`policy_delay` critic updates, then one actor update and the target updates
    (the actor uses the last critic minibatch, as in the original code)."""
    critic, critic_opt = state.critic, state.critic_opt
    critic_metrics = []
    for k in jax.random.split(key, args.policy_delay):
        batch_key, noise_key = jax.random.split(k)
        batch = sample(dataset, batch_key, args.batch_size)
        grads, m = eqx.filter_grad(critic_loss, has_aux=True)(
            critic, batch, state.actor_target, state.critic_target, noise_key, args)
        critic, critic_opt = apply_grads(opt.critic, critic, critic_opt, grads)
        critic_metrics.append(m)

    grads, actor_metrics = eqx.filter_grad(actor_loss, has_aux=True)(state.actor, batch, critic, args)
    actor, actor_opt = apply_grads(opt.actor, state.actor, state.actor_opt, grads)

    state = AgentState(
        actor=actor,
        critic=critic,
        actor_target=polyak(state.actor_target, actor, args.tau),
        critic_target=polyak(state.critic_target, critic, args.tau),
        actor_opt=actor_opt,
        critic_opt=critic_opt,
    )
    # the critic's metrics one per update, (policy_delay,) each, so that a NaN is named at its own update;
    # the actor's belong to the step's last update
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *critic_metrics)
    return state, {**metrics, **actor_metrics}


# ============================================================================ make_train
def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns the compiled, seed-vmapped `init(keys)` and `train_chunk(dataset, state, keys, num_updates)`.

    train_chunk runs `num_updates` updates per agent in a loop (one step = `policy_delay` updates). The count is traced, so one
    compiled program serves every chunk length; the dataset is an argument shared by all seeds
    (in_axes None), never closed over, so it is not baked into the program. It returns each training
    metric's mean over the chunk and the first update of the chunk (counted from 0, in updates, not
    loop steps) at which it was not finite (NEVER if none), so that a NaN is reported at its update
    without keeping every step's values."""
    opt = Optimisers(actor=optax.adam(args.actor_lr), critic=optax.adam(args.critic_lr))

    def init(key: jax.Array) -> AgentState:
        actor_key, critic_key = jax.random.split(key)
        actor = Actor(obs_dim, act_dim, args.hidden_dim, key=actor_key)
        critic = Critic(obs_dim, act_dim, args.hidden_dim, key=critic_key)
        return AgentState(actor, critic, actor, critic,
                          opt.actor.init(eqx.filter(actor, eqx.is_inexact_array)),
                          opt.critic.init(eqx.filter(critic, eqx.is_inexact_array)))

    def train_chunk(dataset: Transitions, state: AgentState, key: jax.Array, num_updates: jax.Array):
        arrays, static = eqx.partition(state, eqx.is_array)  # the loop carries arrays only
        steps = num_updates // args.policy_delay
        _, shapes = eqx.filter_eval_shape(update, state, dataset, key, args, opt)
        sums = jax.tree.map(lambda s: jnp.zeros((), getattr(s, "dtype", jnp.float32)), shapes)  # (some are floats)
        first = jax.tree.map(lambda s: jnp.int32(NEVER), shapes)

        def first_update(i, m):  # the update (from 0) of m's first non-finite value in loop step i, or NEVER
            bad = ~jnp.isfinite(jnp.atleast_1d(m))  # (policy_delay,) for the critic's metrics, (1,) for the actor's
            at = i * args.policy_delay + args.policy_delay - bad.size + jnp.argmax(bad)  # the actor's: the step's last
            return jnp.where(bad.any(), at, NEVER)

        def step(i, carry):
            arrays, key, sums, first = carry
            key, sub = jax.random.split(key)
            state, metrics = update(eqx.combine(arrays, static), dataset, sub, args, opt)
            first = jax.tree.map(lambda f, m: jnp.where(f == NEVER, first_update(i, m), f), first, metrics)
            sums = jax.tree.map(lambda s, m: s + jnp.mean(m), sums, metrics)
            return eqx.filter(state, eqx.is_array), key, sums, first

        arrays, key, sums, first = jax.lax.fori_loop(0, steps, step, (arrays, key, sums, first))
        state = eqx.combine(arrays, static)
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
        return state, key, {"mean": jax.tree.map(lambda x: x / steps, sums), "first_nonfinite": first,
                            "params_finite": finite}

    init_v = eqx.filter_jit(eqx.filter_vmap(init))
    # no buffer donation: a chunk's state is a few MB, copied once per chunk; the count is shared (in_axes None)
    train_v = eqx.filter_jit(eqx.filter_vmap(train_chunk, in_axes=(None, eqx.if_array(0), eqx.if_array(0), None)))
    return init_v, train_v


@eqx.filter_jit
def act(actors: Actor, obs: jax.Array, obs_mean: jax.Array, obs_std: jax.Array) -> jax.Array:
    """Deterministic actions of stacked actors (S,) for observations (S, E, obs_dim)."""
    normalized_actor = lambda actor, o: actor((o - obs_mean) / obs_std)
    return eqx.filter_vmap(lambda actor, o: jax.vmap(normalized_actor, in_axes=(None, 0))(actor, o))(actors, obs)


# ============================================================================ main
def activation_bytes(args: Args) -> int:
    """One seed's minibatch activations, roughly, for the memory check before a run (common.runlog.check_memory):
    one minibatch's hidden layers, float32, through the actor and the twin critic, forward only (a lower bound: the backward pass keeps more)."""
    return 4 * args.batch_size * args.hidden_dim * 2 * 3


def check_args(args: Args) -> list[str]:
    """What is wrong with this script's own combinations of settings (each setting's range is in RULES)."""
    problems = []
    if args.policy_delay >= 1 and any(n % args.policy_delay for n in (args.log_every, args.eval_every, args.num_updates)):
        problems.append(f"--log-every, --eval-every and --num-updates must be multiples of --policy-delay ({args.policy_delay})")
    return problems


def main(args: Args) -> dict:
    from common import data, evaluation, runlog, sharding  # the runner's plumbing; nothing above needs it

    runlog.check(args, RULES, check_args(args))

    # --- data (observation statistics are constants: they live outside every Module)
    raw, spec = data.load(args.env, args.dataset_dir)
    if args.normalize_obs:
        obs_mean, obs_std = raw.obs.mean(0), raw.obs.std(0) + 1e-3
    else:
        obs_mean, obs_std = np.zeros(spec.obs_dim, np.float32), np.ones(spec.obs_dim, np.float32)
    dataset = Transitions(
        obs=jnp.asarray((raw.obs - obs_mean) / obs_std), action=jnp.asarray(raw.action),
        reward=jnp.asarray(raw.reward), next_obs=jnp.asarray((raw.next_obs - obs_mean) / obs_std),
        done=jnp.asarray(raw.done))
    run = runlog.Run("td3_bc", args, spec, data.fingerprint(raw), step=args.policy_delay,
                     extra={"obs_stats": {"mean": obs_mean, "std": obs_std}})  # what act() needs besides the actor
    init_v, train_v = make_train(args, spec.obs_dim, spec.act_dim)
    runlog.check_memory(init_v, args.num_seeds, dataset, activation_bytes(args))  # refused if clearly too many seeds
    evaluator = evaluation.Evaluator(spec, run.seeds, args.eval_episodes)  # fails early if it cannot evaluate

    # --- agents: fresh, or the checkpoint of the run being resumed; the seeds spread over every local
    # device (e.g. the GPUs of one host; a no-op on one device); keys from seeds of any size
    keys = runlog.seed_keys(run.seeds)
    start = run.start({"state": init_v(keys[:, 0]), "keys": keys[:, 1]})
    dataset, state, keys = sharding.shard_seeds(args.num_seeds, dataset, start["state"], start["keys"])
    train = run.compile(train_v, dataset, state, keys)

    def policy(actor: Actor):  # deterministic actions of the stacked actors, for the evaluator
        return lambda obs: np.asarray(act(actor, jnp.asarray(obs), obs_mean, obs_std))

    # --- training: compiled chunks of updates; evaluation, then the checkpoint, on the host between them
    for num_updates in run.chunks():
        state, keys, metrics = train(dataset, state, keys, num_updates)
        run.log_train(metrics)
        if run.eval_due:
            run.log_eval(*evaluator.run(policy(state.actor)))
        if run.checkpoint_due:
            run.checkpoint({"state": state, "keys": keys})
    evaluator.close()
    return run.finish()


if __name__ == "__main__":
    from common import runlog

    runlog.cli(main, Args)

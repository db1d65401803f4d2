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
Seeds are vmapped: `--num-seeds N` trains N independent agents in one compiled program; agent i is
the same run as `--num-seeds 1 --seed (seed + i)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
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
    """updates per compiled chunk; training metrics are averaged and logged once per chunk"""

    # --- Logging ---
    track: bool = False
    """log to Weights & Biases (mode from $WANDB_MODE, e.g. offline); off by default"""
    wandb_project: str = "misa-jax"
    """wandb project name"""
    run_dir: str | None = None
    """where logs, checkpoints and results go (default runs/td3_bc__<env>__seed<seed>__<time>)"""
    resume: bool = False
    """continue the interrupted run in --run-dir from its last checkpoint"""

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


def check_args(args: Args) -> None:
    problems = []
    if args.num_seeds < 1:
        problems.append("--num-seeds must be >= 1")
    if args.log_every % args.policy_delay:
        problems.append(f"--log-every ({args.log_every}) must be a multiple of --policy-delay ({args.policy_delay})")
    if args.eval_every % args.log_every:
        problems.append(f"--eval-every ({args.eval_every}) must be a multiple of --log-every ({args.log_every})")
    if args.num_updates % args.log_every:
        problems.append(f"--num-updates ({args.num_updates}) must be a multiple of --log-every ({args.log_every})")
    if args.resume and args.run_dir is None:
        problems.append("--resume needs --run-dir pointing at the interrupted run")
    if problems:
        raise SystemExit("invalid arguments:\n  " + "\n  ".join(problems))


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
    metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *critic_metrics)
    return state, {**metrics, **actor_metrics}


# ============================================================================ make_train
def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns the compiled, seed-vmapped `init(keys)` and `train_chunk(dataset, state, keys)`.

    train_chunk runs `log_every` updates per agent in a lax.scan. The dataset is an argument
    shared by all seeds (in_axes None), never closed over, so it is not baked into the program."""
    opt = Optimisers(actor=optax.adam(args.actor_lr), critic=optax.adam(args.critic_lr))

    def init(key: jax.Array) -> AgentState:
        actor_key, critic_key = jax.random.split(key)
        actor = Actor(obs_dim, act_dim, args.hidden_dim, key=actor_key)
        critic = Critic(obs_dim, act_dim, args.hidden_dim, key=critic_key)
        return AgentState(actor, critic, actor, critic,
                          opt.actor.init(eqx.filter(actor, eqx.is_inexact_array)),
                          opt.critic.init(eqx.filter(critic, eqx.is_inexact_array)))

    def train_chunk(dataset: Transitions, state: AgentState, key: jax.Array):
        arrays, static = eqx.partition(state, eqx.is_array)  # lax.scan carries arrays only

        def step(carry, _):
            arrays, key = carry
            key, sub = jax.random.split(key)
            state, metrics = update(eqx.combine(arrays, static), dataset, sub, args, opt)
            return (eqx.filter(state, eqx.is_array), key), metrics

        (arrays, key), metrics = jax.lax.scan(step, (arrays, key), None, length=args.log_every // args.policy_delay)
        state = eqx.combine(arrays, static)
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
        metrics["params_finite"] = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
        return state, key, metrics

    init_v = eqx.filter_jit(eqx.filter_vmap(init))
    # donate: the state and keys passed in are replaced by the outputs, so XLA may reuse their buffers
    train_v = eqx.filter_jit(eqx.filter_vmap(train_chunk, in_axes=(None, eqx.if_array(0), eqx.if_array(0))),
                            donate="all-except-first")
    return init_v, train_v


@eqx.filter_jit
def act(actors: Actor, obs: jax.Array, obs_mean: jax.Array, obs_std: jax.Array) -> jax.Array:
    """Deterministic actions of stacked actors (S,) for observations (S, E, obs_dim)."""
    normalized_actor = lambda actor, o: actor((o - obs_mean) / obs_std)
    return eqx.filter_vmap(lambda actor, o: jax.vmap(normalized_actor, in_axes=(None, 0))(actor, o))(actors, obs)


# ============================================================================ main
def main(args: Args) -> dict:
    from common import data, evaluation, runlog, sharding  # the runner's plumbing; nothing above needs it

    check_args(args)
    seeds = [args.seed + i for i in range(args.num_seeds)]

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
    evaluator = evaluation.Evaluator(spec, seeds, args.eval_episodes)  # fails early if it cannot evaluate

    # --- agents, run directory, resume
    init_v, train_v = make_train(args, spec.obs_dim, spec.act_dim)
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(jnp.asarray(seeds))
    state, train_keys = init_v(keys[:, 0]), keys[:, 1]
    run_dir = Path(args.run_dir) if args.run_dir else runlog.default_run_dir("td3_bc", args.env, args.seed)
    ckpt, update_count, history = runlog.resume_or_start(
        run_dir, args, {"state": state, "keys": train_keys, "update": jnp.int32(0)})
    state, train_keys = ckpt["state"], ckpt["keys"]
    run = runlog.Run(run_dir, args, seeds, args.track, args.wandb_project,
                     resume_update=update_count if args.resume else None)
    np.savez(run_dir / "obs_stats.npz", mean=obs_mean, std=obs_std)
    print(f"td3_bc on {spec.name} ({spec.source}; {raw.obs.shape[0]} transitions), seeds {seeds}, run dir {run_dir}")

    # --- the seeds spread over every local device (e.g. the GPUs of one host; a no-op on one device)
    dataset, state, train_keys = sharding.shard_seeds(args.num_seeds, dataset, state, train_keys)

    def policy(obs: np.ndarray) -> np.ndarray:
        return np.asarray(act(state.actor, jnp.asarray(obs), obs_mean, obs_std))

    # --- training: compiled chunks of updates, evaluation + checkpoint on the host between them
    bar = runlog.progress(args.num_updates, update_count, "td3_bc")
    while update_count < args.num_updates:
        state, train_keys, metrics = train_v(dataset, state, train_keys)
        metrics = jax.tree.map(np.asarray, metrics)
        runlog.check_finite(metrics, seeds, update_count, args.policy_delay, run_dir)
        update_count += args.log_every
        bar.update(args.log_every)
        run.log("train", update_count, {k: v.mean(axis=1) for k, v in metrics.items() if k != "params_finite"})

        if update_count % args.eval_every == 0 or update_count == args.num_updates:
            eval_metrics = runlog.record_evaluation(*evaluator.run(policy), spec, update_count, history, run, run_dir)
            runlog.save_checkpoint(run_dir, {"state": state, "keys": train_keys, "update": jnp.int32(update_count)},
                                   {"update": update_count, "seeds": seeds})
            bar.set_postfix({k: f"{v.mean():.1f}" for k, v in eval_metrics.items() if k != "episode_length"})
    bar.close()
    evaluator.close()
    results = runlog.report(history, spec, seeds, run_dir)
    run.close()
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))

"""SAC: "Soft Actor-Critic Algorithms and Applications" (Haarnoja et al., 2018), online, on a gymnasium env.

The online agent this project uses to *make* offline datasets (see tools/make_dataset.py), in the
spirit of the rlkit SAC that generated D4RL's locomotion data:

    critic:  min_Q  sum_i E[(Q_i(s, a) - y)^2],  y = r + gamma (1 - terminal) (min_j Q'_j(s', a') - alpha log pi(a'|s')),  a' ~ pi(s')
    actor:   min_pi E[alpha log pi(a|s) - min_j Q_j(s, a)],  a ~ pi(s)  (reparameterised tanh-Gaussian)
    alpha:   min_{log alpha} E[-log alpha (log pi(a|s) + target_entropy)],  target_entropy = -act_dim

Only gymnasium's `terminated` stops bootstrapping; a time-limit truncation does not.

Everything the agent sees is kept: each seed's replay buffer is written to the run directory in
segments (observations, actions, rewards, next_observations, terminals, timeouts, the MuJoCo qpos/qvel
*before* each step, and the log-probability of each action), and every `checkpoint_every` env steps
the policy is saved and evaluated on `eval_episodes` deterministic episodes. An interrupted run
continues exactly where its last checkpoint left off (`--resume --run-dir ...`): agents, optimisers,
random keys, the environments' physics and random state are all restored.

Usage:
    python algorithms/sac.py --env Hopper-v5 --total-steps 1000000
    python algorithms/sac.py --env Pendulum-v1 --num-seeds 3 --total-steps 20000 --hidden-dim 64
    python algorithms/sac.py --resume --run-dir runs/sac__Hopper-v5__seed0__<time>

File layout: Args -> networks -> agent state -> losses -> update -> make_train -> environment
helpers -> training loop (train) -> run-directory readers -> main.
Seeds are vmapped: `--num-seeds N` trains N independent agents, one env each, with one batched
policy call per env step and one vmapped, jitted chunk of updates every `update_every` env steps;
agent i is the same run as `--num-seeds 1 --seed (seed + i)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
from pathlib import Path
from typing import NamedTuple


import equinox as eqx
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from common import data, evaluation
from common import runlock, runlog
from common.errors import UserError


# ============================================================================ Args
@dataclasses.dataclass
class Args:
    """Online SAC. One env step per seed is followed, on average, by one update (UTD 1): updates
    run in compiled chunks of `update_every` after every `update_every` env steps, once
    `learning_starts` uniform-random steps have been collected."""

    # --- Experiment ---
    env: str = "Hopper-v5"
    """gymnasium environment id (actions are rescaled to [-1, 1] when the env's bounds differ)"""
    env_kwargs: str = "{}"
    """JSON dict of keyword arguments for gymnasium.make"""
    num_seeds: int = 1
    """independent agents trained at once (vmapped, one env each); agent i uses seed `seed + i`"""
    seed: int = 0
    """seed of the first agent"""
    total_steps: int = 1_000_000
    """environment steps per agent"""
    learning_starts: int = 5000
    """initial env steps with uniform-random actions before any update"""
    checkpoint_every: int = 5000
    """env steps between policy checkpoints (each is evaluated, and the run can resume from it)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per checkpoint and agent"""

    # --- Logging ---
    track: bool = False
    """log to Weights & Biases (mode from $WANDB_MODE, e.g. offline); off by default"""
    wandb_project: str = "misa-jax"
    """wandb project name"""
    run_dir: str | None = None
    """where logs, checkpoints, policies and the replay buffer go (default runs/sac__<env>__seed<seed>__<time>)"""
    resume: bool = False
    """continue the interrupted run in --run-dir from its last checkpoint (--total-steps may grow)"""
    progress: bool = True
    """show a tqdm progress bar"""

    # --- Optimisation ---
    batch_size: int = 256
    """transitions per minibatch"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics"""
    alpha_lr: float = 3e-4
    """Adam learning rate of log(alpha)"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""
    update_every: int = 10
    """env steps per training chunk; each chunk is followed by as many updates (compiled together)"""

    # --- SAC ---
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    init_alpha: float = 1.0
    """initial entropy temperature"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature tuning (default -act_dim)"""


# The range of every numeric flag, checked before any work (common.runlog.check: one message, exit 2):
# ">= x", "> x" (finite), "any" (finite), or an interval such as "(0, 1]".
RULES = {
    "num_seeds": ">= 1", "seed": ">= 0", "total_steps": ">= 1", "learning_starts": ">= 0", "checkpoint_every": ">= 1",
    "eval_episodes": ">= 1", "batch_size": ">= 1", "actor_lr": "> 0", "critic_lr": "> 0", "alpha_lr": "> 0",
    "hidden_dim": ">= 1", "update_every": ">= 1", "discount": "[0, 1]", "tau": "(0, 1]", "init_alpha": "> 0",
    "target_entropy": "any",
}
NEVER = jnp.iinfo(jnp.int32).max  # first non-finite update of a metric that stayed finite


def check_args(args: Args) -> None:
    """Every setting's range (RULES) and this script's combinations of them: one UserError listing all."""
    problems = []
    if args.update_every >= 1 and args.checkpoint_every >= 1 and args.checkpoint_every % args.update_every:
        problems.append(f"--checkpoint-every ({args.checkpoint_every}) must be a multiple of --update-every ({args.update_every})")
    if args.checkpoint_every >= 1 and args.total_steps >= 1 and args.total_steps % args.checkpoint_every:
        problems.append(f"--total-steps ({args.total_steps}) must be a multiple of --checkpoint-every ({args.checkpoint_every})")
    if args.learning_starts < args.batch_size:
        problems.append(f"--learning-starts ({args.learning_starts}) must be >= --batch-size ({args.batch_size})")
    try:
        if not isinstance(json.loads(args.env_kwargs), dict):
            raise ValueError
    except ValueError:
        problems.append(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    runlog.check(args, RULES, problems)


# ============================================================================ Networks
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(eqx.Module):
    """Tanh-Gaussian policy: s -> (mean, log_std) of a Gaussian over pre-tanh actions u; a = tanh(u).
    Works on one (unbatched) observation."""

    net: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, *, key: jax.Array):
        self.net = eqx.nn.MLP(obs_dim, 2 * act_dim, hidden, depth=2, activation=jax.nn.relu, key=key)

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, raw_log_std = jnp.split(self.net(obs), 2)
        # squash log_std smoothly into [LOG_STD_MIN, LOG_STD_MAX]
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw_log_std) + 1.0)
        return mean, log_std


def sample_action(actor: Actor, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One reparameterised sample a = tanh(mean + std * eps) and its log-density log pi(a|s)."""
    mean, log_std = actor(obs)
    eps = jax.random.normal(key, mean.shape)
    u = mean + jnp.exp(log_std) * eps
    gaussian = -0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)
    # log |d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable
    log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), (gaussian - log_det).sum()


def deterministic_action(actor: Actor, obs: jax.Array) -> jax.Array:
    """The policy's mode used for evaluation: tanh(mean)."""
    return jnp.tanh(actor(obs)[0])


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
class AgentState(eqx.Module):
    """Everything one agent carries between updates. A pytree of arrays: vmappable, serialisable."""

    actor: Actor
    critic: Critic
    critic_target: Critic
    log_alpha: jax.Array  # scalar, trained
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState


class Optimisers(NamedTuple):  # closed over by the update, never stored in the state
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    alpha: optax.GradientTransformation


# ============================================================================ Losses
def critic_loss(critic: Critic, batch: data.Transitions, actor: Actor, critic_target: Critic, alpha: jax.Array,
                key: jax.Array, args: Args) -> tuple[jax.Array, dict]:
    """Sum over the two critics of the mean squared soft TD error against the clipped double-Q target."""
    keys = jax.random.split(key, batch.obs.shape[0])
    next_action, next_logp = jax.vmap(sample_action, in_axes=(None, 0, 0))(actor, batch.next_obs, keys)
    next_q = jax.vmap(critic_target)(batch.next_obs, next_action).min(axis=-1)
    target = jax.lax.stop_gradient(batch.reward + args.discount * (1.0 - batch.done) * (next_q - alpha * next_logp))
    q = jax.vmap(critic)(batch.obs, batch.action)  # (B, 2)
    loss = ((q - target[:, None]) ** 2).mean(axis=0).sum()
    return loss, {"critic_loss": loss, "q_mean": q.mean()}


def actor_loss(actor: Actor, batch: data.Transitions, critic: Critic, alpha: jax.Array,
               key: jax.Array) -> tuple[jax.Array, dict]:
    """mean of alpha log pi(a|s) - min_j Q_j(s, a), a ~ pi(s) reparameterised."""
    keys = jax.random.split(key, batch.obs.shape[0])
    action, logp = jax.vmap(sample_action, in_axes=(None, 0, 0))(actor, batch.obs, keys)
    q = jax.vmap(critic)(batch.obs, action).min(axis=-1)
    loss = (alpha * logp - q).mean()
    return loss, {"actor_loss": loss, "entropy": -logp.mean(), "logp": logp}


def alpha_loss(log_alpha: jax.Array, logp: jax.Array, target_entropy: float) -> jax.Array:
    """-log alpha * (log pi + target_entropy): raises alpha when the entropy is below the target."""
    return -(log_alpha * jax.lax.stop_gradient(logp + target_entropy)).mean()


# ============================================================================ Update
def apply_grads(opt: optax.GradientTransformation, model, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state


def polyak(target, online, tau: float):
    """target <- (1 - tau) target + tau online, on the arrays only."""
    return jax.tree.map(lambda t, o: (1 - tau) * t + tau * o if eqx.is_inexact_array(t) else t, target, online)


def update(state: AgentState, batch: data.Transitions, key: jax.Array, args: Args, opt: Optimisers,
           target_entropy: float) -> tuple[AgentState, dict]:
    """One SAC update: critics, then the actor against the new critics, then alpha, then the targets."""
    critic_key, actor_key = jax.random.split(key)
    alpha = jnp.exp(state.log_alpha)
    grads, critic_metrics = eqx.filter_grad(critic_loss, has_aux=True)(
        state.critic, batch, state.actor, state.critic_target, alpha, critic_key, args)
    critic, critic_opt = apply_grads(opt.critic, state.critic, state.critic_opt, grads)

    grads, actor_metrics = eqx.filter_grad(actor_loss, has_aux=True)(state.actor, batch, critic, alpha, actor_key)
    actor, actor_opt = apply_grads(opt.actor, state.actor, state.actor_opt, grads)

    logp = actor_metrics.pop("logp")
    grad = jax.grad(alpha_loss)(state.log_alpha, logp, target_entropy)
    updates, alpha_opt = opt.alpha.update(grad, state.alpha_opt, state.log_alpha)
    log_alpha = optax.apply_updates(state.log_alpha, updates)

    state = AgentState(actor=actor, critic=critic, critic_target=polyak(state.critic_target, critic, args.tau),
                       log_alpha=log_alpha, actor_opt=actor_opt, critic_opt=critic_opt, alpha_opt=alpha_opt)
    return state, {**critic_metrics, **actor_metrics, "alpha": alpha}


# ============================================================================ make_train
_COMPILED: dict = {}


def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns the compiled, seed-vmapped `init(keys)`, `train_chunk(state, batches, keys)` and
    `policy(actors, obs, keys)` (one stochastic action per seed). Memoised on everything they
    depend on, so repeated runs in one process (tests, resumption) compile once."""
    key = (obs_dim, act_dim, args.hidden_dim, args.actor_lr, args.critic_lr, args.alpha_lr, args.discount, args.tau,
           args.init_alpha, args.target_entropy)
    if key not in _COMPILED:
        _COMPILED[key] = _make_train(args, obs_dim, act_dim)
    return _COMPILED[key]


def _make_train(args: Args, obs_dim: int, act_dim: int):
    opt = Optimisers(actor=optax.adam(args.actor_lr), critic=optax.adam(args.critic_lr), alpha=optax.adam(args.alpha_lr))
    target_entropy = float(-act_dim if args.target_entropy is None else args.target_entropy)

    def init(key: jax.Array) -> AgentState:
        actor_key, critic_key = jax.random.split(key)
        actor = Actor(obs_dim, act_dim, args.hidden_dim, key=actor_key)
        critic = Critic(obs_dim, act_dim, args.hidden_dim, key=critic_key)
        log_alpha = jnp.asarray(math.log(args.init_alpha), jnp.float32)
        return AgentState(actor, critic, critic, log_alpha,
                          opt.actor.init(eqx.filter(actor, eqx.is_inexact_array)),
                          opt.critic.init(eqx.filter(critic, eqx.is_inexact_array)),
                          opt.alpha.init(log_alpha))

    def train_chunk(state: AgentState, batches: data.Transitions, key: jax.Array):
        """len(batches) updates in a lax.scan; batches has a leading axis of update_every."""
        arrays, static = eqx.partition(state, eqx.is_array)  # lax.scan carries arrays only

        def step(carry, batch):
            arrays, key = carry
            key, sub = jax.random.split(key)
            state, metrics = update(eqx.combine(arrays, static), batch, sub, args, opt, target_entropy)
            return (eqx.filter(state, eqx.is_array), key), metrics

        (arrays, key), metrics = jax.lax.scan(step, (arrays, key), batches)
        state = eqx.combine(arrays, static)
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
        # each metric's first non-finite update of the chunk (from 0; NEVER if none), for the NaN stop
        first = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x).all(), NEVER, jnp.argmax(~jnp.isfinite(x))), metrics)
        metrics = jax.tree.map(lambda x: x.mean(), metrics)
        metrics["params_finite"] = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
        return state, key, {**metrics, "first_nonfinite": first}

    def policy(actor: Actor, obs: jax.Array, key: jax.Array):
        key, sub = jax.random.split(key)
        action, logp = sample_action(actor, obs, sub)
        return action, logp, key

    init_v = eqx.filter_jit(eqx.filter_vmap(init))
    train_v = eqx.filter_jit(eqx.filter_vmap(train_chunk), donate="all")
    policy_v = eqx.filter_jit(eqx.filter_vmap(policy))
    return init_v, train_v, policy_v


def fast_jit(fn, module: eqx.Module):
    """jax.jit of fn(module, *args) with the module's static part closed over, taking only its arrays:
    cheaper to dispatch once per env step than eqx.filter_jit."""
    _, static = eqx.partition(module, eqx.is_array)
    jitted = jax.jit(lambda arrays, *a: fn(eqx.combine(arrays, static), *a))
    return lambda m, *a: jitted(eqx.filter(m, eqx.is_array), *a)


_FAST: dict = {}


def _fast_policy(policy_v, actors: Actor):
    if id(policy_v) not in _FAST:
        _FAST[id(policy_v)] = (policy_v, fast_jit(policy_v, actors))  # keeps policy_v alive: ids stay unique
    return _FAST[id(policy_v)][1]


@eqx.filter_jit
def act_deterministic(actors: Actor, obs: jax.Array) -> jax.Array:
    """Deterministic actions of stacked actors (S,) for observations (S, E, obs_dim)."""
    return eqx.filter_vmap(lambda actor, o: jax.vmap(deterministic_action, in_axes=(None, 0))(actor, o))(actors, obs)


# ============================================================================ Environment helpers
def make_env(env_id: str, env_kwargs: dict | str = "{}") -> gym.Env:
    """A training/rollout env taking actions in [-1, 1] (the same wrapping as common.evaluation.make_env)."""
    kwargs = json.loads(env_kwargs) if isinstance(env_kwargs, str) else dict(env_kwargs)
    try:
        env = gym.make(env_id, disable_env_checker=True, **kwargs)
    except gym.error.Error as e:
        raise UserError(f"cannot make gymnasium env {env_id!r} with {kwargs}: {e}") from None
    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        raise UserError(f"{env_id}: SAC here needs Box observation and action spaces, got "
                         f"{env.observation_space} and {env.action_space}")
    space = env.action_space
    if not (np.all(space.low == -1.0) and np.all(space.high == 1.0)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    return env


def env_spec(env_id: str, env_kwargs: dict | str = "{}") -> data.EnvSpec:
    """An EnvSpec for common.evaluation.Evaluator describing a plain gymnasium env."""
    kwargs = json.loads(env_kwargs) if isinstance(env_kwargs, str) else dict(env_kwargs)
    env = make_env(env_id, kwargs)
    spec = data.EnvSpec(name=env_id, source="gymnasium", obs_dim=env.observation_space.shape[0],
                        act_dim=env.action_space.shape[0], max_episode_steps=env.spec.max_episode_steps,
                        eval_env_id=env_id, eval_env_kwargs=kwargs)
    env.close()
    return spec


def is_mujoco(env: gym.Env) -> bool:
    return hasattr(env.unwrapped, "model") and hasattr(env.unwrapped, "data")


def physics_state(env: gym.Env) -> tuple[np.ndarray, np.ndarray] | None:
    """(qpos, qvel) of a MuJoCo env right now, or None for other envs."""
    if not is_mujoco(env):
        return None
    return env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()


def get_env_state(env: gym.Env) -> dict:
    """Everything needed to continue an episode exactly: physics (MuJoCo integration state, or the
    unwrapped env's attributes), the env's random generator and the wrappers' step counters."""
    import mujoco

    state = {"np_random": env.unwrapped.np_random.bit_generator.state, "wrappers": []}
    e = env
    while isinstance(e, gym.Wrapper):
        state["wrappers"].append({k: getattr(e, k) for k in ("_elapsed_steps", "_has_reset") if hasattr(e, k)})
        e = e.env
    u = env.unwrapped
    if is_mujoco(env):
        sig = mujoco.mjtState.mjSTATE_INTEGRATION
        s = np.empty(mujoco.mj_stateSize(u.model, sig))
        mujoco.mj_getState(u.model, u.data, s, sig)
        state["mujoco"] = s
    else:
        state["attributes"] = pickle.dumps({k: v for k, v in vars(u).items() if k not in ("_np_random", "spec")})
    return state


def set_env_state(env: gym.Env, state: dict) -> None:
    import mujoco

    e, i = env, 0
    while isinstance(e, gym.Wrapper):
        for k, v in state["wrappers"][i].items():
            setattr(e, k, v)
        e, i = e.env, i + 1
    u = env.unwrapped
    if "mujoco" in state:
        mujoco.mj_setState(u.model, u.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(u.model, u.data)
    else:
        vars(u).update(pickle.loads(state["attributes"]))
    u.np_random.bit_generator.state = state["np_random"]


# ============================================================================ Replay buffer (host)
def new_buffer(num_seeds: int, size: int, obs_dim: int, act_dim: int, qpos_dim: int | None,
               qvel_dim: int | None) -> dict[str, np.ndarray]:
    """Per-seed arrays under D4RL's keys (the dataset maker moves `action_log_probs` to
    `infos/action_log_probs`); infos/qpos and infos/qvel only for MuJoCo envs."""
    buf = {
        "observations": np.zeros((num_seeds, size, obs_dim), np.float32),
        "actions": np.zeros((num_seeds, size, act_dim), np.float32),
        "rewards": np.zeros((num_seeds, size), np.float32),
        "next_observations": np.zeros((num_seeds, size, obs_dim), np.float32),
        "terminals": np.zeros((num_seeds, size), bool),
        "timeouts": np.zeros((num_seeds, size), bool),
        "action_log_probs": np.zeros((num_seeds, size), np.float32),
    }
    if qpos_dim is not None:
        buf["infos/qpos"] = np.zeros((num_seeds, size, qpos_dim), np.float32)
        buf["infos/qvel"] = np.zeros((num_seeds, size, qvel_dim), np.float32)
    return buf


def sample_batches(buf: dict[str, np.ndarray], size: int, rngs: list[np.random.Generator], num: int,
                   batch_size: int) -> data.Transitions:
    """(S, num, batch_size, ...) minibatches, uniformly from each seed's first `size` transitions."""
    idx = np.stack([rng.integers(0, size, (num, batch_size)) for rng in rngs])  # (S, num, B)
    seed_idx = np.arange(len(rngs))[:, None, None]
    return data.Transitions(obs=buf["observations"][seed_idx, idx], action=buf["actions"][seed_idx, idx],
                            reward=buf["rewards"][seed_idx, idx], next_obs=buf["next_observations"][seed_idx, idx],
                            done=buf["terminals"][seed_idx, idx].astype(np.float32))


# ============================================================================ Training loop
def train(args: Args) -> Path:
    """Run (or continue) SAC as described by args; returns the run directory (locked for this process
    while it trains: a second process on it is refused, see common/runlock.py)."""
    check_args(args)
    run_dir = Path(args.run_dir) if args.run_dir else runlog.default_run_dir("sac", args.env, args.seed)
    try:
        return _train(args, run_dir)
    finally:
        runlock.release(run_dir)


# a run's own files, replaced when a run killed before its first checkpoint is started again
RUN_FILES = ["config.json", "env.json", "train.csv", "eval.csv", "evals.npz", "checkpoint.json"]


def _train(args: Args, run_dir: Path) -> Path:
    seeds = [args.seed + i for i in range(args.num_seeds)]
    S = len(seeds)
    envs = [make_env(args.env, args.env_kwargs) for _ in seeds]
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    spec = env_spec(args.env, args.env_kwargs)
    evaluator = evaluation.Evaluator(spec, seeds, args.eval_episodes)

    if run_dir.is_dir():  # one process per run directory, locked before the checks read it
        runlock.acquire(run_dir)
    if args.resume:
        saved = runlog.check_resumable(run_dir, "sac", "env step")["args"]
        changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(args).items()
                   if k not in ("resume", "total_steps", "track", "run_dir", "progress") and saved.get(k) != v}
        if changed:
            raise UserError(f"--resume with different settings than the run in {run_dir} (saved, given): {changed}")
    elif (run_dir / "checkpoint.eqx").exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")

    init_v, train_v, policy_v = make_train(args, obs_dim, act_dim)
    keys = runlog.seed_keys(seeds, 3)  # PRNGKey(seed) split in 3, for seeds of any size
    state, act_keys, train_keys = init_v(keys[:, 0]), keys[:, 1], keys[:, 2]
    rngs = [np.random.default_rng([s, 1]) for s in seeds]  # uniform warm-up actions + minibatch indices

    # --- host state: what the env loop carries besides the agents
    observations = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)]).astype(np.float32)
    phys = physics_state(envs[0])
    buf = new_buffer(S, args.total_steps, obs_dim, act_dim, *(None, None) if phys is None else (len(phys[0]), len(phys[1])))
    host = {"ep_return": np.zeros(S), "ep_length": np.zeros(S, np.int64), "episodes": [[] for _ in seeds]}
    step, saved_until = 0, 0
    history = {"steps": [], "returns": [], "lengths": []}

    if args.resume:
        like = {"state": state, "act_keys": act_keys, "train_keys": train_keys, "step": jnp.int32(0)}
        ckpt, _ = runlog.load_checkpoint(run_dir, like)
        state, act_keys, train_keys, step = ckpt["state"], ckpt["act_keys"], ckpt["train_keys"], int(ckpt["step"])
        if step > args.total_steps:
            raise UserError(f"{run_dir} is already at step {step} > --total-steps {args.total_steps}")
        missing = [f for f in (host_file_of(step), "evals.npz") if not (run_dir / f).exists()]
        if missing:
            raise UserError(f"{run_dir} lacks {' and '.join(missing)} of its checkpoint at step {step}: it cannot "
                            "resume consistently. Start a new run (another --run-dir).")
        with open(run_dir / host_file_of(step), "rb") as f:
            saved_host = pickle.load(f)
        for env, env_state in zip(envs, saved_host["envs"]):
            set_env_state(env, env_state)
        for rng, rng_state in zip(rngs, saved_host["rngs"]):
            rng.bit_generator.state = rng_state
        observations, host = saved_host["observations"], saved_host["host"]
        for key, value in read_buffer(run_dir, step).items():
            buf[key][:, :step] = value
        saved_until = step
        evals = np.load(run_dir / "evals.npz")
        keep = evals["steps"] <= step
        history = {"steps": list(evals["steps"][keep]), "returns": list(evals["returns"][keep]),
                   "lengths": list(evals["lengths"][keep])}
        print(f"resuming {run_dir} at env step {step}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(runlock.unwritable(run_dir, e)) from None
    runlock.acquire(run_dir)  # a new directory: before anything is written in it
    if not args.resume:
        if (run_dir / "checkpoint.eqx").exists():  # again, now that no other process can write here
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        stale = [run_dir / n for n in RUN_FILES if (run_dir / n).exists()] + sorted(run_dir.glob("host_*.pkl")) \
            + sorted(run_dir.glob("buffer/*.npz")) + sorted(run_dir.glob("policies/*.eqx"))
        if stale:  # a run killed before its first checkpoint: its logs describe nothing that survives
            print(f"{run_dir}: replacing the files of a run that stopped before its first checkpoint "
                  f"({', '.join(str(p.relative_to(run_dir)) for p in stale)})")
            for path in stale:
                path.unlink()
    for tmp in [*run_dir.glob("*.tmp"), *run_dir.glob("buffer/*.tmp")]:  # written aside by a process that died
        tmp.unlink()
    (run_dir / "policies").mkdir(parents=True, exist_ok=True)
    (run_dir / "buffer").mkdir(parents=True, exist_ok=True)
    if not args.resume:
        runlog.write_json(run_dir / "config.json", {"algo": "sac", "args": dataclasses.asdict(args), **runlog.provenance()})
    run = runlog.Logs(run_dir, dataclasses.asdict(args), seeds, args.track, args.wandb_project)
    if args.resume:
        run.truncate(step)  # rows logged after the checkpoint are redone
    if not args.resume:
        runlog.write_json(run_dir / "env.json", {"env_id": args.env, "env_kwargs": args.env_kwargs,
                                                 "obs_dim": obs_dim, "act_dim": act_dim,
                                                 "max_episode_steps": spec.max_episode_steps})

    uniform_logp = np.float32(-act_dim * math.log(2.0))  # density of U[-1, 1]^act_dim
    policy = _fast_policy(policy_v, state.actor)
    chunk_metrics: list[dict] = []
    bar = tqdm(total=args.total_steps, initial=step, desc=f"sac {args.env}", unit="step", dynamic_ncols=True,
               smoothing=0.05, disable=not args.progress)
    t_start = time.time()
    while step < args.total_steps:
        # --- act
        if step < args.learning_starts:
            actions = np.stack([rng.uniform(-1.0, 1.0, act_dim) for rng in rngs]).astype(np.float32)
            logps = np.full(S, uniform_logp)
        else:
            actions, logps, act_keys = policy(state.actor, jnp.asarray(observations), act_keys)
            actions, logps = np.asarray(actions), np.asarray(logps)
        # --- step every seed's env, keep the transition
        for i, env in enumerate(envs):
            phys = physics_state(env)
            next_obs, reward, terminated, truncated, _ = env.step(actions[i])
            buf["observations"][i, step] = observations[i]
            buf["actions"][i, step] = actions[i]
            buf["rewards"][i, step] = reward
            buf["next_observations"][i, step] = next_obs
            buf["terminals"][i, step] = terminated
            buf["timeouts"][i, step] = truncated and not terminated
            buf["action_log_probs"][i, step] = logps[i]
            if phys is not None:
                buf["infos/qpos"][i, step], buf["infos/qvel"][i, step] = phys
            host["ep_return"][i] += reward
            host["ep_length"][i] += 1
            if terminated or truncated:
                host["episodes"][i].append((step + 1, float(host["ep_return"][i]), int(host["ep_length"][i])))
                host["ep_return"][i], host["ep_length"][i] = 0.0, 0
                next_obs, _ = env.reset()
            observations[i] = next_obs
        step += 1
        bar.update(1)

        # --- learn
        if step >= args.learning_starts and step % args.update_every == 0:
            batches = sample_batches(buf, step, rngs, args.update_every, args.batch_size)
            state, train_keys, metrics = train_v(state, jax.tree.map(jnp.asarray, batches), train_keys)
            stop_if_nonfinite(metrics, seeds, updates_until(step, args) - args.update_every, args.update_every, step,
                              saved_until, run_dir)
            chunk_metrics.append(metrics)

        # --- checkpoint: evaluate, save the policy, the new transitions and everything to resume
        if step % args.checkpoint_every == 0:
            train_metrics = {}
            if chunk_metrics:
                stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis=1), *chunk_metrics)
                stacked.pop("params_finite")  # (checked after each chunk)
                train_metrics = {k: v.mean(axis=1) for k, v in stacked.items()}
                chunk_metrics = []
            recent = [[r for (s_end, r, _) in eps if s_end > step - args.checkpoint_every] for eps in host["episodes"]]
            train_metrics["episode_return"] = np.array([np.mean(r) if r else np.nan for r in recent])
            train_metrics["steps_per_s"] = np.full(S, (step - (history["steps"][-1] if history["steps"] else 0)) /
                                                   max(time.time() - t_start, 1e-9))
            run.log("train", step, train_metrics)

            actors = state.actor
            returns, lengths = evaluator.run(lambda o: np.asarray(act_deterministic(actors, jnp.asarray(o))))
            run.log("eval", step, {"return": returns.mean(1), "return_std": returns.std(1), "episode_length": lengths.mean(1)})
            history["steps"].append(step)
            history["returns"].append(returns)
            history["lengths"].append(lengths)

            eqx.tree_serialise_leaves(run_dir / "policies" / f"step_{step:09d}.eqx", state.actor)
            segment = {k: v[:, saved_until:step] for k, v in buf.items()}
            runlog.save_npz(run_dir / "buffer" / f"{saved_until:09d}_{step:09d}.npz", **segment)
            saved_until = step
            runlog.save_npz(run_dir / "evals.npz", steps=np.asarray(history["steps"]),
                            returns=np.stack(history["returns"]), lengths=np.stack(history["lengths"]))
            host_file = host_file_of(step)
            with open(run_dir / (host_file + ".tmp"), "wb") as f:
                pickle.dump({"envs": [get_env_state(env) for env in envs], "rngs": [r.bit_generator.state for r in rngs],
                             "observations": observations, "host": host}, f)
            (run_dir / (host_file + ".tmp")).replace(run_dir / host_file)
            # the step inside the checkpoint: a crash between it and the JSON note cannot pair agents with another step
            runlog.save_checkpoint(run_dir, {"state": state, "act_keys": act_keys, "train_keys": train_keys,
                                             "step": jnp.int32(step)}, {"step": step, "seeds": seeds})
            for old in run_dir.glob("host_*.pkl"):
                if old.name != host_file:
                    old.unlink()
            bar.set_postfix({"eval": f"{returns.mean():.1f}", "train_ep": f"{np.nanmean(train_metrics['episode_return']):.1f}"
                             if not np.isnan(train_metrics["episode_return"]).all() else "-"})
            t_start = time.time()
    bar.close()
    evaluator.close()
    for env in envs:
        env.close()
    run.close()
    return run_dir


def updates_until(step: int, args: Args) -> int:
    """Updates each agent has made by the end of env step `step`: a chunk of update_every at every
    multiple of update_every from learning_starts on."""
    first = max(args.learning_starts, 1)
    return max(0, step // args.update_every - (first - 1) // args.update_every) * args.update_every


def stop_if_nonfinite(metrics: dict, seeds: list[int], updates_before: int, chunk: int, step: int, checkpoint: int,
                      run_dir: Path) -> None:
    """The NaN stop, as in the offline scripts: a non-finite loss (or parameter) in the chunk just run ends the
    run with a UserError naming the metric, the seed and the update (counted over the run), and the checkpoint."""
    what = None
    found = [(int(first[i]), name, i) for name, first in metrics.pop("first_nonfinite").items()
             for i in [int(np.argmin(np.asarray(first)))] if first[i] < NEVER]
    if found:  # the earliest update of any metric and seed
        at, name, i = min(found)
        what = f"non-finite {name} for seed {seeds[i]} at update {updates_before + at + 1} (env step {step})"
    finite = np.asarray(metrics["params_finite"])
    if what is None and not finite.all():
        what = f"non-finite parameters for seed {seeds[int(np.argmin(finite))]} by update {updates_before + chunk} (env step {step})"
    if what is None:
        return
    if checkpoint:
        act = (f"the last checkpoint (env step {checkpoint}) is in {run_dir}, but a resume keeps its settings: start a "
               "new run with other settings (e.g. a lower --critic-lr, a larger --batch-size)")
    else:
        act = ("no checkpoint was written yet. Start again with other settings (e.g. a lower --critic-lr, a larger "
               "--batch-size)")
    raise UserError(f"{what}. Training stopped; {act}.")


# ============================================================================ Run-directory readers
def load_args(run_dir: str | Path) -> Args:
    """The Args a run was started with."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())["args"]
    return Args(**{f.name: saved[f.name] for f in dataclasses.fields(Args) if f.name in saved})


def host_file_of(step: int) -> str:
    """The pickle of the host state (envs, random generators, episode bookkeeping) at a checkpoint."""
    return f"host_{step:09d}.pkl"


def checkpoint_step(run_dir: str | Path) -> int:
    """Env step of the run's last complete checkpoint (0 if none)."""
    path = Path(run_dir) / "checkpoint.json"
    return int(json.loads(path.read_text())["step"]) if path.exists() else 0


def read_evals(run_dir: str | Path, upto: int | None = None) -> dict[str, np.ndarray]:
    """Checkpoint evaluations: steps (C,), returns (C, S, E), lengths (C, S, E), up to the last checkpoint."""
    upto = checkpoint_step(run_dir) if upto is None else upto
    evals = dict(np.load(Path(run_dir) / "evals.npz"))
    keep = evals["steps"] <= upto
    return {k: v[keep] for k, v in evals.items()}


def read_buffer(run_dir: str | Path, upto: int, seed_index: int | None = None) -> dict[str, np.ndarray]:
    """The first `upto` transitions of the saved replay buffer, per seed (S, upto, ...), or for one
    seed (upto, ...) when seed_index is given."""
    parts: dict[str, list] = {}
    covered = 0
    for path in sorted((Path(run_dir) / "buffer").glob("*.npz")):
        start, end = (int(x) for x in path.stem.split("_"))
        if start >= upto:
            continue
        if start != covered:
            raise FileNotFoundError(f"{run_dir}/buffer: segment starting at step {covered} is missing (found {path.name})")
        with np.load(path) as seg:
            for k in seg.files:
                v = seg[k] if seed_index is None else seg[k][seed_index]
                parts.setdefault(k, []).append(v[:, : min(end, upto) - start] if seed_index is None
                                               else v[: min(end, upto) - start])
        covered = end
    if covered < upto:
        raise FileNotFoundError(f"{run_dir}/buffer holds {covered} steps, fewer than the {upto} asked for")
    return {k: np.concatenate(v, axis=1 if seed_index is None else 0) for k, v in parts.items()}


def load_actor(run_dir: str | Path, step: int, seed_index: int = 0) -> Actor:
    """The (unstacked) actor of one seed saved at env step `step`."""
    args = load_args(run_dir)
    env_info = json.loads((Path(run_dir) / "env.json").read_text())
    keys = jax.random.split(jax.random.PRNGKey(0), args.num_seeds)
    like = eqx.filter_vmap(lambda k: Actor(env_info["obs_dim"], env_info["act_dim"], args.hidden_dim, key=k))(keys)
    path = Path(run_dir) / "policies" / f"step_{step:09d}.eqx"
    if not path.exists():
        raise FileNotFoundError(f"no policy saved at step {step} in {run_dir}/policies")
    stacked = eqx.tree_deserialise_leaves(path, like)
    return jax.tree.map(lambda x: x[seed_index] if eqx.is_array(x) else x, stacked)


# ============================================================================ main
def main(args: Args) -> Path:
    run_dir = train(args)
    evals = read_evals(run_dir)
    means = evals["returns"].mean(axis=2)  # (C, S)
    print(f"\nSAC on {args.env}: deterministic return ({evals['returns'].shape[2]} episodes) per checkpoint, mean over seeds")
    for s, m in zip(evals["steps"], means):
        print(f"  step {int(s):>9}: {m.mean():9.1f}   per seed {np.array2string(m, precision=1)}")
    print(f"run directory: {run_dir}")
    return run_dir


if __name__ == "__main__":
    runlog.cli(main, Args)

"""CQL: "Conservative Q-Learning for Offline Reinforcement Learning" (Kumar et al., NeurIPS 2020,
arXiv 2006.04779), CQL(H) on a SAC base, as in Young Geng's JaxCQL (github.com/young-geng/JaxCQL,
`JaxCQL/conservative_sac.py`), on which the official MISA code is built, and CORL's
`algorithms/offline/cql.py` (a port of the same author's PyTorch CQL).

CQL regularises SAC's critic so that Q is pushed down on actions away from the data and up on
the data's own actions:

    critic:  min_Q  TD(Q) + alpha (E_s[log sum_a exp Q(s, a)] - E_D[Q(s, a)])        (CQL(H), Eq. 4)
    actor:   SAC,   min_pi E_s E_{a~pi}[alpha_ent log pi(a|s) - min_i Q_i(s, a)]

The log-sum-exp over a continuous action space is estimated by importance sampling (the paper's
appendix) with K uniform actions, K actions of pi(.|s) and K of pi(.|s') per state s, each exp Q
divided by its proposal density. MISA, Section 4.4, derives CQL as a special case of MISA: the critic
regulariser with a uniform variational distribution in place of pi (in practice the mixture
above), and no mutual-information term in the actor. The two files have the same sections in the
same order and share, word for word, the tanh-Gaussian log-density, `apply_grads`, `polyak`, `sample`,
`act` and `main` (tests/test_cql.py checks it); their networks, defaults and losses are each
method's own, so a diff of the two shows more than the method.

Where each equation lives:  cql_regulariser (the importance-sampled log-sum-exp minus Q(s, a_data))
-> critic_loss (TD + alpha * regulariser; max-target backup) -> actor_loss (SAC; BC phase).

Choices (JaxCQL `ConservativeSAC.get_default_config` unless marked):
- 256-256 ReLU networks for actor and critics, policy lr 3e-4, Q lr 3e-4, Adam without schedule,
  batch 256, discount 0.99, soft target rate 5e-3, automatic entropy tuning (target -|A|), no
  entropy term in the TD target (`backup_entropy=False`), next actions from the current policy;
  CQL(H) with K = 10 (`cql_n_actions`), importance sampling on, temperature 1,
  min_q_weight (alpha) 5.0, Lagrange off, max-target backup off, no clipping of the gap.
- The Lagrange variant (the paper's appendix): alpha = min_q_weight * lambda, with the Lagrange
  multiplier lambda = exp(log_lagrange); log_lagrange starts at 1.0 (JaxCQL, CORL) and takes Adam steps
  (Q lr) on -lambda min_q_weight (gap - target gap), so lambda grows while the regulariser is above its target.
- AntMaze (young-geng/CQL#2, the recipe of JaxCQL's author; CORL uses the same reward): Lagrange
  with target gap 0.2, max-target backup, gap clipped below at -200, reward 10 r - 5, 3 x 256
  networks, policy lr 1e-4, 40 000 updates of behaviour cloning first (`bc_epochs=40`), 100
  evaluation episodes. Not taken from that recipe: orthogonal initialisation and
  `policy_log_std_multiplier=0`. MISA's AntMaze preset uses (r - 0.5) * 4 (the original CQL code's);
  pass --reward-scale 4 --reward-bias -2 to compare the two on the same rewards.
- Ours: the actor's log-std is raw - 1 clipped to [-5, 2] and its mean is clipped to +-9 (misa.py's
  bounds, with misa.py's trainable log-std scale and shift frozen at their start), and the update
  order is misa.py's (critics, then the actor against the updated critics); JaxCQL clips the
  log-std to [-20, 2], learns the log-std scale and offset, and computes all losses from the same
  parameters. Keys are threaded (no global RNG), so seeds vmap.

Usage:
    python algorithms/cql.py                                  # embedded dataset, 5 seeds
    python algorithms/cql.py --env hopper-medium-v2 --num-seeds 5
    python algorithms/cql.py --env antmaze-umaze-v0 --num-seeds 5   # preset: Lagrange, BC phase, 10 r - 5
Variants: --lagrange-gap 5 (CQL-Lagrange), --max-target-backup True, --no-importance-sample, --bc-steps 40000.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

ALGO = "cql"
INF = float("inf")


# ============================================================================ Args
@dataclasses.dataclass
class Args:
    """CQL. One *update* = one gradient step of the critics, the actor and the entropy
    temperature (and the Lagrange multiplier, when on) on one minibatch of `batch_size` transitions."""

    # --- Experiment ---
    env: str = "ours/Hopper-v5/medium"
    """dataset: a D4RL name (hopper-medium-v2), a Minari id (mujoco/hopper/medium-v0), a D4RL-format
    .hdf5 path, or one of this project's generated datasets (ours/Hopper-v5/medium)"""
    dataset_dir: str | None = None
    """folder holding D4RL files (default $D4RL_DATASET_DIR or ~/.d4rl/datasets) or, for ours/..., datasets/"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (off in the official code)"""
    num_seeds: int = 5
    """independent agents trained at once (vmapped); agent i uses seed `seed + i`"""
    seed: int = 0
    """seed of the first agent"""
    num_updates: int = 1_000_000
    """total updates per agent"""
    eval_every: int = 10_000
    """updates between evaluations (and checkpoints); the official code evaluates every 10 epochs of 1000"""
    eval_episodes: int | None = None
    """evaluation episodes per agent, deterministic policy (default: domain preset, 10; AntMaze 100)"""
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
    """where logs, checkpoints and results go (default runs/<algo>__<env>__seed<seed>__<time>)"""
    resume: bool = False
    """continue the interrupted run in --run-dir from its last checkpoint"""
    allow_change: list[str] = dataclasses.field(default_factory=list)
    """with --resume: settings that may differ from the saved run's (e.g. num-updates to extend it, critic-lr
    after a NaN stop); each change is recorded in config.json"""

    # --- Optimisation ---
    batch_size: int = 256
    """transitions per minibatch"""
    actor_lr: float | None = None
    """Adam learning rate of the actor and the entropy temperature (default: domain preset; 3e-4,
    JaxCQL `policy_lr`; AntMaze 1e-4, young-geng/CQL#2; CORL's default is 3e-5)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics and the Lagrange multiplier (JaxCQL `qf_lr`, CORL `qf_lr`)"""
    cosine_schedule: bool = False
    """cosine decay of both learning rates to 0 over --num-updates (JaxCQL, CORL: none)"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    num_layers: int | None = None
    """hidden layers per network (default: domain preset, 2 (JaxCQL 256-256); AntMaze 3 (young-geng/CQL#2
    `qf_arch=256-256-256`; its policy keeps 2))"""

    # --- SAC ---
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature (default -act_dim)"""
    reward_norm: bool | None = None
    """scale the rewards to [-1, 1] by the dataset's own min and max (default: domain preset; on for
    Adroit and Kitchen, as in the official MISA code, so that the two methods see the same data);
    replaces --reward-scale/--reward-bias"""
    reward_scale: float | None = None
    """r' = reward_scale * r + reward_bias without --reward-norm (default: domain preset; AntMaze 10 r - 5);
    giving either one turns the preset's --reward-norm off"""
    reward_bias: float | None = None
    """see reward_scale"""

    # --- CQL ---
    num_samples: int = 10
    """K: actions per state of each kind (uniform, pi(.|s), pi(.|s')) in the log-sum-exp, and next
    actions for the max-target backup (JaxCQL `cql_n_actions`, CORL 10)"""
    min_q_weight: float = 5.0
    """alpha: weight of the CQL(H) regulariser in the critic loss (JaxCQL `cql_min_q_weight`; CORL 10)"""
    temperature: float = 1.0
    """the log-sum-exp is taken of Q / temperature and rescaled (JaxCQL `cql_temp`, CORL 1)"""
    importance_sample: bool = True
    """weight each sampled action by 1 / its proposal density (JaxCQL `cql_importance_sample`, CORL);
    --no-importance-sample: plain log-sum-exp over the 3K sampled actions and the data action"""
    lagrange: bool | None = None
    """CQL-Lagrange: weight the regulariser by min_q_weight * lambda, with a Lagrange multiplier lambda
    adapted so that the regulariser stays near --lagrange-gap (default: domain preset; on for AntMaze,
    young-geng/CQL#2; off elsewhere, JaxCQL `cql_lagrange=False`; giving --lagrange-gap turns it on)"""
    lagrange_gap: float | None = None
    """CQL-Lagrange target action gap (default: domain preset; AntMaze 0.2, JaxCQL `cql_target_action_gap` 1)"""
    clip_diff_min: float | None = None
    """lower clip of each state's gap log-sum-exp - Q(s, a_data) (default: domain preset; AntMaze -200,
    young-geng/CQL#2; else none, JaxCQL `cql_clip_diff_min=-inf`)"""
    clip_diff_max: float = float("inf")
    """upper clip of the same gap (JaxCQL `cql_clip_diff_max=inf`)"""
    max_target_backup: bool | None = None
    """TD target from the best of K next actions, max_k min_i Q'_i(s', a'_k) (default: domain preset;
    AntMaze on, young-geng/CQL#2; off elsewhere, JaxCQL `cql_max_target_backup=False`)"""
    backup_entropy: bool = False
    """subtract alpha log pi(a'|s') in the TD target (JaxCQL `backup_entropy=False`, CORL False)"""
    bc_steps: int | None = None
    """first updates in which the actor does behaviour cloning, alpha log pi(a_new|s) - log pi(a_data|s),
    instead of maximising Q (default: domain preset; AntMaze 40000, young-geng/CQL#2 `bc_epochs=40`;
    0 elsewhere, CORL `bc_steps=0`)"""


# The range of every numeric flag, checked before any work (common.runlog.check: one message, exit 2):
# ">= x", "> x" (finite), "any" (finite), or an interval such as "(0, 1]".
RULES = {
    "num_seeds": ">= 1", "seed": ">= 0", "num_updates": ">= 1", "eval_every": ">= 1", "eval_episodes": ">= 1",
    "log_every": ">= 1", "checkpoint_every": ">= 1",
    "batch_size": ">= 1", "actor_lr": "> 0", "critic_lr": "> 0", "hidden_dim": ">= 1",
    "num_layers": ">= 1", "discount": "[0, 1]", "tau": "(0, 1]", "target_entropy": "any", "reward_scale": "any",
    "reward_bias": "any", "num_samples": ">= 1", "min_q_weight": ">= 0", "temperature": "> 0",
    "lagrange_gap": "> 0", "clip_diff_min": "[-inf, inf]", "clip_diff_max": "[-inf, inf]", "bc_steps": ">= 0",
}


NEVER = jnp.iinfo(jnp.int32).max  # first non-finite step of a metric that stayed finite


# ============================================================================ Networks
# ReLU after every hidden layer of actor and critics (JaxCQL `FullyConnectedNetwork`; misa.py: ELU, MISA paper)
def mlp(in_dim: int, out_dim: int | str, args: Args, key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(in_dim, out_dim, args.hidden_dim, depth=args.num_layers, activation=jax.nn.relu, key=key)


class Actor(eqx.Module):
    """Tanh-Gaussian policy on one (unbatched) observation: u ~ N(mu(s), sigma(s)^2), a = tanh(u)."""

    net: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, args: Args, *, key: jax.Array):
        self.net = mlp(obs_dim, 2 * act_dim, args, key)

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mu, log_std) of the pre-tanh Gaussian."""
        mu, raw = jnp.split(self.net(obs), 2)
        # -1: JaxCQL's policy_log_std_offset, so a fresh policy starts at sigma ~ e^-1 rather than 1
        return jnp.clip(mu, -9.0, 9.0), jnp.clip(raw - 1.0, -5.0, 2.0)


def gaussian_log_prob(u: jax.Array, mu: jax.Array, log_std: jax.Array) -> jax.Array:
    return jnp.sum(-0.5 * ((u - mu) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def tanh_log_det(u: jax.Array) -> jax.Array:
    """sum log |d tanh(u) / du| = sum log(1 - tanh(u)^2), computed stably."""
    return jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)


def tanh_gaussian_log_prob(u: jax.Array, mu: jax.Array, log_std: jax.Array) -> jax.Array:
    """log pi(a|s) at a = tanh(u)."""
    return gaussian_log_prob(u, mu, log_std) - tanh_log_det(u)


def policy_actions(mu: jax.Array, log_std: jax.Array, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n reparameterised samples for one state: actions (n, A) and their log pi (n,)."""
    u = mu[None] + jnp.exp(log_std)[None] * jax.random.normal(key, (n,) + mu.shape)
    return jnp.tanh(u), jax.vmap(tanh_gaussian_log_prob, in_axes=(0, None, None))(u, mu, log_std)


class Critic(eqx.Module):
    """Twin Q networks, stored as one MLP with a leading axis of 2. (s, a) -> (Q_1, Q_2)."""

    nets: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, args: Args, *, key: jax.Array):
        self.nets = eqx.filter_vmap(lambda k: mlp(obs_dim + act_dim, "scalar", args, k))(jax.random.split(key, 2))

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
    critic_target: Critic
    log_alpha: jax.Array  # SAC entropy temperature
    log_lagrange: jax.Array  # log of the Lagrange multiplier lambda on min_q_weight (used with --lagrange)
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    lagrange_opt: optax.OptState
    step: jax.Array  # updates done, for the behaviour-cloning phase


class Optimisers(NamedTuple):  # closed over by the update, never stored in the state
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    alpha: optax.GradientTransformation
    lagrange: optax.GradientTransformation


# ============================================================================ CQL objective
def cql_regulariser(q_rand: jax.Array, q_curr: jax.Array, q_next: jax.Array, q_data: jax.Array,
                    log_pi_curr: jax.Array, log_pi_next: jax.Array, act_dim: int, temperature: float,
                    importance_sample: bool, clip_min: float = -INF, clip_max: float = INF) -> jax.Array:
    """CQL(H) of one critic: E_s[clip(t log sum_j exp(c_j / t) - Q(s, a_data), clip_min, clip_max)].

    q_rand (B, K): Q(s_b, a), a ~ U(-1, 1)^A;  q_curr (B, K): Q(s_b, a), a ~ pi(.|s_b), log pi = log_pi_curr;
    q_next (B, K): Q(s_b, a), a ~ pi(.|s'_b) (next-state actions, evaluated at s_b), log pi = log_pi_next;
    q_data (B,): Q(s_b, a_b), (s_b, a_b) ~ D.
    importance_sample: c = [q_rand - log 0.5^A, q_next - log_pi_next, q_curr - log_pi_curr] (3K terms,
    each exp Q divided by its proposal density); otherwise c = [q_rand, q_data, q_next, q_curr] (3K + 1).
    No log(3K) is subtracted (JaxCQL): a constant, same gradients, but it sets the scale of a Lagrange gap.
    """
    t = temperature
    if importance_sample:
        c = jnp.concatenate([q_rand - act_dim * jnp.log(0.5), q_next - log_pi_next, q_curr - log_pi_curr], axis=1)
    else:
        c = jnp.concatenate([q_rand, q_data[:, None], q_next, q_curr], axis=1)
    log_z = t * jax.nn.logsumexp(c / t, axis=1)  # (B,)
    return jnp.clip(log_z - q_data, clip_min, clip_max).mean()


def critic_loss(critic: Critic, batch: Transitions, actor: Actor, critic_target: Critic, cql_weight: jax.Array,
                alpha: jax.Array, key: jax.Array, args: Args) -> tuple[jax.Array, dict]:
    """TD error + cql_weight * CQL(H) for each of the two critics (CQL Eq. 4, importance-sampled)."""
    next_key, rand_key, curr_key, cql_next_key = jax.random.split(key, 4)
    B, K, A = batch.obs.shape[0], args.num_samples, batch.action.shape[1]
    next_mu, next_log_std = jax.vmap(actor)(batch.next_obs)
    n_next = K if args.max_target_backup else 1  # max-target backup: the best of K next actions
    next_action, next_log_pi = jax.vmap(lambda m, s, k: policy_actions(m, s, k, n_next))(
        next_mu, next_log_std, jax.random.split(next_key, B))
    next_q = jax.vmap(jax.vmap(critic_target, in_axes=(None, 0)))(batch.next_obs, next_action).min(axis=-1)  # (B, n)
    best = jnp.argmax(next_q, axis=1)[:, None]
    next_q, next_log_pi = jnp.take_along_axis(next_q, best, 1)[:, 0], jnp.take_along_axis(next_log_pi, best, 1)[:, 0]
    if args.backup_entropy:
        next_q = next_q - alpha * next_log_pi
    target = jax.lax.stop_gradient(batch.reward + args.discount * (1.0 - batch.done) * next_q)
    q_data = jax.vmap(critic)(batch.obs, batch.action)  # (B, 2)
    td = ((q_data - target[:, None]) ** 2).mean(axis=0).sum()

    # K uniform actions, K of pi(.|s) and K of pi(.|s') per state (constants for the critic), Q at s of each
    rand_actions = jax.random.uniform(rand_key, (B, K, A), minval=-1.0, maxval=1.0)
    mu, log_std = jax.lax.stop_gradient(jax.vmap(actor)(batch.obs))
    curr_actions, log_pi_curr = jax.vmap(lambda m, s, k: policy_actions(m, s, k, K))(
        mu, log_std, jax.random.split(curr_key, B))
    next_mu, next_log_std = jax.lax.stop_gradient((next_mu, next_log_std))
    cql_next_actions, log_pi_next = jax.vmap(lambda m, s, k: policy_actions(m, s, k, K))(
        next_mu, next_log_std, jax.random.split(cql_next_key, B))
    actions = jnp.concatenate([rand_actions, curr_actions, cql_next_actions], axis=1)  # (B, 3K, A)
    q_samples = jax.vmap(jax.vmap(critic, in_axes=(None, 0)))(batch.obs, actions)  # (B, 3K, 2)
    q_rand, q_curr, q_next = q_samples[:, :K], q_samples[:, K:2 * K], q_samples[:, 2 * K:]
    regs = jnp.stack([cql_regulariser(q_rand[..., i], q_curr[..., i], q_next[..., i], q_data[:, i], log_pi_curr,
                                      log_pi_next, A, args.temperature, args.importance_sample, args.clip_diff_min,
                                      args.clip_diff_max) for i in range(2)])
    loss = td + cql_weight * regs.sum()
    return loss, {"critic_loss": loss, "td_loss": td, "cql_regulariser": regs.mean(), "q_data": q_data.mean(),
                  "q_target": target.mean(), "q_policy": q_curr.mean(), "q_random": q_rand.mean()}


def actor_loss(actor: Actor, batch: Transitions, critic: Critic, alpha: jax.Array, bc_phase: jax.Array,
               key: jax.Array, args: Args) -> tuple[jax.Array, tuple[dict, dict]]:
    """SAC's actor loss (minimised), E[alpha log pi(a_new|s) - min_i Q_i(s, a_new)]; while bc_phase, the
    Q term is replaced by the data's log-likelihood log pi(a_data|s) (behaviour cloning, CORL `bc_steps`)."""
    mu, log_std = jax.vmap(actor)(batch.obs)
    new_action, log_pi = jax.vmap(lambda m, s, k: policy_actions(m, s, k, 1))(mu, log_std, jax.random.split(key, mu.shape[0]))
    new_action, log_pi = new_action[:, 0], log_pi[:, 0]
    q_new = jax.vmap(critic)(batch.obs, new_action).min(axis=-1)
    u_data = jnp.arctanh(jnp.clip(batch.action, -0.999, 0.999))
    log_pi_data = jax.vmap(tanh_gaussian_log_prob)(u_data, mu, log_std)
    loss = alpha * log_pi.mean() - jnp.where(bc_phase, log_pi_data.mean(), q_new.mean())
    metrics = {"actor_loss": loss, "log_pi_data": log_pi_data.mean(), "entropy": -log_pi.mean()}
    return loss, (metrics, {"log_pi": log_pi})  # (logged, used by the update)


# ============================================================================ Update
def apply_grads(opt: optax.GradientTransformation, model, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state


def polyak(target, online, tau: float):
    """target <- (1 - tau) target + tau online, on the arrays only."""
    return jax.tree.map(lambda t, o: (1 - tau) * t + tau * o if eqx.is_inexact_array(t) else t, target, online)


def draw_minibatch(dataset: Transitions, key: jax.Array, batch_size: int) -> Transitions:
    idx = jax.random.randint(key, (batch_size,), 0, dataset.obs.shape[0])
    return jax.tree.map(lambda x: x[idx], dataset)


def update(state: AgentState, dataset: Transitions, key: jax.Array, args: Args,
           opt: Optimisers) -> tuple[AgentState, dict]:
    """One CQL update: critics (TD + CQL(H)), the Lagrange multiplier, actor (SAC or BC), temperature, targets."""
    batch_key, critic_key, actor_key = jax.random.split(key, 3)
    batch = draw_minibatch(dataset, batch_key, args.batch_size)
    lagrange = args.lagrange
    cql_weight = args.min_q_weight * (jnp.clip(jnp.exp(state.log_lagrange), 0.0, 1e6) if lagrange else 1.0)
    alpha = jnp.exp(state.log_alpha)

    # critics
    (_, c_metrics), grads = eqx.filter_value_and_grad(critic_loss, has_aux=True)(
        state.critic, batch, state.actor, state.critic_target, cql_weight, alpha, critic_key, args)
    critic, critic_opt = apply_grads(opt.critic, state.critic, state.critic_opt, grads)

    # Lagrange multiplier: grows while the regulariser exceeds the target gap, shrinks below it
    log_lagrange, lagrange_opt = state.log_lagrange, state.lagrange_opt
    if lagrange:
        gap = jax.lax.stop_gradient(c_metrics["cql_regulariser"]) - args.lagrange_gap
        lagrange_grad = jax.grad(lambda lg: -jnp.exp(lg) * args.min_q_weight * gap)(state.log_lagrange)
        log_lagrange, lagrange_opt = apply_grads(opt.lagrange, log_lagrange, lagrange_opt, lagrange_grad)

    # actor (behaviour cloning during the first bc_steps updates), then the entropy temperature
    (_, (a_metrics, a_extras)), grads = eqx.filter_value_and_grad(actor_loss, has_aux=True)(
        state.actor, batch, critic, alpha, state.step < args.bc_steps, actor_key, args)
    actor, actor_opt = apply_grads(opt.actor, state.actor, state.actor_opt, grads)
    log_pi = jax.lax.stop_gradient(a_extras["log_pi"])
    target_entropy = -batch.action.shape[1] if args.target_entropy is None else args.target_entropy
    a_grad = jax.grad(lambda la: -(la * (log_pi + target_entropy)).mean())(state.log_alpha)
    log_alpha, alpha_opt = apply_grads(opt.alpha, state.log_alpha, state.alpha_opt, a_grad)

    state = AgentState(actor=actor, critic=critic, critic_target=polyak(state.critic_target, critic, args.tau),
                       log_alpha=log_alpha, log_lagrange=log_lagrange, actor_opt=actor_opt, critic_opt=critic_opt,
                       alpha_opt=alpha_opt, lagrange_opt=lagrange_opt, step=state.step + 1)
    return state, {**c_metrics, **a_metrics, "alpha": alpha, "cql_weight": cql_weight}


# ============================================================================ make_train
def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns the compiled, seed-vmapped `init(keys)` and `train_chunk(dataset, state, keys, num_updates)`.

    train_chunk runs `num_updates` updates per agent in a loop. The count is traced, so one
    compiled program serves every chunk length; the dataset is an argument shared by all seeds
    (in_axes None), never closed over, so it is not baked into the program. It returns each training
    metric's mean over the chunk and the first loop step at which it was not finite (NEVER if none),
    so that a NaN is reported at its update without keeping every step's values.

    Settings left at None (the per-domain ones) take the locomotion preset, so `make_train(Args(), ...)`
    works as it is; for another domain pass `resolve_args(args, domain, rewards)` (`PRESETS`)."""
    if any(getattr(args, k) is None for k in PRESETS["locomotion"]):
        args = resolve_args(args, "locomotion")
    lr = lambda base: optax.cosine_decay_schedule(base, args.num_updates) if args.cosine_schedule else base
    opt = Optimisers(actor=optax.adam(lr(args.actor_lr)), critic=optax.adam(lr(args.critic_lr)),
                     alpha=optax.adam(args.actor_lr), lagrange=optax.adam(args.critic_lr))

    def init(key: jax.Array) -> AgentState:
        actor_key, critic_key = jax.random.split(key)
        actor = Actor(obs_dim, act_dim, args, key=actor_key)
        critic = Critic(obs_dim, act_dim, args, key=critic_key)
        zero, one = jnp.zeros(()), jnp.ones(())  # log lambda starts at 1 (JaxCQL, CORL)
        return AgentState(actor, critic, critic, zero, one,
                          opt.actor.init(eqx.filter(actor, eqx.is_inexact_array)),
                          opt.critic.init(eqx.filter(critic, eqx.is_inexact_array)),
                          opt.alpha.init(zero), opt.lagrange.init(one), jnp.zeros((), jnp.int32))

    def train_chunk(dataset: Transitions, state: AgentState, key: jax.Array, num_updates: jax.Array):
        arrays, static = eqx.partition(state, eqx.is_array)  # the loop carries arrays only
        _, shapes = eqx.filter_eval_shape(update, state, dataset, key, args, opt)
        sums = jax.tree.map(lambda s: jnp.zeros(jnp.shape(s), getattr(s, "dtype", jnp.float32)), shapes)  # (some are floats)
        first = jax.tree.map(lambda s: jnp.int32(NEVER), shapes)

        def step(i, carry):
            arrays, key, sums, first = carry
            key, sub = jax.random.split(key)
            state, metrics = update(eqx.combine(arrays, static), dataset, sub, args, opt)
            first = jax.tree.map(lambda f, m: jnp.where((f == NEVER) & ~jnp.isfinite(m), i, f), first, metrics)
            return eqx.filter(state, eqx.is_array), key, jax.tree.map(jnp.add, sums, metrics), first

        arrays, key, sums, first = jax.lax.fori_loop(0, num_updates, step, (arrays, key, sums, first))
        state = eqx.combine(arrays, static)
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
        return state, key, {"mean": jax.tree.map(lambda x: x / num_updates, sums), "first_nonfinite": first,
                            "params_finite": finite}

    init_v = eqx.filter_jit(eqx.filter_vmap(init))
    # no buffer donation: a chunk's state is a few MB, copied once per chunk; the count is shared (in_axes None)
    train_v = eqx.filter_jit(eqx.filter_vmap(train_chunk, in_axes=(None, eqx.if_array(0), eqx.if_array(0), None)))
    return init_v, train_v


@eqx.filter_jit
def act(actors: Actor, obs: jax.Array, obs_mean: jax.Array, obs_std: jax.Array) -> jax.Array:
    """Deterministic actions tanh(mu(s)) of stacked actors (S,) for observations (S, E, obs_dim)."""
    mean_action = lambda actor, o: jnp.tanh(actor((o - obs_mean) / obs_std)[0])
    return eqx.filter_vmap(lambda actor, o: jax.vmap(mean_action, in_axes=(None, 0))(actor, o))(actors, obs)


# ============================================================================ main
# Per-domain settings that differ from the defaults above. Locomotion: JaxCQL defaults. AntMaze:
# young-geng/CQL#2. Adroit, Kitchen: no JaxCQL/CORL recipe was found; Lagrange off and the rewards
# scaled to [-1, 1] as in the official MISA code, so that the two methods see the same data.
_PLAIN = dict(num_layers=2, actor_lr=3e-4, lagrange=False, lagrange_gap=1.0, clip_diff_min=-INF,
              max_target_backup=False, bc_steps=0, reward_norm=False, reward_scale=1.0, reward_bias=0.0,
              eval_episodes=10)
PRESETS = {
    "locomotion": _PLAIN,
    "antmaze": {**_PLAIN, **dict(num_layers=3, actor_lr=1e-4, lagrange=True, lagrange_gap=0.2, clip_diff_min=-200.0,
                                 max_target_backup=True, bc_steps=40_000, reward_scale=10.0, reward_bias=-5.0,
                                 eval_episodes=100)},
    "adroit": {**_PLAIN, "reward_norm": True},
    "kitchen": {**_PLAIN, "reward_norm": True},
}


def resolve_args(args: Args, domain: str, rewards: np.ndarray | None = None) -> Args:
    """The effective config: every field left at None comes from the preset of the dataset's domain
    (`EnvSpec.domain`). With reward_norm, `rewards` (the dataset's) set reward_scale and reward_bias."""
    preset = dict(PRESETS[domain])
    if args.reward_scale is not None or args.reward_bias is not None:
        preset["reward_norm"] = False  # an explicit affine transform replaces the preset's scaling
    if args.lagrange_gap is not None:
        preset["lagrange"] = True  # a budget asks for the multiplier
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    if args.reward_norm:
        if rewards is None:
            raise ValueError("reward_norm needs the dataset's rewards")
        lo, hi = float(rewards.min()), float(rewards.max())
        if not hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)):  # no range to scale by: refused, not divided by ~0
            raise ValueError(f"--reward-norm scales the rewards to [-1, 1] by their range (max - min), and every reward of "
                             f"this dataset is {lo:g}: give the transform yourself, e.g. --reward-scale 1 --reward-bias 0 "
                             "keeps the rewards as they are")
        scale = 2.0 / (hi - lo)
        args = dataclasses.replace(args, reward_scale=scale, reward_bias=-1.0 - lo * scale)
    return args


def activation_bytes(args: Args) -> int:
    """One seed's minibatch activations, roughly, for the memory check before a run (common.runlog.check_memory):
    one minibatch's hidden layers, float32, for the 3K + 2 actions per state of the regulariser and the
    target through the twin critic, forward only (a lower bound: the backward pass keeps more)."""
    return 4 * args.batch_size * (3 * args.num_samples + 2) * args.hidden_dim * args.num_layers * 2


def check_args(args: Args) -> list[str]:
    """What is wrong with this script's own combinations of settings (each setting's range is in RULES)."""
    problems = []
    if args.reward_norm and (args.reward_scale is not None or args.reward_bias is not None):
        problems.append("--reward-norm sets the reward scale and bias itself: "
                        "drop --reward-scale/--reward-bias, or --reward-norm")
    return problems


def main(args: Args) -> dict:
    from common import data, evaluation, runlog, sharding  # the runner's plumbing; nothing above needs it
    from common.errors import UserError

    runlog.check(args, RULES, check_args(args))

    # --- data: the domain's reward transform, visibly here; observation normalisation is optional
    # (off in the official code); statistics are constants, outside every Module
    raw, spec = data.load(args.env, args.dataset_dir)
    try:
        args = resolve_args(args, spec.domain, raw.reward)
    except ValueError as e:  # rewards that --reward-norm cannot scale (all equal)
        raise UserError(str(e)) from None
    if args.normalize_obs:
        obs_mean, obs_std = raw.obs.mean(0), raw.obs.std(0) + 1e-3
    else:
        obs_mean, obs_std = np.zeros(spec.obs_dim, np.float32), np.ones(spec.obs_dim, np.float32)
    dataset = Transitions(
        obs=jnp.asarray((raw.obs - obs_mean) / obs_std), action=jnp.asarray(raw.action),
        reward=jnp.asarray(args.reward_scale * raw.reward + args.reward_bias, jnp.float32),
        next_obs=jnp.asarray((raw.next_obs - obs_mean) / obs_std), done=jnp.asarray(raw.done))
    run = runlog.Run(ALGO, args, spec, data.fingerprint(raw),
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

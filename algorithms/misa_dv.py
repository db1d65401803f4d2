"""MISA-DV: MISA with the Donsker-Varadhan bound (Ma et al., NeurIPS 2023, arXiv 2210.07484, Sec. 4.2).

Identical to algorithms/misa.py except for the bound (`mi_bound`): the log-partition is taken
once over the whole batch instead of once per state,

    I_MISA-DV = E_D[log pi(a|s)] + E_D[Q(s, a)] - log E_{s~D, a~pi(.|s)} exp Q(s, a)   (+ const)

which is looser than MISA's (Theorem 4.1: I_MISA >= I_MISA-DV, by Jensen). Its actor gradient is
    grad log E_{s,a} exp Q = sum_b w_b E_{a~p(.|s_b)}[grad log pi(a|s_b)],  w = softmax_b(log E_pi exp Q(s_b, .)),
so the HMC correction of each state is weighted by how large its partition function is.
`diff algorithms/misa.py algorithms/misa_dv.py` shows exactly this change.

Where each equation lives:  mi_bound (the bound, the only section that differs in misa_dv.py and
misa_f.py) -> critic_loss (Eq. 12) -> sample_improved_actions (HMC for p) -> actor_loss (Eq. 13 + 15).

Choices (paper where explicit, official code where the paper is silent):
- Paper: ELU after every hidden layer (actor and critics; the official actor uses ReLU), 256-256
  (3 x 256 for AntMaze), Adam with a cosine schedule, learning rate 1e-4 for actor and critics
  (official: 1e-4 / 3e-4 without schedule), K = 50 samples, HMC with 5 burn-in and 2 leapfrog
  steps and step size 1, Lagrange budget tau = 10 (AntMaze), 3 (Adroit, Kitchen), off for
  locomotion, AntMaze reward (r - 0.5) * 4, 10 evaluation episodes (AntMaze 100).
- Official code: gamma_1 = min_q_weight = 5, temperature 1; the log-mean-exp runs over the K
  current-policy actions only; actor loss
      bc_weight (alpha log pi(a_new|s) - log pi(a_data|s)) - min_i Q_i(s, a_new) + unbiased_weight log pi(a_mcmc|s)
  with bc_weight 0.5 and unbiased_weight 0.1 (so the two halves of Eq. 15 are weighted differently);
  automatic entropy tuning (target -|A|); no entropy term in the TD target; next actions sampled
  from the current policy; policy log-std = raw - 1 clipped to [-5, 2]; dataset actions clipped
  to +-0.999 before their log-probability; K samples of *one* chain per state.
- Ours: the log-mean-exp subtracts log K (the official code subtracts log(batch size): a constant,
  same gradients, different logged values). Keys are threaded (no global RNG), so seeds vmap.
- HMC runs in the pre-tanh space u (a = tanh u). There the target is N(u; mu, sigma) exp Q(s, tanh u):
  the tanh Jacobian of pi and of p cancel, so the density is exact and a proposal can never leave
  (-1, 1) (the official code samples a directly, where log pi is undefined outside (-1, 1)).
  The mass matrix is the policy's own covariance (inverse mass = sigma(s)^2), so "step size 1"
  means one policy standard deviation. `--hmc-chains parallel` runs K independent chains per state
  (burn-in, then one sample each) instead of one chain giving K successive samples.

Usage:
    python algorithms/misa_dv.py                                  # embedded dataset, 5 seeds
    python algorithms/misa_dv.py --env hopper-medium-v2 --num-seeds 5
    python algorithms/misa_dv.py --env antmaze-umaze-v0 --num-seeds 5   # preset: tau 10, 3x256, reward (r-0.5)*4
Ablations (paper Table 2): --num-samples 5|20, --hmc-burnin 1, --no-unbiased (MISA-biased),
--ba-only (BA: no Q regulariser), --no-ba; misa_dv.py and misa_f.py for the looser bounds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal, NamedTuple


import blackjax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from common import data, evaluation, sharding
from common import logging as runlog

ALGO = "misa_dv"


# ============================================================================ Args
@dataclasses.dataclass
class Args:
    """MISA. One *update* = one gradient step of the critics, the actor and the entropy
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
    """updates per compiled chunk; training metrics are averaged and logged once per chunk"""

    # --- Logging ---
    track: bool = False
    """log to Weights & Biases (mode from $WANDB_MODE, e.g. offline); off by default"""
    wandb_project: str = "misa-jax"
    """wandb project name"""
    run_dir: str | None = None
    """where logs, checkpoints and results go (default runs/<algo>__<env>__seed<seed>__<time>)"""
    resume: bool = False
    """continue the interrupted run in --run-dir from its last checkpoint"""

    # --- Optimisation ---
    batch_size: int = 256
    """transitions per minibatch"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor (paper; official code 1e-4)"""
    critic_lr: float = 1e-4
    """Adam learning rate of the critics (paper; official code 3e-4)"""
    cosine_schedule: bool = True
    """cosine decay of both learning rates to 0 over --num-updates (paper; official code: none)"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    num_layers: int | None = None
    """hidden layers per network (default: domain preset, 2; AntMaze 3)"""

    # --- SAC ---
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature (default -act_dim)"""
    reward_scale: float | None = None
    """r' = reward_scale * r + reward_bias (default: domain preset; AntMaze (r - 0.5) * 4)"""
    reward_bias: float | None = None
    """see reward_scale"""

    # --- MISA ---
    num_samples: int = 50
    """K: policy samples per state for log E_pi exp Q, and HMC samples per state for Eq. 15"""
    min_q_weight: float = 5.0
    """gamma_1: weight of the MI regulariser in the critic loss (official code)"""
    temperature: float = 1.0
    """the bound is applied to Q / temperature and rescaled (official code: 1)"""
    lagrange_tau: float | None = None
    """Lagrange budget tau: adapt gamma_1 so the regulariser stays near tau (default: domain preset;
    AntMaze 10, Adroit/Kitchen 3, locomotion off); a negative value turns it off"""
    bc_weight: float = 0.5
    """gamma_2 on the actor's E_D[log pi(a|s)] (and entropy) term (official code)"""
    unbiased: bool = True
    """use the unbiased gradient of Eq. 15 (HMC samples); --no-unbiased gives MISA-biased"""
    unbiased_weight: float = 0.1
    """weight of the HMC correction term E_p[log pi(a|s)] (official code)"""
    ba_only: bool = False
    """ablation BA: the Barber-Agakov bound only (no Q regulariser, no correction term)"""
    no_ba: bool = False
    """ablation no-BA: drop the E_D[log pi(a|s)] term of the actor"""
    hmc_burnin: int = 5
    """HMC burn-in steps per chain"""
    hmc_leapfrog: int = 2
    """leapfrog steps per HMC step"""
    hmc_step_size: float = 1.0
    """leapfrog step size, in units of the policy's standard deviation"""
    hmc_chains: Literal["sequential", "parallel"] = "sequential"
    """sequential: one chain per state gives K successive samples (official); parallel: K chains per state"""


# Per-domain settings that differ from the defaults above (paper, Section 5 and Appendix; official code).
PRESETS = {
    "locomotion": dict(num_layers=2, lagrange_tau=-1.0, reward_scale=1.0, reward_bias=0.0, eval_episodes=10),
    "antmaze": dict(num_layers=3, lagrange_tau=10.0, reward_scale=4.0, reward_bias=-2.0, eval_episodes=100),
    "adroit": dict(num_layers=2, lagrange_tau=3.0, reward_scale=None, reward_bias=None, eval_episodes=10),
    "kitchen": dict(num_layers=2, lagrange_tau=3.0, reward_scale=None, reward_bias=None, eval_episodes=10),
}


def domain_of(env: str, eval_env_id: str | None = None) -> str:
    """Benchmark domain of a dataset, from its name or, for local files, its evaluation env id
    (D4RL names, Minari ids such as D4RL/door/human-v2, gymnasium ids such as AdroitHandDoor-v1)."""
    text = f"{env} {eval_env_id or ''}".lower()
    for domain, pattern in {"antmaze": r"antmaze", "adroit": r"\b(pen|door|hammer|relocate)\b|adroithand",
                            "kitchen": r"kitchen"}.items():
        if re.search(pattern, text):
            return domain
    return "locomotion"


def resolve_args(args: Args, rewards: np.ndarray | None = None, eval_env_id: str | None = None) -> Args:
    """Fill every field left at None from the domain preset; returns the effective config.
    Adroit and Kitchen rewards are scaled to [-1, 1] by the dataset's own range (official code)."""
    preset = dict(PRESETS[domain_of(args.env, eval_env_id)])
    if preset["reward_scale"] is None:
        lo, hi = (float(rewards.min()), float(rewards.max())) if rewards is not None else (0.0, 1.0)
        preset["reward_scale"] = 2.0 / max(hi - lo, 1e-8)
        preset["reward_bias"] = -1.0 - lo * preset["reward_scale"]
    return dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


def check_args(args: Args) -> None:
    problems = []
    if args.num_seeds < 1:
        problems.append("--num-seeds must be >= 1")
    if args.eval_every % args.log_every:
        problems.append(f"--eval-every ({args.eval_every}) must be a multiple of --log-every ({args.log_every})")
    if args.num_updates % args.log_every:
        problems.append(f"--num-updates ({args.num_updates}) must be a multiple of --log-every ({args.log_every})")
    if args.resume and args.run_dir is None:
        problems.append("--resume needs --run-dir pointing at the interrupted run")
    if args.num_samples < 1 or args.hmc_leapfrog < 1 or args.hmc_burnin < 0:
        problems.append("--num-samples and --hmc-leapfrog must be >= 1 and --hmc-burnin >= 0")
    if args.ba_only and args.no_ba:
        problems.append("--ba-only and --no-ba exclude each other")
    if problems:
        raise SystemExit("invalid arguments:\n  " + "\n  ".join(problems))


# ============================================================================ Networks
def mlp(in_dim: int, out_dim: int | str, args: Args, key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(in_dim, out_dim, args.hidden_dim, depth=args.num_layers, activation=jax.nn.elu, key=key)


class Actor(eqx.Module):
    """Tanh-Gaussian policy on one (unbatched) observation: u ~ N(mu(s), sigma(s)^2), a = tanh(u)."""

    net: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, args: Args, *, key: jax.Array):
        self.net = mlp(obs_dim, 2 * act_dim, args, key)

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mu, log_std) of the pre-tanh Gaussian."""
        mu, raw = jnp.split(self.net(obs), 2)
        return jnp.clip(mu, -9.0, 9.0), jnp.clip(raw - 1.0, -5.0, 2.0)


def gaussian_log_prob(u: jax.Array, mu: jax.Array, log_std: jax.Array) -> jax.Array:
    return jnp.sum(-0.5 * ((u - mu) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def tanh_log_det(u: jax.Array) -> jax.Array:
    """sum log |d tanh(u) / du| = sum log(1 - tanh(u)^2), computed stably."""
    return jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)


def log_prob_u(mu: jax.Array, log_std: jax.Array, u: jax.Array) -> jax.Array:
    """log pi(a|s) at a = tanh(u)."""
    return gaussian_log_prob(u, mu, log_std) - tanh_log_det(u)


def sample_actions(mu: jax.Array, log_std: jax.Array, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n reparameterised samples for one state: actions (n, A) and their log pi (n,)."""
    u = mu[None] + jnp.exp(log_std)[None] * jax.random.normal(key, (n,) + mu.shape)
    return jnp.tanh(u), jax.vmap(log_prob_u, in_axes=(None, None, 0))(mu, log_std, u)


class Critic(eqx.Module):
    """Twin Q networks, stored as one MLP with a leading axis of 2. (s, a) -> (Q_1, Q_2)."""

    nets: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, args: Args, *, key: jax.Array):
        self.nets = eqx.filter_vmap(lambda k: mlp(obs_dim + act_dim, "scalar", args, k))(jax.random.split(key, 2))

    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action])
        return eqx.filter_vmap(lambda net: net(x))(self.nets)


# ============================================================================ Agent state
class AgentState(eqx.Module):
    """Everything one agent carries between updates. A pytree of arrays: vmappable, serialisable."""

    actor: Actor
    critic: Critic
    critic_target: Critic
    log_alpha: jax.Array  # SAC entropy temperature
    log_gamma: jax.Array  # Lagrange multiplier on gamma_1 (used when lagrange_tau > 0)
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    gamma_opt: optax.OptState


class Optimisers(NamedTuple):  # closed over by the update, never stored in the state
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    alpha: optax.GradientTransformation
    gamma: optax.GradientTransformation


# ============================================================================ MISA objective
def mi_bound(q_samples: jax.Array, q_data: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """The Q-dependent part of I_MISA-DV and the weights of its policy-gradient estimator.

    q_samples (B, K): Q(s_b, a_bk), a_bk ~ pi(.|s_b);  q_data (B,): Q(s_b, a_b), (s_b, a_b) ~ D.
    Returns
      regulariser = log E_{s,a~pi} exp Q - E_D[Q]   (DV: one normaliser over the whole batch), and
      weights (B,): grad log E_{s,a~pi} exp Q = sum_b weights_b E_{a~p(.|s_b)}[grad log pi(a|s_b)];
      for MISA-DV, weights_b = temperature * softmax_b(log E_pi exp(Q(s_b, .) / temperature)).
    """
    t = temperature
    log_z = t * (jax.nn.logsumexp(q_samples / t) - jnp.log(q_samples.size))  # t log E_{s,a} exp(Q/t), scalar
    log_z_state = jax.nn.logsumexp(q_samples / t, axis=1) - jnp.log(q_samples.shape[1])  # (B,)
    weights = t * jax.nn.softmax(log_z_state)
    return log_z - q_data.mean(), weights


def critic_loss(critic: Critic, batch: data.Transitions, actor: Actor, critic_target: Critic, gamma_1: jax.Array,
                key: jax.Array, args: Args) -> tuple[jax.Array, dict]:
    """Eq. 12: TD error + gamma_1 * (E_s[log E_pi exp Q] - E_D[Q]) for each of the two critics."""
    next_key, sample_key = jax.random.split(key)
    B, K = batch.obs.shape[0], args.num_samples
    next_mu, next_log_std = jax.vmap(actor)(batch.next_obs)
    next_action = jax.vmap(lambda m, s, k: sample_actions(m, s, k, 1)[0][0])(next_mu, next_log_std, jax.random.split(next_key, B))
    next_q = jax.vmap(critic_target)(batch.next_obs, next_action).min(axis=-1)
    target = jax.lax.stop_gradient(batch.reward + args.discount * (1.0 - batch.done) * next_q)
    q_data = jax.vmap(critic)(batch.obs, batch.action)  # (B, 2)
    td = ((q_data - target[:, None]) ** 2).mean(axis=0).sum()

    # K policy actions per state (constants for the critic), Q of both critics at each
    mu, log_std = jax.lax.stop_gradient(jax.vmap(actor)(batch.obs))
    actions, _ = jax.vmap(lambda m, s, k: sample_actions(m, s, k, K))(mu, log_std, jax.random.split(sample_key, B))
    q_samples = jax.vmap(jax.vmap(critic, in_axes=(None, 0)))(batch.obs, actions)  # (B, K, 2)
    regs = jnp.stack([mi_bound(q_samples[..., i], q_data[:, i], args.temperature)[0] for i in range(2)])
    loss = td + gamma_1 * regs.sum()
    return loss, {"critic_loss": loss, "td_loss": td, "mi_regulariser": regs.mean(), "q_data": q_data.mean(),
                  "q_policy": q_samples.mean(), "q_samples_min": q_samples.min(axis=-1)}


def sample_improved_actions(actor: Actor, critic: Critic, obs: jax.Array, action: jax.Array, key: jax.Array,
                            args: Args) -> tuple[jax.Array, jax.Array]:
    """K samples u of p(u|s) ∝ N(u; mu(s), sigma(s)) exp(min_i Q_i(s, tanh u) / temperature) for each
    state of the batch, by blackjax HMC started at the dataset action, all states at once.
    Returns pre-tanh samples (B, K, A) and the mean acceptance rate. It runs outside every loss, so
    the samples are constants for the actor's gradient."""
    mu, log_std = jax.vmap(actor)(obs)  # computed once, outside the sampler loop
    u0 = jnp.arctanh(jnp.clip(action, -0.999, 0.999))
    K, burnin = args.num_samples, args.hmc_burnin

    def chain(s, m, ls, start, key, length):
        def log_density(u):
            return gaussian_log_prob(u, m, ls) + critic(s, jnp.tanh(u)).min() / args.temperature

        hmc = blackjax.hmc(log_density, args.hmc_step_size, jnp.exp(2 * ls), args.hmc_leapfrog)

        def step(state, k):
            state, info = hmc.step(k, state)
            return state, (state.position, info.acceptance_rate)

        _, (positions, accept) = jax.lax.scan(step, hmc.init(start), jax.random.split(key, length))
        return positions, accept

    keys = jax.random.split(key, obs.shape[0])
    if args.hmc_chains == "sequential":  # one chain per state, K successive samples after burn-in
        positions, accept = jax.vmap(lambda *a: chain(*a, burnin + K))(obs, mu, log_std, u0, keys)
        return positions[:, burnin:], accept.mean()
    # K independent chains per state, each burn-in then one sample
    per_state = lambda s, m, ls, start, k: jax.vmap(lambda kk: chain(s, m, ls, start, kk, burnin + 1))(jax.random.split(k, K))
    positions, accept = jax.vmap(per_state)(obs, mu, log_std, u0, keys)
    return positions[:, :, -1], accept.mean()


def actor_loss(actor: Actor, batch: data.Transitions, critic: Critic, alpha: jax.Array, u_mcmc: jax.Array,
               weights: jax.Array, key: jax.Array, args: Args) -> tuple[jax.Array, dict]:
    """Eq. 13 with the Eq. 15 gradient, weighted as in the official code (minimised):
        bc_weight * E[alpha log pi(a_new|s) - log pi(a_data|s)] - E[min_i Q_i(s, a_new)]
        + unbiased_weight * sum_b weights_b mean_k log pi(a_mcmc_bk | s_b)
    The last term's gradient is unbiased_weight * grad E_s[log E_pi exp Q] (its samples are constants)."""
    mu, log_std = jax.vmap(actor)(batch.obs)
    new_action, log_pi = jax.vmap(lambda m, s, k: sample_actions(m, s, k, 1))(mu, log_std, jax.random.split(key, mu.shape[0]))
    new_action, log_pi = new_action[:, 0], log_pi[:, 0]
    q_new = jax.vmap(critic)(batch.obs, new_action).min(axis=-1)
    u_data = jnp.arctanh(jnp.clip(batch.action, -0.999, 0.999))
    log_pi_data = jax.vmap(log_prob_u)(mu, log_std, u_data)
    ba = 0.0 if args.no_ba else log_pi_data.mean()
    loss = args.bc_weight * (alpha * log_pi.mean() - ba) - q_new.mean()
    metrics = {"actor_loss": loss, "log_pi_data": log_pi_data.mean(), "entropy": -log_pi.mean()}
    if args.unbiased and not args.ba_only:
        log_pi_mcmc = jax.vmap(jax.vmap(log_prob_u, in_axes=(None, None, 0)))(mu, log_std, u_mcmc)  # (B, K)
        correction = jnp.sum(weights * log_pi_mcmc.mean(axis=1))
        loss = loss + args.unbiased_weight * correction
        metrics["log_pi_mcmc"] = log_pi_mcmc.mean()
    return loss, {**metrics, "log_pi": log_pi}


# ============================================================================ Update
def apply_grads(opt: optax.GradientTransformation, model, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state


def polyak(target, online, tau: float):
    """target <- (1 - tau) target + tau online, on the arrays only."""
    return jax.tree.map(lambda t, o: (1 - tau) * t + tau * o if eqx.is_inexact_array(t) else t, target, online)


def sample(dataset: data.Transitions, key: jax.Array, batch_size: int) -> data.Transitions:
    idx = jax.random.randint(key, (batch_size,), 0, dataset.obs.shape[0])
    return jax.tree.map(lambda x: x[idx], dataset)


def update(state: AgentState, dataset: data.Transitions, key: jax.Array, args: Args,
           opt: Optimisers) -> tuple[AgentState, dict]:
    """One MISA update: critics (Eq. 12), HMC samples of p, actor (Eq. 13/15), temperatures, targets."""
    batch_key, critic_key, hmc_key, actor_key = jax.random.split(key, 4)
    batch = sample(dataset, batch_key, args.batch_size)
    regularise = not args.ba_only
    lagrange = args.lagrange_tau is not None and args.lagrange_tau > 0
    gamma_1 = args.min_q_weight * (jnp.clip(jnp.exp(state.log_gamma), 0.0, 1e6) if lagrange else 1.0) * regularise

    # critics
    (_, c_metrics), grads = eqx.filter_value_and_grad(critic_loss, has_aux=True)(
        state.critic, batch, state.actor, state.critic_target, gamma_1, critic_key, args)
    critic, critic_opt = apply_grads(opt.critic, state.critic, state.critic_opt, grads)
    q_samples_min = c_metrics.pop("q_samples_min")

    # Lagrange multiplier: grows while the regulariser exceeds the budget tau, shrinks below it
    log_gamma, gamma_opt = state.log_gamma, state.gamma_opt
    if lagrange:
        gap = jax.lax.stop_gradient(c_metrics["mi_regulariser"]) - args.lagrange_tau
        g_grad = jax.grad(lambda lg: -jnp.exp(lg) * args.min_q_weight * gap)(state.log_gamma)
        log_gamma, gamma_opt = apply_grads(opt.gamma, state.log_gamma, state.gamma_opt, g_grad)

    # HMC samples of the improved policy p(a|s) ∝ pi(a|s) exp Q(s, a), for the Eq. 15 correction
    u_mcmc = jnp.zeros((args.batch_size, args.num_samples, batch.action.shape[1]))
    if args.unbiased and regularise:
        u_mcmc, acceptance = sample_improved_actions(state.actor, state.critic, batch.obs, batch.action, hmc_key, args)
    _, weights = mi_bound(jax.lax.stop_gradient(q_samples_min), jnp.zeros(args.batch_size), args.temperature)

    # actor, then the entropy temperature
    alpha = jnp.exp(state.log_alpha)
    (_, a_metrics), grads = eqx.filter_value_and_grad(actor_loss, has_aux=True)(
        state.actor, batch, critic, alpha, u_mcmc, weights, actor_key, args)
    actor, actor_opt = apply_grads(opt.actor, state.actor, state.actor_opt, grads)
    log_pi = jax.lax.stop_gradient(a_metrics.pop("log_pi"))
    target_entropy = -batch.action.shape[1] if args.target_entropy is None else args.target_entropy
    a_grad = jax.grad(lambda la: -(la * (log_pi + target_entropy)).mean())(state.log_alpha)
    log_alpha, alpha_opt = apply_grads(opt.alpha, state.log_alpha, state.alpha_opt, a_grad)

    state = AgentState(actor=actor, critic=critic, critic_target=polyak(state.critic_target, critic, args.tau),
                       log_alpha=log_alpha, log_gamma=log_gamma, actor_opt=actor_opt, critic_opt=critic_opt,
                       alpha_opt=alpha_opt, gamma_opt=gamma_opt)
    metrics = {**c_metrics, **a_metrics, "alpha": alpha, "gamma_1": gamma_1}
    if args.unbiased and regularise:
        metrics["hmc_acceptance"] = acceptance
    return state, metrics


# ============================================================================ make_train
def make_train(args: Args, obs_dim: int, act_dim: int):
    """Returns the compiled, seed-vmapped `init(keys)` and `train_chunk(dataset, state, keys)`.

    train_chunk runs `log_every` updates per agent in a lax.scan. The dataset is an argument
    shared by all seeds (in_axes None), never closed over, so it is not baked into the program."""
    args = resolve_args(args) if args.num_layers is None else args
    lr = lambda base: optax.cosine_decay_schedule(base, args.num_updates) if args.cosine_schedule else base
    opt = Optimisers(actor=optax.adam(lr(args.actor_lr)), critic=optax.adam(lr(args.critic_lr)),
                     alpha=optax.adam(args.actor_lr), gamma=optax.adam(args.critic_lr))

    def init(key: jax.Array) -> AgentState:
        actor_key, critic_key = jax.random.split(key)
        actor = Actor(obs_dim, act_dim, args, key=actor_key)
        critic = Critic(obs_dim, act_dim, args, key=critic_key)
        zero = jnp.zeros(())
        return AgentState(actor, critic, critic, zero, zero,
                          opt.actor.init(eqx.filter(actor, eqx.is_inexact_array)),
                          opt.critic.init(eqx.filter(critic, eqx.is_inexact_array)),
                          opt.alpha.init(zero), opt.gamma.init(zero))

    def train_chunk(dataset: data.Transitions, state: AgentState, key: jax.Array):
        arrays, static = eqx.partition(state, eqx.is_array)  # lax.scan carries arrays only

        def step(carry, _):
            arrays, key = carry
            key, sub = jax.random.split(key)
            state, metrics = update(eqx.combine(arrays, static), dataset, sub, args, opt)
            return (eqx.filter(state, eqx.is_array), key), metrics

        (arrays, key), metrics = jax.lax.scan(step, (arrays, key), None, length=args.log_every)
        state = eqx.combine(arrays, static)
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
        metrics["params_finite"] = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))
        return state, key, metrics

    init_v = eqx.filter_jit(eqx.filter_vmap(init))
    train_v = eqx.filter_jit(eqx.filter_vmap(train_chunk, in_axes=(None, eqx.if_array(0), eqx.if_array(0))),
                             donate="all-except-first")
    return init_v, train_v


@eqx.filter_jit
def act(actors: Actor, obs: jax.Array, obs_mean: jax.Array, obs_std: jax.Array) -> jax.Array:
    """Deterministic actions tanh(mu(s)) of stacked actors (S,) for observations (S, E, obs_dim)."""
    mean_action = lambda actor, o: jnp.tanh(actor((o - obs_mean) / obs_std)[0])
    return eqx.filter_vmap(lambda actor, o: jax.vmap(mean_action, in_axes=(None, 0))(actor, o))(actors, obs)


# ============================================================================ main
def main(args: Args) -> dict:
    check_args(args)
    seeds = [args.seed + i for i in range(args.num_seeds)]

    # --- data: the domain's reward transform, visibly here; observation normalisation is optional
    # (off in the official code); statistics are constants, outside every Module
    raw, spec = data.load(args.env, args.dataset_dir)
    args = resolve_args(args, raw.reward, spec.eval_env_id)
    if args.normalize_obs:
        obs_mean, obs_std = raw.obs.mean(0), raw.obs.std(0) + 1e-3
    else:
        obs_mean, obs_std = np.zeros(spec.obs_dim, np.float32), np.ones(spec.obs_dim, np.float32)
    dataset = data.Transitions(
        obs=jnp.asarray((raw.obs - obs_mean) / obs_std), action=jnp.asarray(raw.action),
        reward=jnp.asarray(args.reward_scale * raw.reward + args.reward_bias, jnp.float32),
        next_obs=jnp.asarray((raw.next_obs - obs_mean) / obs_std), done=jnp.asarray(raw.done))
    evaluator = evaluation.Evaluator(spec, seeds, args.eval_episodes)  # fails early if it cannot evaluate

    # --- agents, run directory, resume
    init_v, train_v = make_train(args, spec.obs_dim, spec.act_dim)
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(jnp.asarray(seeds))
    state, train_keys = init_v(keys[:, 0]), keys[:, 1]
    run_dir = Path(args.run_dir) if args.run_dir else runlog.default_run_dir(ALGO, args.env, args.seed)
    ckpt, update_count, history = runlog.resume_or_start(
        run_dir, args, {"state": state, "keys": train_keys, "update": jnp.int32(0)})
    state, train_keys = ckpt["state"], ckpt["keys"]
    run = runlog.Run(run_dir, args, seeds, args.track, args.wandb_project,
                     resume_update=update_count if args.resume else None)
    np.savez(run_dir / "obs_stats.npz", mean=obs_mean, std=obs_std)  # what act() needs besides the actor
    print(f"{ALGO} on {spec.name} ({spec.source}; {raw.obs.shape[0]} transitions), seeds {seeds}, run dir {run_dir}")

    # --- the seeds spread over every local device (e.g. the GPUs of one host; a no-op on one device)
    dataset, state, train_keys = sharding.shard_seeds(args.num_seeds, dataset, state, train_keys)

    def policy(obs: np.ndarray) -> np.ndarray:
        return np.asarray(act(state.actor, jnp.asarray(obs), obs_mean, obs_std))

    # --- training: compiled chunks of updates, evaluation + checkpoint on the host between them
    bar = runlog.progress(args.num_updates, update_count, ALGO)
    while update_count < args.num_updates:
        state, train_keys, metrics = train_v(dataset, state, train_keys)
        metrics = jax.tree.map(np.asarray, metrics)
        runlog.check_finite(metrics, seeds, update_count, 1, run_dir)
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
    main(tyro.cli(Args))

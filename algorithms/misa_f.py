"""MISA-f: MISA with the f-divergence bound (Ma et al., NeurIPS 2023, arXiv 2210.07484, Sec. 4.2).

Identical to algorithms/misa.py except for the bound (`mi_bound` and its Lagrange budget): the
log-partition is replaced by its linear upper bound log x <= x / e,

    I_MISA-f = E_D[log pi(a|s)] + E_D[Q(s, a)] - E_{s~D, a~pi(.|s)} exp(Q(s, a) - 1)   (+ const)

the loosest of the three (Theorem 4.1: I_MISA-DV >= I_MISA-f). Its actor gradient is
    grad E_{s,a} exp(Q - 1) = (1/B) sum_b Z_b / e * E_{a~p(.|s_b)}[grad log pi(a|s_b)],  Z_b = E_pi exp Q(s_b, .),
so each state's HMC correction is weighted by its (unnormalised) partition function. The bound is
exponential in Q: where log E_pi exp Q exceeds 30 it is taken at Q minus a batch constant (see
`mi_bound`), so it stays finite in float32. There it is no longer the paper's value: the regulariser
stays near e^29 whatever Q is, and its gradient dwarfs the TD term's (at Q = 100 on the data,
1.7e14 against 24: results/misa_f_scale.md), as the exact bound's would. With T = Q the two
gradients balance between Q = 1 and 10 there, far below a trained Hopper critic's hundreds.
--lagrange-tau bounds the f regulariser itself (no log(B/K) shift: that is MISA's official normalisation).
`diff algorithms/misa.py algorithms/misa_f.py` shows exactly these changes.

Where each equation lives:  mi_bound (the bound; with its normalisation and Lagrange budget the only
section that differs in misa_dv.py and misa_f.py) -> critic_loss (Eq. 12) -> sample_improved_actions
(HMC for p) -> actor_loss (Eq. 13 + 15); train_step is one update given its random draws, which
update draws.

Where this follows the paper, the official code, or neither, and why: docs/fidelity.md (one list for
the three MISA files). tests/test_official_parity.py reproduces one recorded official update with the
official choices set.

Usage:
    python algorithms/misa_f.py                                  # embedded dataset, 5 seeds
    python algorithms/misa_f.py --env hopper-medium-v2 --num-seeds 5
    python algorithms/misa_f.py --env antmaze-umaze-v0 --num-seeds 5   # preset: tau 10, 3x256, reward (r-0.5)*4
Ablations (paper Table 2): --objective misa-biased|ba|no-ba, --num-samples 5|20, --hmc-burnin 1;
misa_dv.py and misa_f.py for the looser bounds. --objective official: what the official code trains.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, NamedTuple


import blackjax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

ALGO = "misa_f"


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
    """transitions per minibatch (official code 256)"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor (paper; official code 1e-4)"""
    critic_lr: float = 1e-4
    """Adam learning rate of the critics (paper; official code 3e-4)"""
    cosine_schedule: bool = True
    """cosine decay of both learning rates to 0 over --num-updates (paper; official code: none)"""
    hidden_dim: int = 256
    """width of every hidden layer (paper 256)"""
    num_layers: int | None = None
    """hidden layers per network (default: domain preset, 2; AntMaze 3)"""

    # --- SAC ---
    discount: float = 0.99
    """discount factor (official code 0.99)"""
    tau: float = 0.005
    """Polyak rate of the target critics (official code 5e-3)"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature (default -act_dim, official code)"""
    reward_norm: bool | None = None
    """scale the rewards to [-1, 1] by the dataset's own min and max (default: domain preset; on for
    Adroit and Kitchen, as in the official MISA code); replaces --reward-scale/--reward-bias"""
    reward_scale: float | None = None
    """r' = reward_scale * r + reward_bias without --reward-norm (default: domain preset; AntMaze (r - 0.5) * 4);
    giving either one turns the preset's --reward-norm off"""
    reward_bias: float | None = None
    """see reward_scale"""

    # --- MISA ---
    num_samples: int = 50
    """K: policy samples per state for log E_pi exp Q, and HMC samples per state for Eq. 15 (paper 50)"""
    min_q_weight: float = 5.0
    """gamma_1: weight of the MI regulariser in the critic loss (official code)"""
    temperature: float = 1.0
    """the bound is applied to Q / temperature and rescaled (official code: 1)"""
    objective: Literal["misa", "misa-biased", "ba", "no-ba", "official"] = "misa"
    """the objective, by the paper's names (Table 2): misa (Eq. 12 and 13, with the Eq. 15 correction
    from HMC samples of p); misa-biased (without the correction term); ba (the Barber-Agakov bound
    alone: no Q regulariser, no correction); no-ba (misa without the actor's E_D[log pi(a|s)] term);
    official (misa whose correction samples are the dataset actions: what the official code trains,
    since its sampler never accepts a move, docs/fidelity.md)"""
    bc_weight: float = 0.5
    """gamma_2 on the actor's E_D[log pi(a|s)] (and entropy) term (official code)"""
    unbiased_weight: float = 0.1
    """weight of the Eq. 15 correction term E_p[log pi(a|s)] (official code)"""
    hmc_burnin: int = 5
    """HMC steps per chain before the kept samples (discarded)"""
    hmc_leapfrog: int = 2
    """leapfrog steps per HMC step"""
    hmc_step_size: float = 1.0
    """leapfrog step size in units of the inverse mass: p's fitted covariance (--hmc-fit-ascent) or the
    policy's (without it; paper: 1 policy std); with --hmc-adapt, the step of the first update"""
    hmc_adapt: bool = True
    """adapt the step size toward --hmc-target-accept across updates: each update's chains run at one
    fixed step, and the next update's step moves by the kept steps' acceptance; --no-hmc-adapt keeps it"""
    hmc_target_accept: float = 0.75
    """acceptance rate the step-size adaptation aims at"""
    hmc_adapt_rate: float = 0.5
    """log step size += rate * (acceptance of the kept steps - target), once per update"""
    hmc_step_jitter: float = 0.5
    """each HMC step draws its step size uniformly within +-jitter of the current one: breaks the
    resonances of a fixed trajectory length (which left some dimensions' spread 15 % short)"""
    hmc_start: Literal["resample", "dataset"] = "resample"
    """where the chains start (or, with --hmc-fit-ascent, where the fit climbs from): resample, from the K
    policy actions of the critic's regulariser and K actions from the policy widened by each
    --hmc-start-widths (the fit takes the best of them; without it, an importance resample of p); dataset,
    the dataset action (official code; far in the policy's tail once the policy narrows)"""
    hmc_start_widths: tuple[float, ...] = (3.0, 10.0, 30.0)
    """with --hmc-start resample: std factors of the widened policies the starts are also drawn from, so
    that a start lies near p where Q puts it many policy stds from pi (results/hmc-accuracy.md); none
    (--hmc-start-widths with no value): the K policy actions alone"""
    hmc_fit_ascent: tuple[int, ...] = (0, 10, 5, 0)
    """fit each state's chains to p before they run (fit_to_p): for each value, that many steps of gradient
    ascent on log p from --hmc-fit-starts starts, then a fit of p's covariance at the best point reached
    (nutpie's rule, from gradients of log p); the chains start at draws from the last fit, their inverse
    mass. None (--hmc-fit-ascent with no value): the policy's covariance as inverse mass, the chains at
    their starts (the sampler before; results/hmc-accuracy.md)"""
    hmc_fit_starts: int = 4
    """starts per state that --hmc-fit-ascent climbs from (the best point reached is kept)"""
    hmc_fit_points: int | None = None
    """gradient evaluations per fit of p's covariance (default 2 * action dims + 4; at least action dims + 1)"""
    hmc_chains: Literal["auto", "sequential", "parallel"] = "auto"
    """sequential: one chain per state gives K successive samples (official); parallel: K chains per
    state, one sample each (fewer sequential steps: faster on a GPU); auto: sequential on a CPU,
    parallel on any other JAX backend"""

    # --- The bound's Lagrange budget (the Args that differ between misa.py, misa_dv.py and misa_f.py) ---
    lagrange: bool | None = None
    """weight the regulariser by gamma_1 = min_q_weight * lambda, with a Lagrange multiplier lambda
    adapted so that each critic's regulariser stays near --lagrange-tau (default: domain preset; on for
    AntMaze, Adroit and Kitchen, off for locomotion; giving --lagrange-tau turns it on)"""
    lagrange_tau: float | None = None
    """Lagrange budget tau (default: domain preset; AntMaze 10, Adroit/Kitchen 3, as for MISA: the paper
    gives none for MISA-f). It bounds each critic's f regulariser as mi_bound defines it,
    E_{s,a~pi} exp(T - 1) - E_D[T] at T = Q (at T = Q - c above its stabilisation threshold, see mi_bound)"""

    # --- Fidelity: paper vs official code where they differ (docs/fidelity.md) ---
    init: Literal["official", "equinox"] = "official"
    """network initialisation: official (flax Dense: lecun-normal kernels, zero biases, last layer
    variance-scaling 1e-2) or equinox's default (uniform +-1/sqrt(fan_in), biases too)"""
    actor_activation: Literal["elu", "relu"] = "elu"
    """hidden activation of the actor (paper: ELU everywhere; the official actor uses ReLU)"""
    learn_log_std_affine: bool = True
    """train the scalar scale (start 1) and shift (start -1) of the actor's log-std, as the official policy does"""
    actor_sees: Literal["updated", "pre-update"] = "updated"
    """critic the actor and the HMC target use: the one just updated (paper, Algorithm 1) or the
    pre-update one (official: all losses at the same parameters)"""
    lagrange_init: float = 1.0
    """initial log of the Lagrange multiplier (official: 1.0, i.e. a multiplier of e)"""
    lagrange_lr: float = 3e-4
    """Adam learning rate of the Lagrange multiplier, constant (official: the critic learning rate, 3e-4)"""


# The range of every numeric flag, checked before any work (common.runlog.check: one message, exit 2):
# ">= x", "> x" (finite), "any" (finite), or an interval such as "(0, 1]".
RULES = {
    "num_seeds": ">= 1", "seed": ">= 0", "num_updates": ">= 1", "eval_every": ">= 1", "eval_episodes": ">= 1",
    "log_every": ">= 1", "checkpoint_every": ">= 1",
    "batch_size": ">= 1", "actor_lr": "> 0", "critic_lr": "> 0", "hidden_dim": ">= 1",
    "num_layers": ">= 1", "discount": "[0, 1]", "tau": "(0, 1]", "target_entropy": "any", "reward_scale": "any",
    "reward_bias": "any", "num_samples": ">= 1", "min_q_weight": ">= 0", "temperature": "> 0",
    "bc_weight": ">= 0", "unbiased_weight": ">= 0", "hmc_burnin": ">= 0", "hmc_leapfrog": ">= 1", "hmc_step_size": "> 0",
    "hmc_start_widths": "> 0", "hmc_fit_ascent": ">= 0", "hmc_fit_starts": ">= 1", "hmc_fit_points": ">= 2",
    "hmc_target_accept": "(0, 1)", "hmc_adapt_rate": ">= 0", "hmc_step_jitter": "[0, 1)", "lagrange_tau": "> 0",
    "lagrange_init": "any", "lagrange_lr": "> 0",
}


def resolve_hmc_chains(args: Args) -> Args:
    """--hmc-chains auto -> the faster layout on this JAX backend: sequential on a CPU, which is FLOP-bound
    (parallel chains take 3.9x the FLOPs), parallel elsewhere: a GPU is bound by the kernels run one
    after another, 5x fewer with parallel chains (results/speed.md, "The GPU design on paper")."""
    if args.hmc_chains != "auto":
        return args
    return dataclasses.replace(args, hmc_chains="sequential" if jax.default_backend() == "cpu" else "parallel")


NEVER = jnp.iinfo(jnp.int32).max  # first non-finite step of a metric that stayed finite


# ============================================================================ Networks
def mlp(in_dim: int, out_dim: int | str, args: Args, activation, key: jax.Array) -> eqx.nn.MLP:
    """Hidden layers of --hidden-dim; --init official is flax's Dense default (the official code's):
    lecun-normal kernels and zero biases, the last layer variance-scaling(1e-2, fan-in, uniform)."""
    init_key, key = jax.random.split(key)
    net = eqx.nn.MLP(in_dim, out_dim, args.hidden_dim, depth=args.num_layers, activation=activation, key=key)
    if args.init == "equinox":
        return net
    keys = jax.random.split(init_key, len(net.layers))
    hidden = jax.nn.initializers.lecun_normal()
    last = jax.nn.initializers.variance_scaling(1e-2, "fan_in", "uniform")
    layers = [eqx.tree_at(lambda l: (l.weight, l.bias), layer,  # flax kernels are (in, out), equinox's (out, in)
                          ((last if i == len(net.layers) - 1 else hidden)(k, layer.weight.shape[::-1]).T,
                           jnp.zeros_like(layer.bias)))
              for i, (layer, k) in enumerate(zip(net.layers, keys))]
    return eqx.tree_at(lambda n: n.layers, net, tuple(layers))


ACTIVATIONS = {"elu": jax.nn.elu, "relu": jax.nn.relu}


class Actor(eqx.Module):
    """Tanh-Gaussian policy on one (unbatched) observation: u ~ N(mu(s), sigma(s)^2), a = tanh(u).
    log sigma = clip(scale * raw + shift, -5, 2) with the official policy's trainable scalars
    (scale 1, shift -1 at the start; frozen there with --no-learn-log-std-affine)."""

    net: eqx.nn.MLP
    log_std_scale: jax.Array
    log_std_shift: jax.Array
    learn_affine: bool = eqx.field(static=True)

    def __init__(self, obs_dim: int, act_dim: int, args: Args, *, key: jax.Array):
        self.net = mlp(obs_dim, 2 * act_dim, args, ACTIVATIONS[args.actor_activation], key)
        self.log_std_scale, self.log_std_shift = jnp.ones(()), -jnp.ones(())
        self.learn_affine = args.learn_log_std_affine

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mu, log_std) of the pre-tanh Gaussian."""
        mu, raw = jnp.split(self.net(obs), 2)
        scale, shift = self.log_std_scale, self.log_std_shift
        if not self.learn_affine:
            scale, shift = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(shift)
        return jnp.clip(mu, -9.0, 9.0), jnp.clip(scale * raw + shift, -5.0, 2.0)


def gaussian_log_prob(u: jax.Array, mu: jax.Array, log_std: jax.Array) -> jax.Array:
    return jnp.sum(-0.5 * ((u - mu) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def tanh_log_det(u: jax.Array) -> jax.Array:
    """sum log |d tanh(u) / du| = sum log(1 - tanh(u)^2), computed stably."""
    return jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), axis=-1)


def tanh_gaussian_log_prob(u: jax.Array, mu: jax.Array, log_std: jax.Array) -> jax.Array:
    """log pi(a|s) at a = tanh(u)."""
    return gaussian_log_prob(u, mu, log_std) - tanh_log_det(u)


def reparameterise(mu: jax.Array, log_std: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Policy samples from standard-normal draws eps (mu, log_std broadcast against eps):
    pre-tanh u = mu + sigma eps, action tanh(u), and log pi(tanh u | s)."""
    u = mu + jnp.exp(log_std) * eps
    return u, jnp.tanh(u), tanh_gaussian_log_prob(u, mu, log_std)


def pre_tanh(action: jax.Array) -> jax.Array:
    """u = atanh(a), dataset actions clipped to +-0.999 first (official code), so u stays finite."""
    return jnp.arctanh(jnp.clip(action, -0.999, 0.999))


class Critic(eqx.Module):
    """Twin Q networks, stored as one MLP with a leading axis of 2. (s, a) -> (Q_1, Q_2)."""

    nets: eqx.nn.MLP

    def __init__(self, obs_dim: int, act_dim: int, args: Args, *, key: jax.Array):
        make = lambda k: mlp(obs_dim + act_dim, "scalar", args, jax.nn.elu, k)
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
    critic_target: Critic
    log_alpha: jax.Array  # SAC entropy temperature
    log_lagrange: jax.Array  # log of the Lagrange multiplier lambda; gamma_1 = min_q_weight * lambda (--lagrange)
    hmc_log_step: jax.Array  # log HMC step size (units of the inverse mass: the fit to p, or the policy), adapted when --hmc-adapt
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    lagrange_opt: optax.OptState


class Optimisers(NamedTuple):  # closed over by the update, never stored in the state
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    alpha: optax.GradientTransformation
    lagrange: optax.GradientTransformation


def optimisers(args: Args) -> Optimisers:
    """Adam for each; the actor's and critics' learning rates decay with --cosine-schedule (paper), the
    temperature's (at the actor's rate) and the Lagrange multiplier's stay constant (official code)."""
    lr = lambda base: optax.cosine_decay_schedule(base, args.num_updates) if args.cosine_schedule else base
    return Optimisers(actor=optax.adam(lr(args.actor_lr)), critic=optax.adam(lr(args.critic_lr)),
                      alpha=optax.adam(args.actor_lr), lagrange=optax.adam(args.lagrange_lr))


class Noise(NamedTuple):
    """The standard-normal draws of one update: every random policy action comes from these, so the
    losses are deterministic functions of (parameters, batch, noise, HMC samples), checkable
    against another implementation (tests/test_official_parity.py)."""

    next: jax.Array  # (B, A): next action of the TD target
    policy: jax.Array  # (B, K, A): the K policy actions per state of the regulariser
    new: jax.Array  # (B, A): the reparameterised action of the actor and temperature losses


def draw_noise(key: jax.Array, batch_size: int, num_samples: int, act_dim: int) -> Noise:
    k_next, k_policy, k_new = jax.random.split(key, 3)
    return Noise(next=jax.random.normal(k_next, (batch_size, act_dim)),
                 policy=jax.random.normal(k_policy, (batch_size, num_samples, act_dim)),
                 new=jax.random.normal(k_new, (batch_size, act_dim)))


# ============================================================================ MISA objective
def mi_bound(q_samples: jax.Array, q_data: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """The Q-dependent part of I_MISA-f and the weights of its policy-gradient estimator.

    q_samples (B, K): Q(s_b, a_bk), a_bk ~ pi(.|s_b);  q_data (B,): Q(s_b, a_b), (s_b, a_b) ~ D.
    Returns
      regulariser = E_{s,a~pi}[exp(T - 1)] - E_D[T]   (f-divergence bound) with T = Q, and
      weights (B,): grad E_{s,a~pi} exp(T - 1) = sum_b weights_b E_{a~p(.|s_b)}[grad log pi(a|s_b)];
      for MISA-f, weights_b = temperature * E_pi exp(Q(s_b, .) / temperature - 1) / B.
    exp(Q - 1) overflows float32 once Q > 89, and trained critics reach hundreds. The bound holds for
    any T, so it is taken at T = Q - c, c = max(0, max_b log E_pi exp Q(s_b, .) - 30), a batch constant
    without gradient: exactly MISA-f while every log E_pi exp Q <= 30, finite for any Q beyond (the
    regulariser's push-down on Q is then scaled by e^-c, and its value stays near e^29 whatever Q is).
    Computed from log E_pi exp Q (logsumexp).
    """
    t = temperature
    log_z_state = jax.nn.logsumexp(q_samples / t, axis=1) - jnp.log(q_samples.shape[1])  # log E_pi exp(Q/t), (B,)
    c = jax.lax.stop_gradient(jnp.maximum(0.0, log_z_state.max() - 30.0))  # 0 unless Q / t is large
    partition = t * jnp.exp(log_z_state - 1.0 - c).mean()  # t E_{s,a} exp(T/t - 1), scalar
    weights = t * jnp.exp(log_z_state - 1.0 - c) / q_samples.shape[0]
    return partition - q_data.mean() + t * c, weights


def regulariser(q_samples: jax.Array, q_data: jax.Array, args: Args) -> jax.Array:
    """The regulariser of one critic in the critic loss: mi_bound's (there is no official MISA-f to match)."""
    return mi_bound(q_samples, q_data, args.temperature)[0]


def lagrange_budget(args: Args) -> float:
    """--lagrange-tau in the units of `regulariser`: the bound's own."""
    return args.lagrange_tau


def critic_loss(critic: Critic, batch: Transitions, actor: Actor, critic_target: Critic, gamma_1: jax.Array,
                budget: float | jax.Array, noise: Noise, args: Args) -> tuple[jax.Array, tuple[dict, dict]]:
    """Eq. 12: TD error + gamma_1 * (regulariser - budget) for each of the two critics (`regulariser`:
    E_s[log E_pi exp Q] - E_D[Q] for MISA; budget: the Lagrange budget, 0 without Lagrange).
    Returns (loss, (metrics, extras))."""
    next_mu, next_log_std = jax.vmap(actor)(batch.next_obs)
    _, next_action, _ = reparameterise(next_mu, next_log_std, noise.next)
    next_q = jax.vmap(critic_target)(batch.next_obs, next_action).min(axis=-1)
    target = jax.lax.stop_gradient(batch.reward + args.discount * (1.0 - batch.done) * next_q)
    q_data = jax.vmap(critic)(batch.obs, batch.action)  # (B, 2)
    td = ((q_data - target[:, None]) ** 2).mean(axis=0).sum()

    # K policy actions per state (constants for the critic), Q of both critics at each
    mu, log_std = jax.lax.stop_gradient(jax.vmap(actor)(batch.obs))
    u_policy, actions, _ = reparameterise(mu[:, None], log_std[:, None], noise.policy)  # (B, K, A)
    q_samples = jax.vmap(jax.vmap(critic, in_axes=(None, 0)))(batch.obs, actions)  # (B, K, 2)
    regs = jnp.stack([regulariser(q_samples[..., i], q_data[:, i], args) for i in range(2)])
    loss = td + gamma_1 * (regs - budget).sum()
    metrics = {"critic_loss": loss, "td_loss": td, "mi_regulariser": regs.mean(), "q_data": q_data.mean(),
               "q_policy": q_samples.mean()}
    return loss, (metrics, {"gaps": regs - budget, "q_samples_min": q_samples.min(axis=-1), "u_policy": u_policy})


def lagrange_loss(log_lagrange: jax.Array, gaps: jax.Array, args: Args) -> jax.Array:
    """The multiplier grows while the regulariser exceeds its budget (gaps > 0) and shrinks below it
    (official form: mean over the two critics, multiplier clipped to [0, 1e6])."""
    return -jnp.clip(jnp.exp(log_lagrange), 0.0, 1e6) * args.min_q_weight * jax.lax.stop_gradient(gaps).mean()


def improved_log_density(u: jax.Array, obs: jax.Array, mu: jax.Array, log_std: jax.Array, critic: Critic,
                         temperature: float) -> jax.Array:
    """log p(u|s) + const, p(u|s) ∝ N(u; mu, sigma) exp(min_i Q_i(s, tanh u) / temperature): in the
    pre-tanh space the tanh Jacobians of pi and p cancel, and every u is a valid action."""
    return gaussian_log_prob(u, mu, log_std) + critic(obs, jnp.tanh(u)).min() / temperature


def hmc_chain(log_density, start: jax.Array, inverse_mass: jax.Array, log_step: jax.Array, key: jax.Array,
              num_samples: int, args: Args) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One blackjax HMC chain: --hmc-burnin steps discarded, then `num_samples` kept, every step at
    the update's step size (jittered by --hmc-step-jitter), so the chain is a valid Markov chain.
    Returns the kept positions (num_samples, A), the gradients of log p there and their acceptance rates."""
    kernel = blackjax.hmc.build_kernel()
    burn_key, draw_key = jax.random.split(key)

    def step(state, k):
        k, k_step = jax.random.split(k)
        jitter = jax.random.uniform(k_step, (), minval=1 - args.hmc_step_jitter, maxval=1 + args.hmc_step_jitter)
        state, info = kernel(k, state, log_density, jnp.exp(log_step) * jitter, inverse_mass, args.hmc_leapfrog)
        return state, (state.position, state.logdensity_grad, info.acceptance_rate)

    state, _ = jax.lax.scan(step, blackjax.hmc.init(start, log_density), jax.random.split(burn_key, args.hmc_burnin))
    _, (positions, grads, accept) = jax.lax.scan(step, state, jax.random.split(draw_key, num_samples))
    return positions, grads, accept


def stein_scale(u: jax.Array, grad: jax.Array) -> jax.Array:
    """-mean_k (u_k - mean u) . grad log p(u_k) / A for one state's samples u (K, A): 1 in expectation
    for exact samples of p (Stein's identity E_p[(u - c) . grad log p(u)] = -A), below 1 when the
    samples are too narrow (0: the chain never moved), above 1 when too wide."""
    return -jnp.mean(jnp.sum((u - u.mean(0, keepdims=True)) * grad, axis=-1)) / u.shape[-1]


def sqrt_and_inverse_sqrt(m: jax.Array, iterations: int = 30) -> tuple[jax.Array, jax.Array]:
    """m^1/2 and m^-1/2 of a symmetric positive-definite matrix by the coupled Newton-Schulz iteration:
    matrix products only. (jaxlib's batched LAPACK kernels, eigh or svd, each wait on XLA's CPU thread pool
    for their batch; two running at once on a 2-thread pool deadlocked the training loop.) 30 iterations
    reach float32 accuracy up to condition numbers of 1e6."""
    eye = jnp.eye(m.shape[0])
    norm = jnp.sqrt(jnp.sum(m * m))  # >= the largest eigenvalue: the scaled iteration converges

    def step(carry, _):
        y, z = carry
        t = 0.5 * (3.0 * eye - z @ y)
        return (y @ t, t @ z), None

    (y, z), _ = jax.lax.scan(step, (m / norm, eye), None, length=iterations)
    return y * jnp.sqrt(norm), z / jnp.sqrt(norm)


def fit_factor(log_density, centre: jax.Array, factor: jax.Array, key: jax.Array, num_points: int) -> jax.Array:
    """A factor L' (covariance L' L'^T) of p's covariance fitted around `centre` from the current one, L: at
    `num_points` draws x = centre + L z, z ~ N(0, I), the covariances C of z and G of grad_z log p give the fit
    L (C # G^-1) L^T, their matrix geometric mean mapped back. For a Gaussian p of covariance S,
    grad_z log p = -L^T S^-1 (x - mean), so G = (L^T S^-1 L) C (L^T S^-1 L) and the fit is S exactly, whatever
    L and centre (the rule of nutpie's mass matrix adaptation, in its dense form). Gradients see the kinks of
    min_i Q_i, where the curvature (a Laplace fit) is zero; those kinks make p a narrow ridge at a sharp Q.
    C # G^-1 = C^1/2 M^-1/2 C^1/2, M = C^1/2 G C^1/2: only C (from N(0, I) draws: well conditioned) is rooted
    before a product, since in float32 a product with G^1/2 loses positive-definiteness once G's condition number
    passes ~1e6 (G's is the square of p's in z). M's condition number is capped at 1e5: a fit corrects at most
    ~18x in std, and the next fit, in its coordinates, the rest."""
    A = centre.shape[0]
    z = jax.random.normal(key, (num_points, A))
    g = jax.vmap(jax.grad(log_density))(centre[None] + z @ factor.T) @ factor  # grad log p in z
    covariance = lambda y: (y - y.mean(0, keepdims=True)).T @ (y - y.mean(0, keepdims=True)) / (num_points - 1)
    symmetric = lambda m: 0.5 * (m + m.T)
    C, G = covariance(z), covariance(g)
    C_half, _ = sqrt_and_inverse_sqrt(C)
    M = symmetric(C_half @ G @ C_half)
    M = M + 1e-5 * jnp.trace(M) / A * jnp.eye(A)  # full rank where gradients are degenerate
    _, M_inv_half = sqrt_and_inverse_sqrt(M)
    fit_root, _ = sqrt_and_inverse_sqrt(symmetric(C_half @ M_inv_half @ C_half))
    return factor @ fit_root


def ascend(log_density, x: jax.Array, factor: jax.Array, num_steps: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """`num_steps` steps of gradient ascent on log p from x in the metric of the fit L L^T, each first one fitted
    std long along the gradient, then 1.5 times longer after a step that raised log p and half as long (and
    undone) after one that did not. Returns the point reached and log p there."""
    value_and_grad = jax.value_and_grad(log_density)

    def step(_, carry):
        x, value, grad, length = carry
        grad_z = grad @ factor  # the gradient in the fit's whitened coordinates
        x_new = x + length * (factor @ grad_z) / jnp.maximum(jnp.linalg.norm(grad_z), 1e-30)  # along L L^T grad
        value_new, grad_new = value_and_grad(x_new)
        up = value_new > value  # False for NaN
        keep = lambda new, old: jnp.where(up, new, old)
        return keep(x_new, x), keep(value_new, value), keep(grad_new, grad), keep(1.5 * length, 0.5 * length)

    x, value, _, _ = jax.lax.fori_loop(0, num_steps, step, (x, *value_and_grad(x), jnp.ones(())))
    return x, value


def fit_to_p(log_density, starts: jax.Array, policy_std: jax.Array, key: jax.Array, args: Args) -> tuple[jax.Array, jax.Array]:
    """Where one state's chains should start and in which coordinates they should run: from the policy's
    covariance, for each value n of --hmc-fit-ascent, n ascent steps from every start (ascend, in the current
    fit's metric), then p's covariance fitted at the best point reached (fit_factor).
    Returns (that point, a factor L of the last fit). Runs before the chains; their samples stay a valid
    Markov chain's."""
    num_points = max(args.hmc_fit_points or 2 * starts.shape[-1] + 4, starts.shape[-1] + 1)  # full rank

    def one_fit(carry, fit):  # a scan over the fits (not a Python loop): one copy of them to compile
        starts, factor, _ = carry
        i, num_steps = fit
        starts, values = jax.vmap(ascend, in_axes=(None, 0, None, None))(log_density, starts, factor, num_steps)
        best = starts[jnp.argmax(values)]
        return (starts, fit_factor(log_density, best, factor, jax.random.fold_in(key, i), num_points), best), None

    fits = (jnp.arange(len(args.hmc_fit_ascent)), jnp.asarray(args.hmc_fit_ascent))
    (_, factor, best), _ = jax.lax.scan(one_fit, (starts, jnp.diag(policy_std), starts[0]), fits)
    return best, factor


def sample_improved_actions(actor: Actor, critic: Critic, obs: jax.Array, start: jax.Array, log_step: jax.Array,
                            key: jax.Array, args: Args) -> tuple[jax.Array, dict]:
    """K samples u of p(u|s) ∝ N(u; mu(s), sigma(s)) exp(min_i Q_i(s, tanh u) / temperature) for each
    state of the batch, by HMC, all states at once, in coordinates y that whiten a covariance (u = centre + L y,
    unit mass: HMC with inverse mass L L^T in u). With --hmc-fit-ascent (default) that is p's covariance, fitted
    per state (fit_to_p, climbing from the points `start` (B, N, A)), and the chains start at draws of
    N(fitted point, fit); without, it is the policy's covariance and the chains start at `start` (B, K, A),
    or all K at one point (B, 1, A).
    The step size is in units of that covariance. --hmc-chains sequential: one chain per state, K successive
    samples (from the first start); parallel: K chains per state, one sample each.
    Returns pre-tanh samples (B, K, A) and diagnostics: the mean acceptance of the kept steps, the
    step, the Stein scale of the samples (stein_scale, mean over states), and the log step of the next
    update (moved by the kept steps' acceptance with --hmc-adapt)."""
    mu, log_std = jax.vmap(actor)(obs)  # computed once, outside the sampler loop
    K, A = args.num_samples, mu.shape[-1]

    def chains_of_one_state(s, m, ls, starts, key):
        def log_density(u):
            return improved_log_density(u, s, m, ls, critic, args.temperature)

        fit_key, draw_key, key = jax.random.split(key, 3)
        if args.hmc_fit_ascent:
            centre, factor = fit_to_p(log_density, starts, jnp.exp(ls), fit_key, args)
            y_starts = jax.random.normal(draw_key, (K, A))
        else:
            centre, factor = jnp.zeros(A), jnp.diag(jnp.exp(ls))
            y_starts = jnp.broadcast_to(starts / jnp.exp(ls)[None], (K, A))  # one start (dataset) serves all K
        log_density_y = lambda y: log_density(centre + factor @ y)
        if args.hmc_chains == "sequential":
            y, grads, accept = hmc_chain(log_density_y, y_starts[0], jnp.ones(A), log_step, key, K, args)
        else:
            one_sample_chain = lambda y0, k: hmc_chain(log_density_y, y0, jnp.ones(A), log_step, k, 1, args)
            y, grads, accept = jax.vmap(one_sample_chain)(y_starts, jax.random.split(key, K))
            y, grads, accept = y[:, 0], grads[:, 0], accept[:, 0]
        return centre[None] + y @ factor.T, stein_scale(y, grads), accept  # Stein's identity holds in y as in u

    u, stein, accept = jax.vmap(chains_of_one_state)(obs, mu, log_std, start, jax.random.split(key, obs.shape[0]))
    accept = jnp.where(jnp.isfinite(accept), accept, 0.0)
    next_log_step = log_step
    if args.hmc_adapt:  # across updates, from the kept steps' acceptance (not a burn-in transient)
        next_log_step = jnp.clip(log_step + args.hmc_adapt_rate * (accept.mean() - args.hmc_target_accept), -7.0, 2.0)
    return u, {"hmc_acceptance": accept.mean(), "hmc_step": jnp.exp(log_step), "hmc_stein_scale": stein.mean(),
               "log_step": next_log_step}


def chain_starts(actor: Actor, critic: Critic, obs: jax.Array, u_policy: jax.Array, key: jax.Array,
                 args: Args) -> jax.Array:
    """Where each state's chains start, from candidates for p(u|s) ∝ N(u; mu, sigma) exp(min Q / temperature):
    the K policy actions u_policy (B, K, A) and K draws of N(mu, (w sigma)^2) for each width w of
    --hmc-start-widths. The wide draws reach p where Q has moved it many policy stds away, narrower than pi,
    where the policy's own actions do not. With --hmc-fit-ascent: the --hmc-fit-starts candidates of highest
    p, which fit_to_p climbs from -> (B, hmc_fit_starts, A). Without: K chain starts, an importance resample
    of p among the candidates (each drawn with probability ∝ p / the candidates' mixture density) -> (B, K, A)."""
    widths = jnp.asarray((1.0, *args.hmc_start_widths))
    B, K, A = u_policy.shape
    mu, log_std = jax.vmap(actor)(obs)
    wide_key, pick_key = jax.random.split(key)
    scale = jnp.repeat(widths[1:], K)[None, :, None] * jnp.exp(log_std)[:, None]
    u_wide = mu[:, None] + scale * jax.random.normal(wide_key, (B, K * (len(widths) - 1), A))
    u = jnp.concatenate([u_policy, u_wide], axis=1)
    q = jax.vmap(jax.vmap(lambda o, a: critic(o, jnp.tanh(a)).min(), in_axes=(None, 0)))(obs, u)
    z2 = jnp.sum(((u - mu[:, None]) / jnp.exp(log_std)[:, None]) ** 2, axis=-1)  # (B, candidates)
    log_p = -0.5 * z2 + q / args.temperature
    if args.hmc_fit_ascent:
        idx = jax.lax.top_k(log_p, min(args.hmc_fit_starts, u.shape[1]))[1]  # distinct points to climb from
    else:
        w = widths[None, None]
        log_mixture = jax.nn.logsumexp(-0.5 * z2[..., None] / w**2 - A * jnp.log(w), axis=-1)  # equal shares
        idx = jax.random.categorical(pick_key, log_p - log_mixture, axis=-1, shape=(K, B)).T  # (B, K)
    return jnp.take_along_axis(u, idx[..., None], axis=1)


def actor_loss(actor: Actor, batch: Transitions, critic: Critic, alpha: jax.Array, u_correction: jax.Array,
               weights: jax.Array, noise_new: jax.Array, args: Args) -> tuple[jax.Array, tuple[dict, dict]]:
    """Eq. 13 with the Eq. 15 gradient, weighted as in the official code (minimised):
        bc_weight * E[alpha log pi(a_new|s) - log pi(a_data|s)] - E[min_i Q_i(s, a_new)]
        + unbiased_weight * sum_b weights_b mean_k log pi(a_mcmc_bk | s_b)
    The last term's gradient is unbiased_weight * grad E_s[log E_pi exp Q] (its samples are constants)."""
    mu, log_std = jax.vmap(actor)(batch.obs)
    _, new_action, log_pi = reparameterise(mu, log_std, noise_new)
    q_new = jax.vmap(critic)(batch.obs, new_action).min(axis=-1)
    log_pi_data = tanh_gaussian_log_prob(pre_tanh(batch.action), mu, log_std)
    bc_part = args.bc_weight * (alpha * log_pi.mean() - (0.0 if args.objective == "no-ba" else log_pi_data.mean()))
    q_part = -q_new.mean()
    metrics = {"log_pi_data": log_pi_data.mean(), "entropy": -log_pi.mean(), "actor_bc": bc_part, "actor_q": q_part}
    loss = bc_part + q_part
    if args.objective in ("misa", "no-ba", "official"):  # the Eq. 15 correction
        log_pi_correction = tanh_gaussian_log_prob(u_correction, mu[:, None], log_std[:, None])  # (B, K)
        correction = args.unbiased_weight * jnp.sum(weights * log_pi_correction.mean(axis=1))
        loss = loss + correction
        metrics.update(log_pi_correction=log_pi_correction.mean(), actor_correction=correction)
    return loss, ({"actor_loss": loss, **metrics}, {"log_pi": log_pi})


def alpha_loss(log_alpha: jax.Array, log_pi: jax.Array, target_entropy: float) -> jax.Array:
    """SAC's automatic temperature: alpha grows while the policy's entropy is below the target."""
    return -(log_alpha * (jax.lax.stop_gradient(log_pi) + target_entropy)).mean()


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


def train_step(state: AgentState, batch: Transitions, noise: Noise, improved_samples: Callable, args: Args,
               opt: Optimisers) -> tuple[AgentState, dict]:
    """One MISA update given its random draws: the minibatch, the losses' normal draws, and
    `improved_samples(actor, critic, critic_extras, log_step) -> (u (B, K, A), diagnostics)`, the HMC
    draws of p(a|s) ∝ pi(a|s) exp Q(s, a). Critics (Eq. 12), Lagrange multiplier, samples of p, actor
    (Eq. 13/15), temperature, targets; deterministic given the draws (tests/test_official_parity.py
    runs it on the official code's recorded update)."""
    multiplier = jnp.clip(jnp.exp(state.log_lagrange), 0.0, 1e6) if args.lagrange else 1.0
    gamma_1 = args.min_q_weight * multiplier * (args.objective != "ba")  # BA: no Q regulariser
    budget = lagrange_budget(args) if args.lagrange else 0.0

    # critics
    (_, (c_metrics, c_extras)), grads = eqx.filter_value_and_grad(critic_loss, has_aux=True)(
        state.critic, batch, state.actor, state.critic_target, gamma_1, budget, noise, args)
    critic, critic_opt = apply_grads(opt.critic, state.critic, state.critic_opt, grads)

    # Lagrange multiplier on gamma_1
    log_lagrange, lagrange_opt = state.log_lagrange, state.lagrange_opt
    if args.lagrange:
        lagrange_grad = jax.grad(lagrange_loss)(state.log_lagrange, c_extras["gaps"], args)
        log_lagrange, lagrange_opt = apply_grads(opt.lagrange, state.log_lagrange, state.lagrange_opt, lagrange_grad)

    # the critic the actor improves on: the one just updated (Algorithm 1) or the pre-update one (official)
    actor_critic = critic if args.actor_sees == "updated" else state.critic

    # samples of the improved policy p(a|s) ∝ pi(a|s) exp Q(s, a) for the Eq. 15 correction; with
    # --objective official they are the dataset actions, as the official sampler (which never moves) gives
    u_correction = jnp.broadcast_to(pre_tanh(batch.action)[:, None], noise.policy.shape)
    hmc_log_step, hmc_metrics = state.hmc_log_step, {}
    if args.objective in ("misa", "no-ba"):
        u_correction, hmc_metrics = improved_samples(state.actor, actor_critic, c_extras, state.hmc_log_step)
        hmc_log_step = hmc_metrics.pop("log_step")  # the next update's step, moved by this one's acceptance
    _, weights = mi_bound(c_extras["q_samples_min"], jnp.zeros(args.batch_size), args.temperature)

    # actor, then the entropy temperature
    alpha = jnp.exp(state.log_alpha)
    (_, (a_metrics, a_extras)), grads = eqx.filter_value_and_grad(actor_loss, has_aux=True)(
        state.actor, batch, actor_critic, alpha, u_correction, weights, noise.new, args)
    actor, actor_opt = apply_grads(opt.actor, state.actor, state.actor_opt, grads)
    target_entropy = -batch.action.shape[1] if args.target_entropy is None else args.target_entropy
    a_grad = jax.grad(alpha_loss)(state.log_alpha, a_extras["log_pi"], target_entropy)
    log_alpha, alpha_opt = apply_grads(opt.alpha, state.log_alpha, state.alpha_opt, a_grad)

    state = AgentState(actor=actor, critic=critic, critic_target=polyak(state.critic_target, critic, args.tau),
                       log_alpha=log_alpha, log_lagrange=log_lagrange, hmc_log_step=hmc_log_step, actor_opt=actor_opt,
                       critic_opt=critic_opt, alpha_opt=alpha_opt, lagrange_opt=lagrange_opt)
    return state, {**c_metrics, **a_metrics, **hmc_metrics, "alpha": alpha, "gamma_1": gamma_1}


def update(state: AgentState, dataset: Transitions, key: jax.Array, args: Args,
           opt: Optimisers) -> tuple[AgentState, dict]:
    """One MISA update: every random number of it is drawn here (the minibatch, the losses' normal
    draws, the HMC chains' starts and keys), then `train_step` takes the update on them."""
    batch_key, noise_key, start_key, hmc_key = jax.random.split(key, 4)
    batch = draw_minibatch(dataset, batch_key, args.batch_size)
    noise = draw_noise(noise_key, args.batch_size, args.num_samples, batch.action.shape[1])

    def improved_samples(actor: Actor, critic: Critic, critic_extras: dict, log_step: jax.Array):
        if args.hmc_start == "dataset":  # the official start: one point per state (B, 1, A)
            start = pre_tanh(batch.action)[:, None]
        else:  # the best of policy and widened-policy candidates (an importance resample without the fit)
            start = chain_starts(actor, critic, batch.obs, critic_extras["u_policy"], start_key, args)
        return sample_improved_actions(actor, critic, batch.obs, start, log_step, hmc_key, args)

    return train_step(state, batch, noise, improved_samples, args, opt)


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
    args = resolve_hmc_chains(args)  # as resolve_args does, for callers that set every preset themselves
    opt = optimisers(args)

    def init(key: jax.Array) -> AgentState:
        actor_key, critic_key = jax.random.split(key)
        actor = Actor(obs_dim, act_dim, args, key=actor_key)
        critic = Critic(obs_dim, act_dim, args, key=critic_key)
        log_alpha, log_lagrange = jnp.zeros(()), jnp.full((), args.lagrange_init)
        return AgentState(actor, critic, critic, log_alpha, log_lagrange, jnp.full((), np.log(args.hmc_step_size)),
                          opt.actor.init(eqx.filter(actor, eqx.is_inexact_array)),
                          opt.critic.init(eqx.filter(critic, eqx.is_inexact_array)),
                          opt.alpha.init(log_alpha), opt.lagrange.init(log_lagrange))

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
# Per-domain settings that differ from the defaults above (paper, Section 5 and Appendix; official code).
PRESETS = {
    "locomotion": dict(num_layers=2, lagrange=False, lagrange_tau=10.0, reward_norm=False, reward_scale=1.0,
                       reward_bias=0.0, eval_episodes=10),  # lagrange_tau unused while lagrange is off
    "antmaze": dict(num_layers=3, lagrange=True, lagrange_tau=10.0, reward_norm=False, reward_scale=4.0,
                    reward_bias=-2.0, eval_episodes=100),
    "adroit": dict(num_layers=2, lagrange=True, lagrange_tau=3.0, reward_norm=True, reward_scale=1.0,
                   reward_bias=0.0, eval_episodes=10),
    "kitchen": dict(num_layers=2, lagrange=True, lagrange_tau=3.0, reward_norm=True, reward_scale=1.0,
                    reward_bias=0.0, eval_episodes=10),
}


def resolve_args(args: Args, domain: str, rewards: np.ndarray | None = None) -> Args:
    """The effective config: every field left at None comes from the preset of the dataset's domain
    (`EnvSpec.domain`). With reward_norm, `rewards` (the dataset's) set reward_scale and reward_bias."""
    preset = dict(PRESETS[domain])
    if args.reward_scale is not None or args.reward_bias is not None:
        preset["reward_norm"] = False  # an explicit affine transform replaces the preset's scaling
    if args.lagrange_tau is not None:
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
    return resolve_hmc_chains(args)


def activation_bytes(args: Args) -> int:
    """One seed's minibatch activations, roughly, for the memory check before a run (common.runlog.check_memory):
    one minibatch's hidden layers, float32, for the K policy actions and the data action per state
    through the twin critic, forward only (a lower bound: the backward pass keeps more)."""
    return 4 * args.batch_size * (args.num_samples + 1) * args.hidden_dim * args.num_layers * 2


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


# flags of earlier versions, refused with the one that replaced them
REPLACED = {"--no-unbiased": "--objective misa-biased", "--unbiased": "--objective misa", "--ba-only": "--objective ba",
            "--no-ba": "--objective no-ba", "--correction": "--objective official (was --correction dataset)"}

if __name__ == "__main__":
    from common import runlog

    runlog.cli(main, Args, REPLACED)

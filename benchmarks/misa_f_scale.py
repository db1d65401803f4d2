"""What MISA-f's critic loss is made of as Q grows to a trained critic's scale.

    python benchmarks/misa_f_scale.py --out results/misa_f_scale.md

On one minibatch of ours/Hopper-v5/medium-replay, a freshly initialised misa_f.py actor and critics whose
output bias (online and target alike) is moved so that Q on the data sits at each level of --levels
(Hopper's returns put a trained critic's Q in the hundreds: r / (1 - discount) ~ 3 / 0.01). For each
level: the TD part and the regulariser part of the critic loss (gamma_1 = 5, no Lagrange), the batch
shift c that misa_f.py's bound subtracts (0 unless log E_pi exp Q > 30), the exact f-bound's value in
float64 (what the paper's formula gives), and the norms of each part's gradient over the critics'
parameters, which is what the optimiser sees (Adam divides out the scale, not the direction).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from algorithms import misa_f
from common import data

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    env: str = "ours/Hopper-v5/medium-replay"
    levels: list[float] = dataclasses.field(default_factory=lambda: [1.0, 10.0, 30.0, 100.0, 300.0])
    """mean Q on the data to shift the critics to"""
    seed: int = 0
    out: str | None = "results/misa_f_scale.md"


def grad_norm(tree) -> float:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float64) ** 2) for x in leaves)))


def main(cfg: Config) -> None:
    raw, spec = data.load(cfg.env)
    args = misa_f.resolve_args(misa_f.Args(), spec.domain, raw.reward)
    dataset = misa_f.Transitions(obs=jnp.asarray(raw.obs), action=jnp.asarray(raw.action),
                                 reward=jnp.asarray(raw.reward, jnp.float32), next_obs=jnp.asarray(raw.next_obs),
                                 done=jnp.asarray(raw.done))
    key_actor, key_critic, key_batch, key_noise = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
    actor = misa_f.Actor(spec.obs_dim, spec.act_dim, args, key=key_actor)
    critic = misa_f.Critic(spec.obs_dim, spec.act_dim, args, key=key_critic)
    batch = misa_f.draw_minibatch(dataset, key_batch, args.batch_size)
    noise = misa_f.draw_noise(key_noise, args.batch_size, args.num_samples, spec.act_dim)
    q0 = float(jax.vmap(critic)(batch.obs, batch.action).mean())
    rows = []
    for level in cfg.levels:
        shifted = eqx.tree_at(lambda c: c.nets.layers[-1].bias, critic, critic.nets.layers[-1].bias + (level - q0))
        loss_of = lambda weight: eqx.filter_value_and_grad(misa_f.critic_loss, has_aux=True)(
            shifted, batch, actor, shifted, weight, 0.0, noise, args)
        (td, (metrics, extras)), td_grads = loss_of(0.0)
        (total, _), total_grads = loss_of(args.min_q_weight)
        reg_grads = jax.tree.map(lambda a, b: a - b, total_grads, td_grads)  # the loss is linear in the weight
        q = np.asarray(extras["q_samples_min"], np.float64)  # (B, K): Q of the policy's actions, min over the twins
        log_z_state = np.log(np.mean(np.exp(q - q.max(1, keepdims=True)), axis=1)) + q.max(1)  # log E_pi exp Q per state
        c = max(0.0, float(log_z_state.max()) - 30.0)
        log_mean_exp = np.log(np.mean(np.exp(log_z_state - log_z_state.max()))) + log_z_state.max()
        exact = np.exp(log_mean_exp - 1.0) - float(metrics["q_data"])  # E_{s,a~pi} exp(Q - 1) - E_D[Q], float64
        rows.append(dict(level=level, q_data=float(metrics["q_data"]), td=float(td), reg=float(total - td), c=c,
                         exact=exact, td_grad=grad_norm(td_grads), reg_grad=grad_norm(reg_grads)))
        print(rows[-1], flush=True)
    lines = ["# MISA-f's critic loss at a trained critic's Q", "",
             f"Command: `python benchmarks/misa_f_scale.py` (one minibatch of `{cfg.env}`, B = {args.batch_size}, "
             f"K = {args.num_samples}, gamma_1 = {args.min_q_weight}; fresh networks, the critics' output bias moved so that "
             "Q on the data is the level; online and target critics alike).", "",
             "| Q on the data | TD part | regulariser part (gamma_1 * sum over both critics) | shift c | exact f-bound, float64 (min critic) | grad norm: TD | grad norm: regulariser |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['q_data']:.1f} | {r['td']:.3g} | {r['reg']:.3g} | {r['c']:.1f} | {r['exact']:.3g} | {r['td_grad']:.3g} | "
              f"{r['reg_grad']:.3g} |" for r in rows]
    print("\n".join(lines))
    if cfg.out:
        (ROOT / cfg.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Config))

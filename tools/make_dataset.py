"""Make offline datasets ourselves, following D4RL's protocol for its gym-locomotion data.

    python -m tools.make_dataset --env Hopper-v5 --sac-steps 300000          # train, then write 5 splits
    python -m tools.make_dataset --env Hopper-v5 --describe                  # statistics of the written files

1. Train one online SAC agent (algorithms/sac.py, 256-256 networks, auto-entropy) on the gymnasium env,
   keeping every transition it sees and a policy checkpoint every `checkpoint_every` env steps,
   each evaluated on `eval_episodes` deterministic episodes. Everything lives in `--work-dir`;
   rerunning the same command continues an interrupted run from its last checkpoint (a larger
   `--sac-steps` extends a finished one; the result is the same as one longer run).
2. Reference scores, stored in every file: `ref_min_score` = mean return of uniform-random actions,
   `ref_max_score` = mean return of the expert (final) policy, deterministic, each over
   `ref_episodes` (100) episodes.
3. Splits (D4RL's definitions, our names):
   random         `transitions` steps of uniform-random actions in [-1, 1]
   medium         `transitions` steps of the *stochastic* policy of the first checkpoint whose
                  deterministic `eval_episodes`-episode mean return is about `medium_fraction` (1/3)
                  of the expert's, measured from the random policy: the first checkpoint with
                  |(R - ref_min) / (ref_max - ref_min) - 1/3| <= medium_tolerance; if none is
                  that close, the closest one (the choice is stored in the file)
   medium-replay  every transition the SAC run saw up to and including that checkpoint's step,
                  its initial uniform-random steps included
   expert         `transitions` steps of the stochastic final policy
   medium-expert  medium, then expert (2 x transitions rows)
   Rollouts reset the env only after an episode ends; the episode cut by the size budget has its
   last row marked as a time-out. `terminals` = gymnasium `terminated`, `timeouts` = `truncated`
   and not terminated: never both set.

Naming: `ours/<GymnasiumEnvId>/<split>`, file `<out-dir>/<GymnasiumEnvId>/<split>.hdf5`
(default `datasets/ours/Hopper-v5/medium.hdf5`), read by `common.data.load("ours/Hopper-v5/medium")`.
These are *not* D4RL datasets (gymnasium v5 envs on MuJoCo 3, our own SAC, smaller budgets);
never compare their normalised scores with published D4RL numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import shlex
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]

from algorithms import sac
from common import data, evaluation, runlog

SPLITS = ("random", "medium", "medium-replay", "expert", "medium-expert")
NAMESPACE = "ours"


@dataclasses.dataclass
class Args:
    """Generate the D4RL-protocol splits of one gymnasium env (see the module docstring)."""

    # --- Experiment ---
    env: str = "Hopper-v5"
    """gymnasium environment id"""
    env_kwargs: str = "{}"
    """JSON dict of keyword arguments for gymnasium.make (stored in the files)"""
    seed: int = 0
    """seed of the SAC run and of every rollout"""
    out_dir: str = "datasets/ours"
    """where <env>/<split>.hdf5 files are written (relative paths are taken from the repo root)"""
    work_dir: str | None = None
    """SAC run, replay buffer, checkpoints and cached reference scores (default runs/make_dataset/<env>)"""
    splits: tuple[str, ...] = SPLITS
    """which splits to write"""
    describe: bool = False
    """only print the statistics of the files already in --out-dir for --env (and, when --work-dir exists,
    the SAC learning curve, reference scores and wall times), then exit"""
    sac_only: bool = False
    """only train (or continue training) SAC; write no dataset"""
    progress: bool = True
    """show tqdm progress bars"""

    # --- SAC (algorithms/sac.py; one seed) ---
    sac_steps: int = 1_000_000
    """environment steps of the SAC run (D4RL trained to convergence; we can afford less)"""
    sac_hidden_dim: int = 256
    """width of the two hidden layers of the SAC networks"""
    sac_learning_starts: int = 5000
    """initial uniform-random env steps of the SAC run (part of medium-replay)"""
    sac_batch_size: int = 256
    """SAC minibatch size"""
    sac_update_every: int = 10
    """env steps per compiled chunk of as many SAC updates"""
    checkpoint_every: int = 5000
    """env steps between policy checkpoints (candidates for medium)"""
    eval_episodes: int = 10
    """deterministic episodes evaluating each checkpoint"""

    # --- Splits ---
    transitions: int = 100_000
    """transitions of each rolled-out split (random, medium, expert; medium-expert has twice as many)"""
    medium_fraction: float = 1 / 3
    """medium policy's target return as a fraction of the expert's, measured from the random policy"""
    medium_tolerance: float = 0.05
    """accepted distance from medium_fraction (in the same normalised units)"""
    medium_step: int | None = None
    """use the checkpoint at this env step as medium instead of the rule"""
    ref_episodes: int = 100
    """episodes for each reference score"""
    drop_infos: tuple[str, ...] = ()
    """splits written without infos/qpos and infos/qvel (to save space)"""


# The range of every numeric flag, checked before any work (common.runlog.check: one message, exit 2).
RULES = {
    "seed": ">= 0", "sac_steps": ">= 1", "sac_hidden_dim": ">= 1", "sac_learning_starts": ">= 0", "sac_batch_size": ">= 1",
    "sac_update_every": ">= 1", "checkpoint_every": ">= 1", "eval_episodes": ">= 1", "transitions": ">= 2",
    "medium_fraction": "(0, 1)", "medium_tolerance": ">= 0", "medium_step": ">= 1", "ref_episodes": ">= 1",
}


def check_args(args: Args) -> None:
    """Every setting's range (RULES) and this tool's combinations of them: one UserError listing all."""
    problems = [f"unknown split {s!r} (known: {', '.join(SPLITS)})" for s in args.splits if s not in SPLITS]
    problems += [f"--drop-infos: unknown split {s!r}" for s in args.drop_infos if s not in SPLITS]
    if args.medium_step is not None and args.checkpoint_every >= 1 and args.medium_step % args.checkpoint_every:
        problems.append(f"--medium-step must be a multiple of --checkpoint-every ({args.checkpoint_every})")
    # what sac.py would refuse, in this tool's names, before the work dir is made
    if args.checkpoint_every >= 1 and args.sac_steps >= 1 and args.sac_steps % args.checkpoint_every:
        problems.append(f"--sac-steps ({args.sac_steps}) must be a multiple of --checkpoint-every ({args.checkpoint_every})")
    if args.sac_update_every >= 1 and args.checkpoint_every >= 1 and args.checkpoint_every % args.sac_update_every:
        problems.append(f"--checkpoint-every ({args.checkpoint_every}) must be a multiple of --sac-update-every "
                        f"({args.sac_update_every})")
    if args.sac_learning_starts < args.sac_batch_size:
        problems.append(f"--sac-learning-starts ({args.sac_learning_starts}) must be >= --sac-batch-size ({args.sac_batch_size})")
    runlog.check(args, RULES, problems)


def repo_path(p: str | Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def dataset_name(env: str, split: str) -> str:
    return f"{NAMESPACE}/{env}/{split}"


def sac_args(args: Args, sac_dir: Path) -> sac.Args:
    return sac.Args(env=args.env, env_kwargs=args.env_kwargs, num_seeds=1, seed=args.seed,
                    total_steps=args.sac_steps, learning_starts=args.sac_learning_starts,
                    checkpoint_every=args.checkpoint_every, eval_episodes=args.eval_episodes,
                    run_dir=str(sac_dir), resume=(sac_dir / "checkpoint.eqx").exists(), progress=args.progress,
                    batch_size=args.sac_batch_size, hidden_dim=args.sac_hidden_dim, update_every=args.sac_update_every)


# ============================================================================ rollouts
def rollout(env_id: str, env_kwargs: str, n: int, seed: int, actor: sac.Actor | None, desc: str,
            show: bool) -> dict[str, np.ndarray]:
    """n transitions of one env, episode after episode, from the stochastic `actor` (uniform-random
    actions when None), recording qpos/qvel before each step and the log-probability of each action.
    The episode cut by `n` gets a time-out on its last row."""
    env = sac.make_env(env_id, env_kwargs)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    phys = sac.physics_state(env)
    cols = sac.new_buffer(1, n, obs_dim, act_dim, *(None, None) if phys is None else (len(phys[0]), len(phys[1])))
    cols = {k: v[0] for k, v in cols.items()}
    rng = np.random.default_rng([seed, 2])
    key = jax.random.PRNGKey(seed)
    if actor is not None:
        step_fn = sac.fast_jit(lambda a, o, k: _policy_step(a, o, k), actor)
    uniform_logp = np.float32(-act_dim * math.log(2.0))
    obs, _ = env.reset(seed=seed)
    for t in tqdm(range(n), desc=desc, unit="step", dynamic_ncols=True, disable=not show, mininterval=2.0):
        if actor is None:
            action, logp = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32), uniform_logp
        else:
            action, logp, key = step_fn(actor, jnp.asarray(obs, jnp.float32), key)
            action, logp = np.asarray(action), float(logp)
        phys = sac.physics_state(env)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        cols["observations"][t], cols["actions"][t], cols["rewards"][t] = obs, action, reward
        cols["next_observations"][t], cols["action_log_probs"][t] = next_obs, logp
        cols["terminals"][t], cols["timeouts"][t] = terminated, truncated and not terminated
        if phys is not None:
            cols["infos/qpos"][t], cols["infos/qvel"][t] = phys
        obs = env.reset()[0] if (terminated or truncated) else next_obs
    mark_cut(cols)
    env.close()
    return d4rl_keys(cols)


def d4rl_keys(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Buffer keys -> D4RL's: the log-probability of each action lives under infos/."""
    return {("infos/action_log_probs" if k == "action_log_probs" else k): v for k, v in arrays.items()}


def _policy_step(actor: sac.Actor, obs: jax.Array, key: jax.Array):
    key, sub = jax.random.split(key)
    action, logp = sac.sample_action(actor, obs, sub)
    return action, logp, key


def mark_cut(cols: dict[str, np.ndarray]) -> None:
    """An episode cut short by the data budget ends in a time-out (unless it ended anyway)."""
    if not (cols["terminals"][-1] or cols["timeouts"][-1]):
        cols["timeouts"][-1] = True


def reference_scores(args: Args, spec: data.EnvSpec, expert: sac.Actor, work: Path, expert_step: int) -> dict:
    """Mean returns of uniform-random actions and of the deterministic expert over ref_episodes, cached."""
    cache = work / "reference_scores.json"
    key = {"expert_step": expert_step, "episodes": args.ref_episodes, "seed": args.seed}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved
    ref_seed = 1_000_000 + args.seed  # start states differ from the checkpoint evaluations'
    evaluator = evaluation.Evaluator(spec, [ref_seed], args.ref_episodes)
    rng = np.random.default_rng([args.seed, 3])
    t0 = time.time()
    random_returns, _ = evaluator.run(lambda o: rng.uniform(-1.0, 1.0, o.shape[:-1] + (spec.act_dim,)).astype(np.float32))
    stacked = jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, expert)
    expert_returns, expert_lengths = evaluator.run(lambda o: np.asarray(sac.act_deterministic(stacked, jnp.asarray(o))))
    evaluator.close()
    out = {"key": key, "ref_min_score": float(random_returns.mean()), "ref_min_std": float(random_returns.std()),
           "ref_max_score": float(expert_returns.mean()), "ref_max_std": float(expert_returns.std()),
           "expert_mean_length": float(expert_lengths.mean()), "seconds": time.time() - t0}
    cache.write_text(json.dumps(out, indent=2))
    return out


def deterministic_returns(spec: data.EnvSpec, actor: sac.Actor, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` deterministic episodes of one actor, (episodes,)."""
    evaluator = evaluation.Evaluator(spec, [seed], episodes)
    stacked = jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, actor)
    returns, _ = evaluator.run(lambda o: np.asarray(sac.act_deterministic(stacked, jnp.asarray(o))))
    evaluator.close()
    return returns[0]


def select_medium(steps: np.ndarray, returns: np.ndarray, ref_min: float, ref_max: float, fraction: float,
                  tolerance: float, forced: int | None = None) -> tuple[int, str]:
    """(env step of the medium checkpoint, how it was chosen). returns: (C,) checkpoint eval means."""
    progress = (returns - ref_min) / (ref_max - ref_min)
    if forced is not None:
        if forced not in set(steps.tolist()):
            raise SystemExit(f"--medium-step {forced}: no checkpoint at that step (have {steps.tolist()})")
        i = int(np.nonzero(steps == forced)[0][0])
        return int(steps[i]), f"forced by --medium-step; normalised progress {progress[i]:.3f}"
    close = np.nonzero(np.abs(progress - fraction) <= tolerance)[0]
    if close.size:
        i = int(close[0])
        rule = f"first checkpoint with |progress - {fraction:.3f}| <= {tolerance}"
    else:
        i = int(np.argmin(np.abs(progress - fraction)))
        rule = f"no checkpoint within {tolerance} of {fraction:.3f}; closest one"
    return int(steps[i]), f"{rule}; progress = (R - ref_min) / (ref_max - ref_min) = {progress[i]:.3f}"


# ============================================================================ statistics
def episode_stats(arrays: dict[str, np.ndarray], max_episode_steps: int | None) -> dict:
    """Episodes end at terminals | timeouts. Complete episodes: ended by a terminal or by the env's
    time limit (length == max_episode_steps); segments cut by a data budget are not complete."""
    ends = np.nonzero(arrays["terminals"] | arrays["timeouts"])[0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    returns, complete = [], []
    cum = np.concatenate([[0.0], np.cumsum(arrays["rewards"], dtype=np.float64)])
    for s, e in zip(starts, ends):
        returns.append(cum[e + 1] - cum[s])
        complete.append(bool(arrays["terminals"][e]) or (max_episode_steps is not None and e - s + 1 == max_episode_steps))
    returns, complete = np.asarray(returns), np.asarray(complete, bool)
    done = returns[complete]
    return {"transitions": int(len(arrays["rewards"])), "episodes": int(len(ends)), "complete_episodes": int(complete.sum()),
            "return_mean": float(done.mean()) if done.size else float("nan"),
            "return_std": float(done.std()) if done.size else float("nan"),
            "return_min": float(done.min()) if done.size else float("nan"),
            "return_max": float(done.max()) if done.size else float("nan"),
            "terminals": int(arrays["terminals"].sum()), "timeouts": int(arrays["timeouts"].sum()),
            "reward_mean": float(arrays["rewards"].mean())}


def describe_run(work: Path) -> str:
    """Markdown: wall times, reference scores and the SAC learning curve of a maker work dir."""
    lines = []
    if (work / "timing.jsonl").exists():
        lines.append("wall time per phase (timing.jsonl):\n")
        for row in (json.loads(x) for x in (work / "timing.jsonl").read_text().splitlines() if x.strip()):
            what = (f"SAC steps {row['from_step']} -> {row['to_step']}" if row["phase"] == "sac"
                    else f"splits {', '.join(row['splits'])}")
            lines.append(f"- {what}: {row['seconds'] / 60:.1f} min (finished {row['finished'][:19]} UTC)")
        lines.append("")
    for name, label in (("reference_scores.json", "reference scores"), ("medium_returns.json", "medium policy, deterministic")):
        if (work / name).exists():
            lines.append(f"{label}: `{json.dumps(json.loads((work / name).read_text()))}`")
    sac_dir = work / "sac"
    if (sac_dir / "evals.npz").exists():
        evals = sac.read_evals(sac_dir)
        lines += ["", f"SAC checkpoints: deterministic return over {evals['returns'].shape[2]} episodes (seed 0)", "",
                  "| env step | return mean | return std | episode length |", "|---|---|---|---|"]
        for s, r, n in zip(evals["steps"], evals["returns"][:, 0], evals["lengths"][:, 0]):
            lines.append(f"| {int(s):,} | {r.mean():.1f} | {r.std():.1f} | {n.mean():.0f} |")
    return "\n".join(lines)


def describe(out_dir: Path, env: str) -> str:
    """Markdown table of every split file of `env` in out_dir (what results/datasets.md pastes)."""
    import h5py

    rows = []
    for split in SPLITS:
        path = out_dir / env / f"{split}.hdf5"
        if not path.exists():
            continue
        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in ("rewards", "terminals", "timeouts")}
            meta = {k: v[()] for k, v in f["metadata"].items() if isinstance(v, h5py.Dataset)}
            has_infos = "infos/qpos" in f
        meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in meta.items()}
        st = episode_stats(arrays, int(meta["max_episode_steps"]))
        norm = 100 * (st["return_mean"] - meta["ref_min_score"]) / (meta["ref_max_score"] - meta["ref_min_score"])
        rows.append(f"| {meta['dataset_name']} | {st['transitions']:,} | {st['episodes']:,} ({st['complete_episodes']:,}) "
                    f"| {st['return_mean']:.1f} ± {st['return_std']:.1f} | {norm:.1f} | {st['terminals']:,} | {st['timeouts']:,} "
                    f"| {meta.get('policy_step', '-')} | {'yes' if has_infos else 'no'} | {path.stat().st_size / 1e6:.2f} |")
    if not rows:
        return f"no dataset files for {env} in {out_dir}"
    with h5py.File(next(out_dir.glob(f"{env}/*.hdf5")), "r") as f:
        ref = (float(f["metadata/ref_min_score"][()]), float(f["metadata/ref_max_score"][()]), int(f["metadata/ref_score_episodes"][()]))
    total = sum(p.stat().st_size for p in (out_dir / env).glob("*.hdf5")) / 1e6
    head = (f"reference scores ({ref[2]} episodes each): ref_min (uniform random) = {ref[0]:.2f}, "
            f"ref_max (expert, deterministic) = {ref[1]:.2f}; total size {total:.1f} MB\n\n"
            "| dataset | transitions | episodes (complete) | episode return, complete episodes (mean ± std) "
            "| normalised | terminals | timeouts | policy env step | infos/qpos,qvel | MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


# ============================================================================ main
def versions() -> dict[str, str]:
    out = {}
    for name in ("gymnasium", "mujoco", "jax", "equinox", "numpy", "h5py"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def main(args: Args) -> dict[str, Path]:
    check_args(args)
    out_dir = repo_path(args.out_dir)
    work = repo_path(args.work_dir or f"runs/make_dataset/{args.env}")
    if args.describe:
        print(describe(out_dir, args.env))
        if work.exists():
            print("\n" + describe_run(work))
        return {}
    sac_dir = work / "sac"
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m tools.make_dataset " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    # --- 1. SAC (resumes from the work dir's last checkpoint)
    t0 = time.time()
    done_steps = sac.checkpoint_step(sac_dir)
    if done_steps > 0:
        saved = sac.load_args(sac_dir)
        if done_steps > args.sac_steps:
            raise SystemExit(f"{sac_dir} already trained {done_steps} steps > --sac-steps {args.sac_steps}; "
                             "use that budget or another --work-dir")
        print(f"{sac_dir}: SAC checkpoint at step {done_steps} of {args.sac_steps} (settings of the saved run: "
              f"hidden {saved.hidden_dim}, seed {saved.seed})")
    if done_steps < args.sac_steps:
        sac.train(sac_args(args, sac_dir))
    with open(work / "timing.jsonl", "a") as f:
        f.write(json.dumps({"phase": "sac", "from_step": done_steps, "to_step": args.sac_steps,
                            "seconds": time.time() - t0, "finished": datetime.datetime.now(datetime.UTC).isoformat()}) + "\n")
    if args.sac_only:
        return {}

    # --- 2. expert, reference scores, medium checkpoint
    t1 = time.time()
    evals = sac.read_evals(sac_dir)
    steps, eval_returns = evals["steps"], evals["returns"][:, 0]  # (C,), (C, E): one seed
    expert_step = int(steps[-1])
    if expert_step != args.sac_steps:
        raise SystemExit(f"{sac_dir}: last checkpoint is at step {expert_step}, expected {args.sac_steps}")
    spec = sac.env_spec(args.env, args.env_kwargs)
    expert = sac.load_actor(sac_dir, expert_step)
    refs = reference_scores(args, spec, expert, work, expert_step)
    if refs["ref_max_score"] <= refs["ref_min_score"]:
        print(f"WARNING: the expert ({refs['ref_max_score']:.1f}) is no better than uniform-random actions "
              f"({refs['ref_min_score']:.1f}); train longer (--sac-steps) before trusting these splits")
    medium_step, rule = select_medium(steps, eval_returns.mean(1), refs["ref_min_score"], refs["ref_max_score"],
                                      args.medium_fraction, args.medium_tolerance, args.medium_step)
    i_med = int(np.nonzero(steps == medium_step)[0][0])
    medium_cache = work / "medium_returns.json"
    cached = json.loads(medium_cache.read_text()) if medium_cache.exists() else {}
    if cached.get("key") != [medium_step, args.ref_episodes, args.seed]:
        r = deterministic_returns(spec, sac.load_actor(sac_dir, medium_step), args.ref_episodes, 1_000_000 + args.seed)
        cached = {"key": [medium_step, args.ref_episodes, args.seed], "mean": float(r.mean()), "std": float(r.std())}
        medium_cache.write_text(json.dumps(cached, indent=2))
    medium_ref = cached
    print(f"reference scores over {args.ref_episodes} episodes: random {refs['ref_min_score']:.1f}, "
          f"expert (step {expert_step}) {refs['ref_max_score']:.1f}")
    print(f"medium = checkpoint at step {medium_step} (eval return {eval_returns[i_med].mean():.1f}): {rule}")

    common_meta = {
        "env_id": args.env, "env_kwargs": args.env_kwargs, "max_episode_steps": int(spec.max_episode_steps),
        "ref_min_score": refs["ref_min_score"], "ref_max_score": refs["ref_max_score"],
        "ref_score_episodes": args.ref_episodes,
        "ref_min_policy": "uniform random actions in [-1, 1]",
        "ref_max_policy": f"SAC expert (step {expert_step}), deterministic tanh(mean)",
        "algorithm": "SAC", "generator": "tools.make_dataset", "seed": args.seed, "command": command,
        "sac_total_steps": args.sac_steps, "sac_args": json.dumps(dataclasses.asdict(sac.load_args(sac_dir))),
        "medium_step": medium_step, "medium_selection": rule, "expert_step": expert_step,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **{f"version_{k}": v for k, v in versions().items()},
    }

    def policy_meta(step: int) -> dict:
        i = int(np.nonzero(steps == step)[0][0])
        long = medium_ref if step == medium_step else {"mean": refs["ref_max_score"], "std": refs["ref_max_std"]}
        return {"policy_step": step, "policy_eval_return_mean": float(eval_returns[i].mean()),
                "policy_eval_return_std": float(eval_returns[i].std()), "policy_eval_episodes": int(eval_returns.shape[1]),
                "policy_return_ref_episodes_mean": long["mean"], "policy_return_ref_episodes_std": long["std"]}

    # --- 3. splits (rollouts are deterministic given the seed; each is recomputed when needed)
    rolled: dict[str, dict[str, np.ndarray]] = {}

    def get(split: str) -> dict[str, np.ndarray]:
        if split not in rolled:
            seed = args.seed * 1000 + {"random": 1, "medium": 2, "expert": 3}[split]
            actor = None if split == "random" else sac.load_actor(sac_dir, medium_step if split == "medium" else expert_step)
            rolled[split] = rollout(args.env, args.env_kwargs, args.transitions, seed, actor, f"rollout {split}", args.progress)
        return rolled[split]

    written = {}
    for split in args.splits:
        if split in ("random", "medium", "expert"):
            arrays = get(split)
            meta = {"random": {"policy_step": -1, "policy": "uniform random actions in [-1, 1]"},
                    "medium": {**policy_meta(medium_step), "policy": "SAC medium checkpoint, stochastic"},
                    "expert": {**policy_meta(expert_step), "policy": "SAC final policy, stochastic"}}[split]
        elif split == "medium-replay":
            arrays = d4rl_keys(sac.read_buffer(sac_dir, medium_step, seed_index=0))
            mark_cut(arrays)
            meta = {**policy_meta(medium_step), "policy": f"SAC replay buffer: every transition up to env step {medium_step}, "
                    f"the first {args.sac_learning_starts} uniform random"}
        else:  # medium-expert
            med, exp = get("medium"), get("expert")
            arrays = {k: np.concatenate([med[k], exp[k]]) for k in med}
            meta = {"policy_step": expert_step, "policy": f"medium (step {medium_step}) then expert (step {expert_step}), stochastic",
                    "medium_transitions": len(med["rewards"]), "expert_transitions": len(exp["rewards"])}
        assert not (arrays["terminals"] & arrays["timeouts"]).any()
        if split in args.drop_infos:
            arrays = {k: v for k, v in arrays.items() if not k.startswith("infos/q")}
        stats = episode_stats(arrays, spec.max_episode_steps)
        name = dataset_name(args.env, split)
        path = out_dir / args.env / f"{split}.hdf5"
        data.write_d4rl_hdf5(path, arrays, {**common_meta, **meta, "dataset_name": name, "split": split,
                                            "num_episodes": stats["episodes"], "episode_return_mean": stats["return_mean"]})
        written[split] = path
        print(f"wrote {name}: {path} ({stats['transitions']} transitions, {stats['episodes']} episodes, "
              f"mean complete-episode return {stats['return_mean']:.1f}, {path.stat().st_size / 1e6:.1f} MB)")
    with open(work / "timing.jsonl", "a") as f:
        f.write(json.dumps({"phase": "splits", "splits": list(args.splits), "seconds": time.time() - t1,
                            "finished": datetime.datetime.now(datetime.UTC).isoformat()}) + "\n")
    print()
    print(describe(out_dir, args.env))
    return written


if __name__ == "__main__":
    runlog.cli(main, Args)

"""Use a trained agent: evaluate a run's checkpoint again, watch it, export its policy.

    python -m tools.evaluate runs/<run>                     # every seed of the run, its evaluation settings
    python -m tools.evaluate runs/<run> --episodes 100      # more episodes; --seeds 0 2 picks agents
    python -m tools.evaluate runs/<run> --video hopper.mp4  # one rendered episode per agent (.mp4 or .gif)
    python -m tools.evaluate runs/<run> --export policy.onnx

The agents are rebuilt from the run's config.json and checkpoint.eqx by `tools.agent` (which needs
only the algorithm file; `load_agent` is its Python API). Evaluation runs their deterministic policy
through `common.evaluation`, as training does: the same envs and the same start state for each seed
and episode, so with the run's settings the scores equal training's evaluation at the checkpoint's update
(if it has one: --checkpoint-every saves between evaluations too). It prints the normalised score per
seed and mean +- std, and writes the returns and episode lengths to
<run>/evaluations/update<U>_<E>ep_<time>.npz, a new file (training's files are never touched).

--video renders one episode per chosen agent (episode 0, the first of training's evaluation
episodes), one after the other, with MuJoCo's offscreen renderer, at about 25 frames per second of
simulated time; without a display it uses EGL (MUJOCO_GL=egl unless MUJOCO_GL is set; README says
what to install). --export writes the policy of the first chosen seed, observation normalisation
included, as ONNX (jax2onnx), and checks that onnxruntime's actions equal JAX's to 1e-5 on 1000
observations. Either replaces the evaluation; both may be given.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import equinox as eqx
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from common import data, evaluation, runlog, scores
from common.errors import UserError
from tools.agent import Agents, LoadError, load_agents

VIDEO_FPS = 25  # frames per second of simulated time in videos (GIF delays are whole centiseconds; 40 ms is exact)
ONNX_TOLERANCE = 1e-5  # max |onnxruntime - JAX| over the check's actions
HOW_TO_RENDER = ("On Linux without a display MuJoCo renders with EGL: install it (Debian/Ubuntu: apt-get install "
                 "libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0; an NVIDIA driver brings its own) and run with "
                 "MUJOCO_GL=egl (the default here when no display is set), or use OSMesa (apt-get install libosmesa6; "
                 "MUJOCO_GL=osmesa)")


@dataclasses.dataclass
class Args:
    """Evaluate a run's checkpoint again, render it, or export its policy."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """the run directory (runs/<algo>__<env>__seed<seed>__<time>)"""
    episodes: int | None = None
    """evaluation episodes per agent (default: the run's own number)"""
    seeds: list[int] | None = None
    """the agents to use, by seed (default: every seed of the run)"""
    video: str | None = None
    """render one episode per agent into this .mp4 or .gif file (instead of evaluating)"""
    video_size: tuple[int, int] | None = None
    """width and height of the video's frames (default: the env's, 480 480 for MuJoCo envs)"""
    video_steps: int | None = None
    """cut each rendered episode after this many env steps (default: the env's time limit)"""
    export: str | None = None
    """write the first chosen seed's policy to this .onnx file (instead of evaluating)"""
    algorithm: str | None = None
    """the algorithm file to rebuild the agents with (default: algorithms/<algo>.py, as config.json names it)"""


# The range of every numeric flag, checked before anything is loaded (common.runlog.check: one message, exit 2).
RULES = {"episodes": ">= 1", "video_steps": ">= 1"}


def main(args: Args) -> dict:
    check_outputs(args)
    try:
        agents = load_agents(args.run_dir, args.seeds, args.algorithm)
    except LoadError as e:
        raise UserError(str(e)) from None
    if agents.ignored:
        print(f"note: config.json settings that {agents.module.__name__} no longer has (ignored): {', '.join(agents.ignored)}",
              file=sys.stderr)
    spec = env_spec(agents)
    done = {}
    if args.video:
        done["video"] = record(agents, spec, Path(args.video), args.video_size, args.video_steps)
    if args.export:
        done["export"] = export_onnx(agents, Path(args.export))
    if not done:
        done["evaluation"] = evaluate(agents, spec, args.episodes or agents.args.eval_episodes)
    return done


def check_outputs(args: Args) -> None:
    """Every setting and output path, before anything is loaded."""
    problems = []
    for flag, value, kinds in (("--video", args.video, (".mp4", ".gif")), ("--export", args.export, (".onnx",))):
        if value is None:
            continue
        path = Path(value)
        if path.suffix.lower() not in kinds:
            problems.append(f"{flag} {value}: the file must end in {' or '.join(kinds)}")
        elif not path.parent.is_dir():
            problems.append(f"{flag} {value}: the folder {path.parent} does not exist; create it first")
    if args.video_size is not None and min(args.video_size) < 1:
        problems.append(f"--video-size must be positive, got {args.video_size}")
    if args.episodes is not None and (args.video or args.export):
        problems.append("--episodes sets the evaluation, which --video and --export replace: drop one of them")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds names a seed twice: {args.seeds}")
    runlog.check(args, RULES, problems)


def env_spec(agents: Agents) -> data.EnvSpec:
    """The evaluation env of the run: the dataset's (offline files) or the gymnasium id it trained in (sac)."""
    a = agents.args
    if agents.algo == "sac":
        spec = agents.module.env_spec(a.env, a.env_kwargs)
    else:
        raw, spec = data.load(a.env, a.dataset_dir)
        trained_on = agents.config.get("data_sha256")
        if trained_on is not None and data.fingerprint(raw) != trained_on:
            print(f"note: {a.env} now holds other data than this run was trained on (sha256 {trained_on[:12]}...); "
                  "its evaluation env and reference scores are read from it as it is now", file=sys.stderr)
    if (spec.obs_dim, spec.act_dim) != (agents.obs_dim, agents.act_dim):
        raise UserError(f"the checkpoint's agents take {agents.obs_dim}-D observations and {agents.act_dim}-D actions, "
                        f"but {spec.name} has {spec.obs_dim}-D and {spec.act_dim}-D ones: the run's config.json and "
                        "checkpoint do not belong together")
    return spec


def episode_scores(spec: data.EnvSpec, returns: np.ndarray) -> tuple[np.ndarray, str]:
    """Normalised scores of returns (any shape) and what they are; the returns where the dataset has no reference."""
    if spec.ref_min_score is None:
        return returns, "return (no reference scores for this dataset)"
    return scores.normalized(returns, spec.ref_min_score, spec.ref_max_score, spec.name), "normalised score"


# --------------------------------------------------------------------------- evaluation
def evaluate(agents: Agents, spec: data.EnvSpec, episodes: int) -> Path:
    """Evaluate the agents as training does; print the scores; write returns and lengths to a new file."""
    evaluator = evaluation.Evaluator(spec, agents.seeds, episodes)
    t = time.perf_counter()
    returns, lengths = evaluator.run(agents.policy)
    evaluator.close()
    per_episode, label = episode_scores(spec, returns)
    per_seed = per_episode.mean(1)
    trained = training_evaluation(agents)
    print(f"{agents.algo} on {spec.name}, checkpoint at {agents.unit} {agents.update}: "
          f"{label}, {episodes} episodes per seed ({time.perf_counter() - t:.1f} s)")
    for i, (s, v) in enumerate(zip(agents.seeds, per_seed)):
        then = "" if trained is None else f"   (training's evaluation, {trained.shape[1]} episodes: {episode_scores(spec, trained)[0][i].mean():.2f})"
        print(f"  seed {s:>4}: {v:8.2f}{then}")
    print(f"  mean +- std: {per_seed.mean():.2f} +- {per_seed.std():.2f}")

    out = agents.run_dir / "evaluations"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{agents.unit.split()[-1]}{agents.update}_{episodes}ep_{stamp}"
    path, n = out / f"{name}.npz", 1
    while path.exists():  # never replace an earlier evaluation
        path, n = out / f"{name}-{n}.npz", n + 1
    result = {"seeds": np.asarray(agents.seeds), "update": np.int64(agents.update), "returns": returns, "lengths": lengths}
    if spec.ref_min_score is not None:
        result["scores"] = per_episode
    runlog.save_npz(path, **result)
    print(f"returns and episode lengths (seeds x episodes): {path}")
    return path


def training_evaluation(agents: Agents) -> np.ndarray | None:
    """Training's returns (seeds, episodes) of the checkpoint's own evaluation, for the chosen seeds."""
    file, key = ("evals.npz", "steps") if agents.algo == "sac" else ("returns.npz", "updates")
    path = agents.run_dir / file
    if not path.exists():
        return None
    with np.load(path) as saved:
        at = np.nonzero(saved[key] == agents.update)[0]
        if not len(at):
            return None
        run_seeds = [agents.args.seed + i for i in range(agents.args.num_seeds)]
        return saved["returns"][at[-1]][[run_seeds.index(s) for s in agents.seeds]]


# --------------------------------------------------------------------------- video
class Frames(gym.Wrapper):
    """Keeps every `every`-th rendered frame of the current episode (rendering is the slow part)."""

    def __init__(self, env: gym.Env, every: int):
        super().__init__(env)
        self.every, self.frames, self.t = every, [], 0

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.t, self.frames = 0, [self.env.render()]
        return out

    def step(self, action):
        out = self.env.step(action)
        self.t += 1
        if self.t % self.every == 0:
            self.frames.append(self.env.render())
        return out


def record(agents: Agents, spec: data.EnvSpec, path: Path, size: tuple[int, int] | None, steps: int | None) -> Path:
    """Episode 0 of each agent (its first evaluation episode), rendered, one after the other, into `path`."""
    import imageio.v3 as iio

    if sys.platform.startswith("linux") and "MUJOCO_GL" not in os.environ and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ["MUJOCO_GL"] = "egl"  # no display: MuJoCo's offscreen renderer through EGL
    if size is not None:
        spec = dataclasses.replace(spec, eval_env_kwargs={**spec.eval_env_kwargs, "width": size[0], "height": size[1]})
    if steps is not None:
        spec = dataclasses.replace(spec, max_episode_steps=steps)
    spec = tracking_camera(spec)
    fps = check_renderer(spec)
    every = max(1, round(fps / VIDEO_FPS))
    evaluator = evaluation.Evaluator(spec, agents.seeds, 1, make=lambda s: Frames(evaluation.make_env(s, "rgb_array"), every))
    returns, lengths = evaluator.run(agents.policy)
    frames = [f for row in evaluator.envs for f in row[0].frames]
    evaluator.close()
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, np.stack(frames), duration=1000 * every / fps, loop=0)
    else:
        with warnings.catch_warnings():  # imageio-ffmpeg forks and at once execs ffmpeg: JAX's fork warning does not apply
            warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
            iio.imwrite(path, np.stack(frames), fps=fps / every)
    for s, r, n in zip(agents.seeds, returns[:, 0], lengths[:, 0]):
        print(f"  seed {s:>4}: return {r:.1f} in {n} steps")
    print(f"{len(frames)} frames of {frames[0].shape[1]} x {frames[0].shape[0]}, {fps / every:g} per second of simulated "
          f"time (one per {every} env steps): {path}")
    return path


def tracking_camera(spec: data.EnvSpec) -> data.EnvSpec:
    """The spec rendering through the model's tracking camera "track" where it has one (gymnasium's Hopper,
    Walker2d, HalfCheetah, Ant, ...): gymnasium 1.4 renders its MuJoCo envs with a free camera that stays where
    the body started (its default camera config names a body to track, but the camera is not in tracking mode)."""
    import mujoco
    from gymnasium.envs.mujoco import MujocoEnv

    if spec.eval_env_id is None:  # a Minari env: rendered as Minari recovers it
        return spec
    env = evaluation.make_env(spec)
    model = getattr(env.unwrapped, "model", None)
    track = isinstance(env.unwrapped, MujocoEnv) and mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "track") != -1
    env.close()
    return dataclasses.replace(spec, eval_env_kwargs={**spec.eval_env_kwargs, "camera_name": "track"}) if track else spec


def check_renderer(spec: data.EnvSpec) -> float:
    """Render one frame of the env, before any work; its frames per simulated second."""
    env, failure = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GLFW warns before it fails
        try:
            env = evaluation.make_env(spec, "rgb_array")
            env.reset(seed=0)
            frame = env.render()
        except UserError:
            raise
        except Exception as e:  # mujoco.FatalError, EGL/OSMesa/GLFW errors: no usable OpenGL here
            failure = f"{type(e).__name__}: {str(e).strip()[:300]}"
    if failure is not None:
        hook, sys.unraisablehook = sys.unraisablehook, lambda _: None  # a half-made renderer fails again when freed
        try:
            if env is not None:
                env.close()
        except Exception:
            pass
        env = None
        gc.collect()
        sys.unraisablehook = hook
        raise UserError(f"cannot render {spec.eval_env_id or spec.name} (MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')}: "
                        f"{failure}). {HOW_TO_RENDER}")
    fps = env.metadata.get("render_fps") or 30
    env.close()
    if not (isinstance(frame, np.ndarray) and frame.ndim == 3):
        raise UserError(f"{spec.eval_env_id or spec.name} renders no RGB frames (got {type(frame).__name__})")
    return float(fps)


# --------------------------------------------------------------------------- ONNX
def export_onnx(agents: Agents, path: Path) -> Path:
    """The first agent's deterministic policy, observation normalisation included, as ONNX: input `obs`
    (B, obs_dim) float32 raw observations, output `action` (B, act_dim) in [-1, 1]. Checked against JAX."""
    import jax.extend.core
    import onnx
    import onnx_ir
    import onnxruntime
    from jax2onnx import to_onnx

    seed = agents.seeds[0]
    one = dataclasses.replace(agents, seeds=[seed], actors=jax.tree.map(lambda x: x[:1] if eqx.is_array(x) else x, agents.actors))
    # jax2onnx converts eqx.nn.Linear through its own primitive, which cannot be vmapped over the weights
    # (act() maps over stacked seeds); so the policy of one observation is traced to a jaxpr first, with
    # the weights as constants, and that jaxpr, vmapped over a batch of any size, is converted
    single = jax.make_jaxpr(lambda o: one.apply(o[None, None])[0, 0])(jax.ShapeDtypeStruct((agents.obs_dim,), jnp.float32))
    batched = jax.vmap(jax.extend.core.jaxpr_as_fun(single))
    t = time.perf_counter()
    model = to_onnx(lambda obs: batched(obs)[0], [("B", agents.obs_dim)], model_name=f"{agents.algo}_seed{seed}",
                    input_names=["obs"], output_names=["action"])
    model = onnx_ir.from_proto(model)  # (read back: the IR jax2onnx returns keeps uses of nodes it removed)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)  # constants of the trace that no node reads
    model = onnx_ir.to_proto(model)
    model.doc_string = (f"{agents.algo} policy of seed {seed} at {agents.unit} {agents.update} of {agents.run_dir.name}: "
                        f"obs (B, {agents.obs_dim}) float32 raw observations -> action (B, {agents.act_dim}) in [-1, 1] "
                        "(the env's action bounds map linearly onto [-1, 1])")

    rng = np.random.default_rng(0)  # 1000 observations around the data (mean +- 2 std where the run normalises)
    mean = one.obs_mean if one.obs_mean is not None else np.zeros(agents.obs_dim, np.float32)
    std = one.obs_std if one.obs_std is not None else np.ones(agents.obs_dim, np.float32)
    obs = (mean + 2 * std * rng.standard_normal((1000, agents.obs_dim))).astype(np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gap = float(np.abs(session.run(None, {"obs": obs})[0] - one.policy(obs[None])[0]).max())
    if not gap <= ONNX_TOLERANCE:
        raise RuntimeError(f"the ONNX policy differs from JAX's by {gap:.2e} > {ONNX_TOLERANCE:g}: a conversion bug, not written")
    onnx.checker.check_model(model)
    runlog.write_atomic(path, lambda f: f.write(model.SerializeToString()), binary=True)
    print(f"seed {seed}'s policy at {agents.unit} {agents.update} -> {path} ({path.stat().st_size / 1024:.0f} KiB, "
          f"{time.perf_counter() - t:.1f} s); onnxruntime equals JAX on 1000 observations (max |difference| {gap:.1e})")
    return path


if __name__ == "__main__":
    runlog.cli(main, Args)

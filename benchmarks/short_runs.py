"""Short runs of every algorithm script on one dataset, collected into a markdown table.

    python benchmarks/short_runs.py --env ours/Hopper-v5/medium --algos td3_bc misa misa_dv misa_f \
        --num-seeds 2 --num-updates 1000 --extra "misa*:--num-samples 10"

Each run is the script itself, launched as a user would, into runs/short/<algo>; the table gives
the final normalised score per seed, mean +- std, wall time and the exact command. These are
smoke-sized budgets on CPU, far from the paper's 1M updates: they show that each script runs end to
end on the data and what it reaches in that budget, nothing more.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    env: str = "ours/Hopper-v5/medium"
    """dataset every algorithm trains on"""
    algos: list[str] = dataclasses.field(default_factory=lambda: ["td3_bc", "cql", "misa", "misa_dv", "misa_f"])
    """algorithm files to run"""
    num_seeds: int = 2
    """seeds per run"""
    num_updates: int = 1000
    """updates per agent"""
    eval_episodes: int = 5
    """evaluation episodes per agent"""
    extra: list[str] = dataclasses.field(default_factory=list)
    """per-algorithm extra flags, 'pattern:--flag value' (pattern is a glob on the algorithm name)"""
    out: str = "results/short_runs.md"
    """markdown file the section is appended to"""


def main(cfg: Config) -> None:
    rows = []
    for algo in cfg.algos:
        flags = [f for item in cfg.extra if fnmatch.fnmatch(algo, item.partition(":")[0])
                 for f in shlex.split(item.partition(":")[2])]
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in "_".join(flags))
        run_dir = (ROOT / "runs" / "short" / f"{algo}__{cfg.env.replace('/', '_')}__{cfg.num_updates}upd"
                   f"_{cfg.num_seeds}seeds{'__' + tag if tag else ''}")  # a new budget never reuses an old run
        cmd = [sys.executable, f"algorithms/{algo}.py", "--env", cfg.env, "--num-seeds", str(cfg.num_seeds),
               "--num-updates", str(cfg.num_updates), "--eval-every", str(cfg.num_updates),
               "--log-every", str(min(cfg.num_updates, 500)), "--eval-episodes", str(cfg.eval_episodes),
               "--run-dir", str(run_dir.relative_to(ROOT))]
        cmd += flags
        if (run_dir / "results.json").exists():
            print(f"{algo}: {run_dir} already finished, reusing it")
            wall = json.loads((run_dir / "wall_time.json").read_text())["seconds"]
        else:
            resume = ["--resume"] if (run_dir / "checkpoint.eqx").exists() else []
            print("running:", shlex.join(cmd + resume), flush=True)
            t = time.time()
            subprocess.run(cmd + resume, cwd=ROOT, check=True)
            wall = time.time() - t
            (run_dir / "wall_time.json").write_text(json.dumps({"seconds": wall}))
        res = json.loads((run_dir / "results.json").read_text())
        rows.append((algo, res, wall, shlex.join(["python"] + cmd[1:])))
    lines = [f"\n## {cfg.env}: {cfg.num_updates} updates x {cfg.num_seeds} seeds ({time.strftime('%Y-%m-%d', time.gmtime())})\n",
             f"Made by `python benchmarks/short_runs.py {shlex.join(sys.argv[1:])}` on a 2-core CPU machine.\n",
             f"| algorithm | final {rows[0][1]['metric']} per seed | mean +- std | episodes/seed | wall time |",
             "|---|---|---|---|---|"]
    for algo, res, wall, _ in rows:
        per_seed = ", ".join(f"{v:.1f}" for v in res["final_per_seed"])
        lines.append(f"| {algo} | {per_seed} | {res['final_mean']:.1f} +- {res['final_std']:.1f} | "
                     f"{res['episodes_per_seed']} | {wall / 60:.1f} min |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for *_, c in rows]
    with open(ROOT / cfg.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Config))

"""Build results/README.md (tables + learning-curve PNGs) from the committed run summaries.

    python benchmarks/report.py

Reads `results/summaries/<sweep>/*.json` (written by `benchmarks/sweep.py` when a run finishes)
and `results/speed.json` (written by `benchmarks/speed.py`); nothing else. Every number in the
README it writes comes from those files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path


import numpy as np
import tyro

from benchmarks import paper_scores
from benchmarks import sweep as sweeps

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"td3_bc": "TD3+BC", "cql": "CQL", "misa": "MISA", "misa_dv": "MISA-DV", "misa_f": "MISA-f"}


@dataclasses.dataclass
class Config:
    results: str = "results"
    """folder holding summaries/ and speed.json; README.md and plots/ are written there"""


def load_summaries(results: Path) -> dict[str, list[dict]]:
    by_sweep: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((results / "summaries").glob("*/*.json")):
        s = json.loads(path.read_text())
        by_sweep[s["sweep"]].append(s)
    return by_sweep


def cell(s: dict | None) -> str:
    if s is None:
        return "not run"
    return f"{s['final_mean']:.1f} ± {s['final_std']:.1f}"


def budget(runs: list[dict]) -> str:
    """The settings every run of a table shares, read from the runs' own configs."""
    args = [r["args"] for r in runs]
    parts = []
    for key, what in [("num_updates", "updates"), ("num_seeds", "seeds per run"), ("hidden_dim", "hidden units"),
                      ("num_layers", "hidden layers"), ("batch_size", "batch"), ("eval_episodes", "evaluation episodes per seed")]:
        values = sorted({a.get(key) for a in args if a.get(key) is not None})
        if values:
            parts.append(f"{'/'.join(str(v) for v in values)} {what}")
    return ", ".join(parts)


def plot_curves(runs: list[dict], dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in runs:
        x = np.asarray(r["curve"]["updates"])
        y = np.asarray([[v if v is not None else np.nan for v in row] for row in r["curve"]["per_seed"]], float)
        mean, std = np.nanmean(y, 1), np.nanstd(y, 1)
        ax.plot(x, mean, marker="o", ms=3, label=r["label"])
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("updates")
    ax.set_ylabel(runs[0]["metric"])
    ax.set_title(dataset, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_section(name: str, runs: list[dict], results: Path) -> list[str]:
    sw = sweeps.SWEEPS.get(name)
    labels = list(sw.variants) if sw else sorted({r["label"] for r in runs})
    datasets = list(sw.datasets) if sw else sorted({r["dataset"] for r in runs})
    labels = [lab for lab in labels if any(r["label"] == lab for r in runs)]
    datasets = [d for d in datasets if any(r["dataset"] == d for r in runs)]
    index = {(r["label"], r["dataset"]): r for r in runs}
    algo_of = {r["label"]: r["algo"] for r in runs}
    with_paper = [lab for lab in labels if lab == algo_of[lab] and any(
        paper_scores.paper_score(d, algo_of[lab]) is not None for d in datasets)]

    out = [f"## Sweep `{name}`", ""]
    if sw:
        out += [f"{sw.description}.", ""]
    machines = sorted({r["machine"] for r in runs})
    total_h = sum(r["wall_time_s"] for r in runs) / 3600
    out += [f"- **Budget**: {budget(runs)}; flags of each variant in the commands below.",
            f"- **Machine**: {'; '.join(machines)}. Total wall time {total_h:.1f} h for {len(runs)} runs "
            f"(each run trains all its seeds at once, vmapped). Code: commit "
            f"{', '.join(sorted({(r.get('git_commit') or '?')[:7] for r in runs}))}.",
            f"- **Reproduce**: `python benchmarks/sweep.py run {name}` then `python benchmarks/report.py`.",
            f"- **Score**: final {runs[0]['metric']} (evaluation after the last update), mean ± std over seeds; "
            f"{'/'.join(str(e) for e in sorted({r['episodes_per_seed'] for r in runs}))} evaluation episodes per seed.", ""]
    if any(d.startswith("ours/") for d in datasets):
        out += ["`ours/...` datasets are this project's own (see `datasets.md`), **not D4RL**: their scores "
                "use their own reference returns and cannot be compared with published D4RL numbers, so no "
                "paper column is shown for them.", ""]

    header = ["dataset"]
    for lab in labels:
        header.append(NAMES.get(lab, lab))
        if lab in with_paper:
            header.append(f"{NAMES.get(lab, lab)} (paper)")
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    totals: dict[str, list[float]] = defaultdict(list)
    for d in datasets:
        row = [f"`{d}`"]
        for lab in labels:
            s = index.get((lab, d))
            row.append(cell(s))
            if s is not None:
                totals[lab].append(s["final_mean"])
            if lab in with_paper:
                p = paper_scores.paper_score(d, algo_of[lab])
                row.append("–" if p is None else f"{p:.1f}")
        out.append("| " + " | ".join(row) + " |")
    if len(datasets) > 1:
        row = ["**total**"]
        for lab in labels:
            complete = len(totals[lab]) == len(datasets)
            row.append(f"**{sum(totals[lab]):.1f}**" if complete else "incomplete")
            if lab in with_paper:
                ps = [paper_scores.paper_score(d, algo_of[lab]) for d in datasets]
                row.append(f"{sum(ps):.1f}" if all(p is not None for p in ps) else "–")
        out.append("| " + " | ".join(row) + " |")
    if with_paper:
        out += ["", f"Paper columns: {paper_scores.PAPER_SOURCE} (`benchmarks/paper_scores.py`)."]

    out += ["", "Wall time per run (minutes, all seeds together, compile and evaluation included):", "",
            "| dataset | " + " | ".join(NAMES.get(lab, lab) for lab in labels) + " |",
            "|" + "---|" * (len(labels) + 1)]
    for d in datasets:
        out.append(f"| `{d}` | " + " | ".join(
            f"{index[(lab, d)]['wall_time_s'] / 60:.1f}" if (lab, d) in index else "–" for lab in labels) + " |")

    out += ["", "Learning curves (mean ± std over seeds of the evaluation score):", ""]
    for d in datasets:
        png = Path("plots") / name / f"{sweeps.slug(d)}.png"
        plot_curves([index[(lab, d)] for lab in labels if (lab, d) in index], d, results / png)
        out.append(f"![{d}]({png.as_posix()})")
    out += ["", "<details><summary>Commands</summary>", ""]
    out += [f"- `{index[(lab, d)]['command']}`" for d in datasets for lab in labels if (lab, d) in index]
    out += ["", "</details>", ""]
    return out


def speed_section(results: Path) -> list[str]:
    path = results / "speed.json"
    if not path.exists():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for row in rec["rows"]:
            latest[(rec["machine"], row["algo"], row["num_seeds"])] = {**row, "argv": rec["argv"]}
    out = ["## Updates per second", "",
           "The latest measurement of each (machine, algorithm, seeds) in `speed.json`, from "
           "`benchmarks/speed.py` (method and the full history in `speed.md`). Per-seed rate and total "
           "seed-updates/s; the last column is the CPU other processes used meanwhile.", "",
           "| machine | algorithm | seeds | updates/s per seed | seed-updates/s | other load (cores) |", "|---|---|---|---|---|---|"]
    for (mach, algo, seeds), row in sorted(latest.items()):
        out.append(f"| {mach} | {algo} | {seeds} | {row['updates_per_s']:.1f} | {row['seed_updates_per_s']:.1f} | "
                   f"{row.get('other_processes_cores', math.nan):.2f} |")
    return out + [""]


def main(cfg: Config) -> None:
    results = ROOT / cfg.results
    by_sweep = load_summaries(results)
    order = [n for n in sweeps.SWEEPS if n in by_sweep] + sorted(set(by_sweep) - set(sweeps.SWEEPS))
    lines = ["# Results", "",
             "Generated by `python benchmarks/report.py` from the run summaries in `summaries/` "
             "(one JSON per run, written by `benchmarks/sweep.py`) and `speed.json`. Do not edit by hand.", ""]
    if not order:
        lines += ["No runs yet: `python benchmarks/sweep.py run cpu-hopper`.", ""]
    for name in order:
        lines += sweep_section(name, by_sweep[name], results)
    lines += speed_section(results)
    lines += ["## Other records", "",
              "- `datasets.md`: how the `ours/Hopper-v5` datasets were made.",
              "- `speed.md`: every speed measurement with its command.",
              "- `short_runs.md`: earlier smoke runs of each script.", ""]
    (results / "README.md").write_text("\n".join(lines))
    print(f"wrote {results / 'README.md'} ({sum(len(v) for v in by_sweep.values())} runs)")


if __name__ == "__main__":
    main(tyro.cli(Config))

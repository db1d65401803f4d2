"""Build results/README.md (tables, grid statistics, learning-curve and diagnostics PNGs) from the
committed run summaries.

    python benchmarks/report.py                        # 2000 bootstrap resamples, seed 0
    python benchmarks/report.py --reps 50000 --seed 1  # rliable's default number of resamples

Reads `results/summaries/<sweep>/*.json` (written by `benchmarks/sweep.py` when a run finishes)
and `results/speed.json` (written by `benchmarks/speed.py`); nothing else. Every number in the
README it writes comes from those files. Over a sweep's grid (tasks = datasets, runs = seeds) it
reports, with the `rliable` library, the interquartile mean of each variant's final scores and the
probability that MISA improves on CQL and on TD3+BC, each with a 95 % stratified-bootstrap confidence
interval; while some variant's grid is incomplete, the same statistics also over the datasets every
variant has run. Sweeps declared `smoke=True` or `diagnostic=True` in `benchmarks/sweep.py` go to
separate, labelled sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import sys
from collections import defaultdict
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's benchmarks/, not whichever checkout is pip-installed

from benchmarks import paper_scores  # noqa: E402
from benchmarks import sweep as sweeps  # noqa: E402

NAMES = {"td3_bc": "TD3+BC", "cql": "CQL", "misa": "MISA", "misa_dv": "MISA-DV", "misa_f": "MISA-f"}
# MISA's sampler and regulariser health and the actor loss's parts, plotted per run where the summary holds them
MISA_DIAGNOSTICS = ["hmc_acceptance", "hmc_step", "hmc_stein_scale", "q_data", "mi_regulariser", "actor_bc", "actor_q",
                    "actor_correction"]


@dataclasses.dataclass
class Config:
    results: str = "results"
    """folder holding summaries/ and speed.json; README.md and plots/ are written there"""
    reps: int = 2000
    """bootstrap resamples per confidence interval (rliable's stratified bootstrap)"""
    seed: int = 0
    """seed of the bootstrap resampling, so that the report is reproducible"""
    skip_bad: bool = False
    """report the summaries that can be read, with a warning naming each one that cannot (default: refuse)"""


def command_line(cfg: Config) -> str:
    """The command that reproduces this report's statistics."""
    flags = [] if cfg.results == "results" else ["--results", cfg.results]
    return shlex.join(["python", "benchmarks/report.py", *flags, "--reps", str(cfg.reps), "--seed", str(cfg.seed)])


# what the report reads from every summary (sweep.py writes them all), and the type each must have
REQUIRED = {"sweep": str, "label": str, "dataset": str, "algo": str, "metric": str, "command": str, "machine": str,
            "args": dict, "curve": dict, "final_per_seed": list, "episodes_per_seed": int,
            "final_mean": (int, float), "final_std": (int, float), "wall_time_s": (int, float)}


def summary_problem(path: Path) -> tuple[dict | None, str | None]:
    """(the summary in `path`, None), or (None, what is wrong with it)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read ({e})"
    if not text.strip():
        return None, "is empty"
    try:
        s = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON (truncated?): {e}"
    if not isinstance(s, dict):
        return None, f"holds a JSON {type(s).__name__}, not an object (a run summary)"
    missing = [k for k in REQUIRED if k not in s]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    wrong = [f"{k} ({type(s[k]).__name__})" for k, t in REQUIRED.items() if isinstance(s[k], bool) or not isinstance(s[k], t)]
    if wrong:
        return None, f"has values of the wrong type: {', '.join(wrong)}"
    return s, None


def load_summaries(results: Path, skip_bad: bool = False) -> dict[str, list[dict]]:
    """Every summary under results/summaries, by sweep. A bad one (empty, truncated, not a summary) ends the
    report with one message naming each, or, with `skip_bad`, a warning and the report of the rest."""
    by_sweep: dict[str, list[dict]] = defaultdict(list)
    bad = []
    for path in sorted((results / "summaries").glob("*/*.json")):
        s, problem = summary_problem(path)
        if problem:
            bad.append(f"{path} {problem}")
        else:
            by_sweep[s["sweep"]].append(s)
    if bad and not skip_bad:
        raise SystemExit("error: bad run summaries (rerun their runs with benchmarks/sweep.py, delete them, or pass "
                         "--skip-bad to report the rest):\n  " + "\n  ".join(bad))
    for line in bad:
        print(f"warning: skipped {line}", file=sys.stderr)
    return by_sweep


def cell(s: dict | None) -> str:
    if s is None:
        return "not run"
    return f"{s['final_mean']:.1f} ± {s['final_std']:.1f} ({len(s['final_per_seed'])} seeds × {s['episodes_per_seed']} ep)"


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    # rliable 1.2.0's StratifiedBootstrap draws its resampling indices from numpy's global generator
    # (np.random.choice) and ignores `random_state`; seeding the global generator is what makes it repeatable
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@dataclasses.dataclass
class GridStats:
    """Aggregates over a sweep's grid: point estimate and 95 % CI, (point, low, high)."""

    datasets: list[str]
    iqm: dict[str, tuple[float, float, float]]  # label -> interquartile mean of the final scores
    improvement: dict[tuple[str, str], tuple[float, float, float]]  # (x, y) labels -> P(X > Y)
    runs: dict[str, int]  # label -> seeds per dataset
    left_out: dict[str, str]  # label -> why it is not in the statistics


def score_matrix(runs: list[dict], label: str, datasets: list[str]) -> np.ndarray | str:
    """(seeds, datasets) final scores of one variant, rliable's layout; or why there is none."""
    index = {r["dataset"]: r for r in runs if r["label"] == label}
    missing = [d for d in datasets if d not in index]
    if missing:
        return f"not run on {', '.join(f'`{d}`' for d in missing)}"
    columns = [np.asarray(index[d]["final_per_seed"], dtype=float) for d in datasets]
    if len({len(c) for c in columns}) > 1:
        return "different numbers of seeds on different datasets"
    m = np.stack(columns, axis=1)
    if not np.isfinite(m).all():
        return "a non-finite final score"
    return m


def comparison_label(labels: list[str], algo_of: dict[str, str], algo: str, declared: frozenset[str] = frozenset()
                     ) -> str | None:
    """The variant that stands for an algorithm: the one named after it, else its only variant (unless the
    sweep declares a variant of that name: then only that one, once it has runs)."""
    if algo in labels:
        return algo
    if algo in declared:
        return None
    of_algo = [lab for lab in labels if algo_of[lab] == algo]
    return of_algo[0] if len(of_algo) == 1 else None


def comparisons_of(name: str) -> tuple[tuple[str, str], ...]:
    """The (X, Y) pairs whose probability of improvement P(X > Y) the sweep asks for (sweep.py)."""
    sw = sweeps.SWEEPS.get(name)
    return sw.comparisons if sw else sweeps.Sweep.comparisons


def grid_statistics(runs: list[dict], labels: list[str], datasets: list[str], reps: int, seed: int,
                    comparisons: tuple[tuple[str, str], ...] = sweeps.Sweep.comparisons,
                    declared: frozenset[str] = frozenset()) -> GridStats:
    """IQM per variant and MISA's probability of improvement, rliable's stratified bootstrap (over seeds,
    within each dataset). Each interval is seeded on its own, so it does not depend on the other variants."""
    from rliable import library as rly
    from rliable import metrics

    matrices, left_out = {}, {}
    for lab in labels:
        m = score_matrix(runs, lab, datasets)
        if isinstance(m, str):
            left_out[lab] = m
        else:
            matrices[lab] = m
    iqm = {}
    for lab, m in matrices.items():
        with seeded_numpy(seed):
            point, ci = rly.get_interval_estimates({lab: m}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
        iqm[lab] = (float(point[lab][0]), float(ci[lab][0, 0]), float(ci[lab][1, 0]))
    algo_of = {r["label"]: r["algo"] for r in runs}
    improvement = {}
    for x_algo, y_algo in comparisons:
        x, y = (comparison_label(list(matrices), algo_of, a, declared) for a in (x_algo, y_algo))
        if x is None or y is None:
            continue
        with seeded_numpy(seed):
            point, ci = rly.get_interval_estimates({"xy": (matrices[x], matrices[y])},
                                                   metrics.probability_of_improvement, reps=reps)
        improvement[(x, y)] = (float(point["xy"]), float(ci["xy"][0, 0]), float(ci["xy"][1, 0]))
    return GridStats(datasets, iqm, improvement, {lab: m.shape[0] for lab, m in matrices.items()}, left_out)


def statistics_lines(stats: GridStats, algo_of: dict[str, str], metric: str, cfg: Config,
                     scope: str = "the grid", comparisons: tuple[tuple[str, str], ...] = sweeps.Sweep.comparisons,
                     declared: frozenset[str] = frozenset()) -> list[str]:
    n = len(stats.datasets)
    out = [f"Over {scope} ({n} dataset{'s' * (n > 1)} as tasks, the seeds of each as runs): the interquartile "
           f"mean (IQM) of the final scores, and the probability of improvement P(X > Y) (the chance that a run of "
           f"X beats a run of Y on a dataset, averaged over datasets), each with a 95 % stratified-bootstrap "
           f"confidence interval ({cfg.reps} resamples of the seeds within each dataset, percentile method). "
           f"Computed with rliable {_version('rliable')} by `{command_line(cfg)}`.", ""]
    if not metric.startswith("normalised"):
        out += [f"The scores are {metric}: not normalised, so datasets with large returns weigh more.", ""]
    if stats.iqm:
        out += ["| variant | IQM | 95 % CI | runs |", "|---|---|---|---|"]
        for lab, (point, low, high) in stats.iqm.items():
            out.append(f"| {NAMES.get(lab, lab)} | {point:.1f} | [{low:.1f}, {high:.1f}] | "
                       f"{stats.runs[lab]} seeds × {n} dataset{'s' * (n > 1)} |")
    if stats.left_out:
        out += [""] + [f"- {NAMES.get(lab, lab)} is left out of the statistics: {why}." for lab, why in stats.left_out.items()]
    out.append("")
    if stats.improvement:
        out += ["| comparison | P(X > Y) | 95 % CI |", "|---|---|---|"]
        for (x, y), (point, low, high) in stats.improvement.items():
            out.append(f"| {NAMES.get(x, x)} over {NAMES.get(y, y)} | {point:.2f} | [{low:.2f}, {high:.2f}] |")
        out.append("")
    for a, b in comparisons:
        x, y = (comparison_label(list(stats.iqm), algo_of, c, declared) for c in (a, b))
        if (x, y) not in stats.improvement:
            out.append(f"- {NAMES.get(a, a)} over {NAMES.get(b, b)}: not computed: "
                       + "; ".join(why_no_comparison(stats, algo_of, c, declared) for c in (a, b)
                                   if comparison_label(list(stats.iqm), algo_of, c, declared) is None) + ".")
    out.append("")
    return out


def why_no_comparison(stats: GridStats, algo_of: dict[str, str], algo: str, declared: frozenset[str] = frozenset()
                      ) -> str:
    """Why no variant stands for `algo` in a comparison (see comparison_label)."""
    name = NAMES.get(algo, algo)
    variants = [lab for lab, a in algo_of.items() if lab == algo or (a == algo and algo not in declared)]
    if not variants:
        return f"no {name} runs in this sweep"
    if any(lab in stats.iqm for lab in variants):
        return f"several variants of {name}, none labelled `{algo}`"
    return "; ".join(f"{NAMES.get(lab, lab)} {stats.left_out.get(lab, 'has no runs here')}" for lab in variants)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


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
    """Score per evaluation (mean ± std over seeds) and, where the summaries hold it, the mean episode
    length beside it: a flat score is read together with what the episodes do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", runs[0]["metric"])]
    if any(r.get("episode_length", {}).get("updates") for r in runs):
        panels.append(("episode_length", "episode length (steps)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for i, r in enumerate(runs):
            if not r.get(key, {}).get("updates"):
                continue
            x = np.asarray(r[key]["updates"])
            y = np.asarray([[v if v is not None else np.nan for v in row] for row in r[key]["per_seed"]], float)
            mean, std = np.nanmean(y, 1), np.nanstd(y, 1)
            ax.plot(x, mean, marker="o", ms=3, label=r["label"], color=f"C{i}")
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=f"C{i}")
        ax.set_xlabel("updates")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_title(dataset, fontsize=9)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(run: dict, path: Path) -> None:
    """One panel per MISA diagnostic: each seed thin, their mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MISA_DIAGNOSTICS if n in run["diagnostics"]]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = run["diagnostics"][name]
        x = np.asarray(d["updates"])
        y = np.asarray([[v if v is not None else np.nan for v in row] for row in d["per_seed"]], float)
        ax.plot(x, y, lw=0.7, alpha=0.5)
        ax.plot(x, np.nanmean(y, 1), lw=2, color="k", label="mean over seeds")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{run['label']} on {run['dataset']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_smoke(name: str, runs: list[dict]) -> bool:
    """Declared by the sweep (sweep.py), or recorded in its summaries (a sweep no longer defined)."""
    sw = sweeps.SWEEPS.get(name)
    return bool(sw and sw.smoke) or any(r.get("smoke") for r in runs)


def sweep_section(name: str, runs: list[dict], results: Path, cfg: Config) -> list[str]:
    sw = sweeps.SWEEPS.get(name)
    labels = list(sw.variants) if sw else sorted({r["label"] for r in runs})
    datasets = list(sw.datasets) if sw else sorted({r["dataset"] for r in runs})
    datasets = [d for d in datasets if any(r["dataset"] == d for r in runs)]
    labels = [lab for lab in labels if any(r["label"] == lab and r["dataset"] in datasets for r in runs)]
    index = {(r["label"], r["dataset"]): r for r in runs}
    algo_of = {r["label"]: r["algo"] for r in runs}
    with_paper = [lab for lab in labels if lab == algo_of[lab] and any(
        paper_scores.paper_score(d, algo_of[lab]) is not None for d in datasets)]

    smoke = is_smoke(name, runs)
    title = sw.title if sw and sw.title else f"Sweep `{name}`"
    out = [f"### {title}{' (smoke run)' if smoke else ''}", ""]
    if sw and sw.title:
        out += [f"Sweep `{name}`.", ""]
    if smoke:
        out += ["> **Smoke run**: a budget far below the paper's (see Budget). These numbers show that the "
                "pipeline runs end to end; they say nothing about the algorithms' final performance.", ""]
    if sw:
        out += [f"{sw.description}.", ""]
    machines = sorted({r["machine"] for r in runs})
    total_h = sum(r["wall_time_s"] for r in runs) / 3600
    out += [f"- **Budget**: {budget(runs)}; flags of each variant in the commands below.",
            f"- **Machine**: {'; '.join(machines)}. Total wall time {total_h:.1f} h for {len(runs)} runs "
            f"(each run trains all its seeds at once, vmapped). Code: commit "
            f"{', '.join(sorted({(r.get('git_commit') or '?')[:7] for r in runs}))}.",
            f"- **Reproduce**: `python benchmarks/sweep.py run {name}` then `python benchmarks/report.py`.",
            f"- **Score**: final {runs[0]['metric']} (evaluation after the last update). A cell is the mean ± std "
            f"(population, ddof 0) over seeds of each seed's mean over its evaluation episodes, and in brackets "
            f"the number of seeds × evaluation episodes per seed.", ""]
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

    comparisons, declared = comparisons_of(name), frozenset(sw.variants if sw else ())
    stats = grid_statistics(runs, labels, datasets, cfg.reps, cfg.seed, comparisons, declared)
    out += [""] + statistics_lines(stats, algo_of, runs[0]["metric"], cfg, comparisons=comparisons, declared=declared)
    # while the grid fills, the same statistics where every variant has run, so that all of them enter
    shared = [d for d in datasets if all((lab, d) in index for lab in labels)]
    if 0 < len(shared) < len(datasets):
        scope = f"the dataset{'s' * (len(shared) > 1)} every variant has run, " + ", ".join(f"`{d}`" for d in shared)
        out += statistics_lines(grid_statistics(runs, labels, shared, cfg.reps, cfg.seed, comparisons, declared),
                                algo_of, runs[0]["metric"], cfg, scope, comparisons, declared)
    out += ["Wall time per run (minutes, all seeds together, compile and evaluation included):", "",
            "| dataset | " + " | ".join(NAMES.get(lab, lab) for lab in labels) + " |",
            "|" + "---|" * (len(labels) + 1)]
    for d in datasets:
        out.append(f"| `{d}` | " + " | ".join(
            f"{index[(lab, d)]['wall_time_s'] / 60:.1f}" if (lab, d) in index else "–" for lab in labels) + " |")

    out += ["", "Learning curves (mean ± std over seeds of the evaluation score; beside it the mean episode length, "
                "where the summaries hold it):", ""]
    for d in datasets:
        png = Path("plots") / name / f"{sweeps.slug(d)}.png"
        plot_curves([index[(lab, d)] for lab in labels if (lab, d) in index], d, results / png)
        out.append(f"![{d}]({png.as_posix()})")
    with_diag = [index[(lab, d)] for d in datasets for lab in labels if (lab, d) in index
                 and index[(lab, d)]["algo"].startswith("misa")]
    with_diag = [r for r in with_diag if any(n in r.get("diagnostics", {}) for n in MISA_DIAGNOSTICS)]
    if with_diag:
        out += ["", f"<details><summary>MISA diagnostics per run ({', '.join(MISA_DIAGNOSTICS)}; "
                    f"training metrics, each seed and their mean)</summary>", ""]
        for r in with_diag:
            png = Path("plots") / name / "diagnostics" / f"{sweeps.slug(r['label'])}__{sweeps.slug(r['dataset'])}.png"
            plot_diagnostics(r, results / png)
            out.append(f"![{r['label']} on {r['dataset']}]({png.as_posix()})")
        out += ["", "</details>"]
    elif any(r["algo"].startswith("misa") for r in runs):
        out += ["", "No MISA diagnostics in these summaries (written before `sweep.py` kept the training metrics)."]
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
    if cfg.reps < 1:
        raise SystemExit(f"--reps must be at least 1 (got {cfg.reps})")
    results = ROOT / cfg.results
    if not (results / "summaries").is_dir():
        raise SystemExit(f"no summaries folder in {results}: give --results the folder that holds summaries/")
    by_sweep = load_summaries(results, cfg.skip_bad)
    order = [n for n in sweeps.SWEEPS if n in by_sweep] + sorted(set(by_sweep) - set(sweeps.SWEEPS))
    diagnostic = lambda n: bool(sweeps.SWEEPS.get(n) and sweeps.SWEEPS[n].diagnostic)
    main_sweeps = [n for n in order if not is_smoke(n, by_sweep[n]) and not diagnostic(n)]
    diagnostic_sweeps = [n for n in order if not is_smoke(n, by_sweep[n]) and diagnostic(n)]
    smoke_sweeps = [n for n in order if is_smoke(n, by_sweep[n])]
    lines = ["# Results", "",
             "Generated by `python benchmarks/report.py` from the run summaries in `summaries/` "
             "(one JSON per run, written by `benchmarks/sweep.py`) and `speed.json`. Do not edit by hand. "
             f"This copy, with its bootstrap statistics: `{command_line(cfg)}`.", "",
             "## Main results", ""]
    if not order:
        lines += ["No runs yet: `python benchmarks/sweep.py run cpu-hopper`.", ""]
    elif not main_sweeps:
        lines += ["No full-budget sweep has finished yet: only the diagnostic and smoke runs below, which are not "
                  "benchmark results.", ""]
    for name in main_sweeps:
        lines += sweep_section(name, by_sweep[name], results, cfg)
    others = [(diagnostic_sweeps, "## Diagnostics (not benchmark results)",
               "Sweeps declared `diagnostic=True` in `benchmarks/sweep.py`: they measure a mechanism in "
               "training or a choice of the benchmark (e.g. the budget), not a benchmark result."),
              (smoke_sweeps, "## Smoke runs (not benchmark results)",
               "Sweeps declared `smoke=True` in `benchmarks/sweep.py`: a tiny fraction of the paper's updates "
               "(and, for the CPU grids, small networks), so that they run in minutes on a 2-core CPU. They are kept out of the "
               "main results above.")]
    for names, title, note in others:
        if names:
            lines += [title, "", note, ""]
            for name in names:
                lines += sweep_section(name, by_sweep[name], results, cfg)
    lines += speed_section(results)
    lines += ["## Other records", "",
              "- `datasets.md`: how the `ours/Hopper-v5` datasets were made.",
              "- `speed.md`: every speed measurement with its command.", ""]
    (results / "README.md").write_text("\n".join(lines))
    print(f"wrote {results / 'README.md'} ({sum(len(v) for v in by_sweep.values())} runs)")


if __name__ == "__main__":
    main(tyro.cli(Config))

"""The sweep runner and the report: a tiny sweep end to end, resumable, and a report whose numbers
are the summaries' numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks import paper_scores, report, sweep
from common import runlog


@pytest.fixture
def tiny_sweep(tiny_hopper, tmp_path, monkeypatch):
    _, local = tiny_hopper
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(sweep, "SUMMARIES", tmp_path / "results" / "summaries")
    monkeypatch.setitem(sweep.SWEEPS, "tiny", sweep.Sweep(
        "td3_bc on a tiny file", [str(local)], {"td3_bc a=1": "td3_bc --alpha 1.0"},
        num_seeds=2, num_updates=20, eval_every=10, log_every=10,
        common_flags="--hidden-dim 16 --batch-size 16 --eval-episodes 1"))
    return tmp_path


def test_sweep_runs_every_pair_once_and_summarises(tiny_sweep, capsys):
    sweep.run("tiny")
    files = sorted((tiny_sweep / "results" / "summaries" / "tiny").glob("*.json"))
    assert len(files) == 1
    s = json.loads(files[0].read_text())
    assert s["curve"]["updates"] == [10, 20] and len(s["curve"]["per_seed"][0]) == 2
    np.testing.assert_allclose(s["final_per_seed"], s["curve"]["per_seed"][-1], rtol=1e-5)  # final = last evaluation
    assert s["args"]["hidden_dim"] == 16 and s["args"]["alpha"] == 1.0 and s["wall_time_s"] > 0 and s["smoke"] is False
    capsys.readouterr()
    sweep.run("tiny")  # finished runs are not run again
    assert capsys.readouterr().out.count(": done (") == 1


def test_run_dataset_restricts_the_sweep(capsys):
    sweep.main(sweep.Cli("run", "learning-budget", dry_run=True, only=["misa"], dataset="ours/Hopper-v5/medium"))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("[1/1] misa on ours/Hopper-v5/medium: ")  # a command, or done
    for cli, message in [(sweep.Cli("run", "learning-budget", dataset="ours/Hopper-v5/expert"), "is not in sweep"),
                         (sweep.Cli("slurm", "learning-budget", dataset="ours/Hopper-v5/medium"), "covers the whole")]:
        with pytest.raises(SystemExit, match=message):
            sweep.main(cli)


def test_wandb_sweep_file_covers_the_grid(monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    cfg = yaml.safe_load(sweep.wandb_sweep("cpu-hopper-ablations").read_text())
    sw = sweep.SWEEPS["cpu-hopper-ablations"]
    assert cfg["method"] == "grid" and cfg["program"] == "benchmarks/sweep.py"
    assert cfg["parameters"]["label"]["values"] == list(sw.variants)
    assert cfg["parameters"]["dataset"]["values"] == sw.datasets
    assert "run-one" in cfg["command"]


def summary(label, algo, dataset, finals, updates=(500, 1000), sweep_name="mine"):
    finals = list(finals)
    return {"sweep": sweep_name, "label": label, "dataset": dataset, "algo": algo, "command": f"python algorithms/{algo}.py",
            "args": {"num_updates": updates[-1], "num_seeds": len(finals), "hidden_dim": 64, "eval_episodes": 10},
            "metric": "normalised score", "seeds": list(range(len(finals))), "episodes_per_seed": 10,
            "final_per_seed": finals, "final_mean": float(np.mean(finals)), "final_std": float(np.std(finals)),
            "curve": {"updates": list(updates), "per_seed": [[f / 2 for f in finals], finals]},
            "wall_time_s": 120.0, "machine": "test machine", "finished": "now"}


def write_summaries(root, runs):
    for i, r in enumerate(runs):
        path = root / "summaries" / r["sweep"] / f"{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_report_tables_hold_the_summaries_numbers(tmp_path):
    runs = [summary("td3_bc", "td3_bc", "hopper-medium-v2", [50.0, 60.0]),
            summary("misa", "misa", "hopper-medium-v2", [70.0, 80.0]),
            summary("td3_bc", "td3_bc", "ours/Hopper-v5/medium", [10.0, 30.0])]
    write_summaries(tmp_path, runs)
    report.main(report.Config(results=str(tmp_path), reps=100))
    text = (tmp_path / "README.md").read_text()
    hopper = next(line for line in text.splitlines() if line.startswith("| `hopper-medium-v2`"))
    assert "55.0 ± 5.0 (2 seeds × 10 ep)" in hopper and "75.0 ± 5.0 (2 seeds × 10 ep)" in hopper
    assert f"{paper_scores.paper_score('hopper-medium-v2', 'misa'):.1f}" in hopper  # paper number beside ours
    ours = next(line for line in text.splitlines() if line.startswith("| `ours/Hopper-v5/medium`"))
    assert "20.0 ± 10.0" in ours and "not run" in ours and "67.1" not in ours
    total = next(line for line in text.splitlines() if line.startswith("| **total**"))
    assert total.split(" | ")[1:] == ["incomplete", "–", "**75.0**", "– |"]  # misa lacks a dataset; td3_bc: 55 + 20
    assert (tmp_path / "plots" / "mine" / "hopper-medium-v2.png").stat().st_size > 1000
    assert "test machine" in text and "1000 updates" in text


# 3 datasets x 3 seeds x 3 algorithms, distinct values (no ties); datasets in the report's order (sorted, as
# "mine" is no defined sweep): the bootstrap resamples by position, so the order is part of the seeded result
GRID = ["halfcheetah-medium-v2", "hopper-medium-v2", "walker2d-medium-v2"]
SCORES = {"td3_bc": [[30.0, 28.5, 35.0], [41.0, 55.0, 47.0], [62.0, 71.0, 66.5]],  # [dataset][seed]
          "cql": [[44.0, 39.5, 42.5], [50.5, 58.0, 53.0], [70.0, 60.5, 79.0]],
          "misa": [[40.0, 37.0, 45.5], [57.5, 66.0, 49.0], [80.5, 75.0, 68.0]]}


def misa_diagnostics(updates=(500, 1000)):
    curve = lambda a, b: {"updates": list(updates), "per_seed": [[a, a + 0.1, a + 0.2], [b, b + 0.1, None]]}
    return {"hmc_acceptance": curve(0.9, 0.7), "hmc_step": curve(0.1, 0.05), "q_data": curve(10.0, 40.0),
            "mi_regulariser": curve(1.0, 0.5), "td_loss": curve(3.0, 2.0)}


def grid_runs():
    runs = []
    for algo, per_dataset in SCORES.items():
        for d, finals in zip(GRID, per_dataset):
            r = summary(algo, algo, d, finals)
            if algo == "misa" and d == "hopper-medium-v2":  # one run with diagnostics (plots are slow here)
                r["diagnostics"] = misa_diagnostics()
            runs.append(r)
    return runs


def test_grid_statistics_are_rliables(tmp_path):
    from rliable import library as rly
    from rliable import metrics

    write_summaries(tmp_path, grid_runs())
    cfg = report.Config(results=str(tmp_path), reps=100, seed=7)
    report.main(cfg)
    text = (tmp_path / "README.md").read_text()
    stats = report.grid_statistics(grid_runs(), list(SCORES), GRID, cfg.reps, cfg.seed)

    matrix = {algo: np.asarray(per_dataset).T for algo, per_dataset in SCORES.items()}  # (seeds, datasets)
    iqm = lambda x: np.array([metrics.aggregate_iqm(x)])
    for algo, m in matrix.items():
        np.random.seed(7)  # rliable 1.2.0 resamples with numpy's global generator
        point, ci = rly.get_interval_estimates({algo: m}, iqm, reps=100)
        expected = (point[algo][0], ci[algo][0, 0], ci[algo][1, 0])
        np.testing.assert_allclose(stats.iqm[algo], expected, rtol=1e-12)
        assert expected[1] < expected[0] < expected[2]
        name = report.NAMES[algo]
        assert f"| {name} | {expected[0]:.1f} | [{expected[1]:.1f}, {expected[2]:.1f}] | 3 seeds × 3 datasets |" in text
    # the point estimate independently of rliable: the mean of the middle 5 of the 9 runs (2 cut at each end)
    assert stats.iqm["misa"][0] == pytest.approx(np.mean(np.sort(matrix["misa"].ravel())[2:7]))

    for other in ("cql", "td3_bc"):
        np.random.seed(7)
        point, ci = rly.get_interval_estimates({"x": (matrix["misa"], matrix[other])},
                                               metrics.probability_of_improvement, reps=100)
        expected = (point["x"], ci["x"][0, 0], ci["x"][1, 0])
        np.testing.assert_allclose(stats.improvement[("misa", other)], expected, rtol=1e-12)
        # and the point estimate by counting: P(a MISA seed beats a seed of the other), averaged over datasets
        wins = np.mean([np.mean(matrix["misa"][:, [d]] > matrix[other][:, d]) for d in range(3)])
        assert expected[0] == pytest.approx(wins)
        assert f"| MISA over {report.NAMES[other]} | {expected[0]:.2f} | [{expected[1]:.2f}, {expected[2]:.2f}] |" in text
    assert stats.improvement[("misa", "td3_bc")][0] == pytest.approx(25 / 27)  # MISA over TD3+BC, not the reverse
    assert report.command_line(cfg) in text and "--reps 100 --seed 7" in text

    # reproducible: the same seed gives the same intervals; another seed moves the intervals, not the points
    assert report.grid_statistics(grid_runs(), list(SCORES), GRID, cfg.reps, cfg.seed) == stats
    other = report.grid_statistics(grid_runs(), list(SCORES), GRID, cfg.reps, seed=8)
    assert other.iqm["misa"][0] == stats.iqm["misa"][0] and other.iqm["misa"][1:] != stats.iqm["misa"][1:]

    # MISA's diagnostics: a PNG for the run whose summary holds them, linked from the README; none for the others
    pngs = sorted((tmp_path / "plots" / "mine" / "diagnostics").glob("*.png"))
    assert [p.name for p in pngs] == ["misa__hopper-medium-v2.png"] and pngs[0].stat().st_size > 1000
    assert "(plots/mine/diagnostics/misa__hopper-medium-v2.png)" in text


def test_statistics_leave_out_an_incomplete_variant(tmp_path):
    runs = [r for r in grid_runs() if not (r["algo"] == "cql" and r["dataset"] == GRID[2])]
    stats = report.grid_statistics(runs, list(SCORES), GRID, reps=50, seed=0)
    assert set(stats.iqm) == {"td3_bc", "misa"} and GRID[2] in stats.left_out["cql"]
    assert list(stats.improvement) == [("misa", "td3_bc")]

    # the report adds the statistics over the datasets every variant has run, where all of them enter
    write_summaries(tmp_path, runs)
    report.main(report.Config(results=str(tmp_path), reps=50, seed=0))
    text = (tmp_path / "README.md").read_text()
    assert "Over the datasets every variant has run, `halfcheetah-medium-v2`, `hopper-medium-v2` (2 datasets" in text
    shared = report.grid_statistics(runs, list(SCORES), GRID[:2], reps=50, seed=0)
    assert set(shared.iqm) == set(SCORES) and not shared.left_out
    p, low, high = shared.improvement[("misa", "cql")]
    assert f"| MISA over CQL | {p:.2f} | [{low:.2f}, {high:.2f}] |" in text
    assert "MISA over CQL: not computed: CQL not run on `walker2d-medium-v2`." in text


def test_a_declared_variant_without_runs_is_not_stood_in_for_by_another():
    """long-budget declares `misa` and `misa official objective`: while only the latter has runs, MISA's
    comparisons are not computed (the official objective is not MISA), and say why."""
    runs = [summary("misa official objective", "misa", d, finals) for d, finals in zip(GRID, SCORES["misa"])]
    runs += [summary("td3_bc", "td3_bc", d, finals) for d, finals in zip(GRID, SCORES["td3_bc"])]
    labels, comparisons = ["misa official objective", "td3_bc"], (("misa", "td3_bc"), ("misa", "misa official objective"))
    declared = frozenset(["misa", "misa official objective", "td3_bc"])
    stats = report.grid_statistics(runs, labels, GRID, 50, 0, comparisons, declared)
    assert not stats.improvement and set(stats.iqm) == set(labels)
    lines = report.statistics_lines(stats, {r["label"]: r["algo"] for r in runs}, "normalised score",
                                    report.Config(reps=50), comparisons=comparisons, declared=declared)
    assert "- MISA over TD3+BC: not computed: no MISA runs in this sweep." in lines
    assert "- MISA over misa official objective: not computed: no MISA runs in this sweep." in lines
    # undeclared (the default comparisons of a sweep named by algorithms): the only MISA variant stands in
    assert list(report.grid_statistics(runs, labels, GRID, 50, 0, comparisons[:1]).improvement) == [
        ("misa official objective", "td3_bc")]


def test_smoke_sweeps_stay_out_of_the_main_results(tmp_path, monkeypatch):
    assert sweep.SWEEPS["cpu-hopper"].smoke and sweep.SWEEPS["cpu-hopper-ablations"].smoke
    assert not sweep.SWEEPS["paper"].smoke
    monkeypatch.setitem(sweep.SWEEPS, "tiny-smoke", sweep.Sweep(
        "a declared smoke sweep", ["smoke-only-v0"], {"misa": "misa"}, smoke=True))
    runs = [r for r in grid_runs() if r["dataset"] == "hopper-medium-v2"]
    runs += [summary("misa", "misa", "smoke-only-v0", [1.0, 2.0], sweep_name="tiny-smoke"),
             {**summary("cql", "cql", "recorded-smoke-v0", [3.0, 4.0], sweep_name="gone"), "smoke": True}]
    write_summaries(tmp_path, runs)
    report.main(report.Config(results=str(tmp_path), reps=50))
    text = (tmp_path / "README.md").read_text()
    main, smoke = text.split("## Main results")[1].split("## Smoke runs (not benchmark results)")
    assert "### Sweep `mine`" in main and "hopper-medium-v2" in main
    for name in ("tiny-smoke", "smoke-only-v0", "gone", "recorded-smoke-v0"):
        assert name not in main and name in smoke
    assert "### Sweep `tiny-smoke` (smoke run)" in smoke and "### Sweep `gone` (smoke run)" in smoke
    assert smoke.count("> **Smoke run**") == 2 and "(smoke run)" not in main


def test_report_user_errors_end_in_one_message(tmp_path):
    with pytest.raises(SystemExit, match="no summaries folder"):
        report.main(report.Config(results=str(tmp_path / "nowhere")))
    with pytest.raises(SystemExit, match="--reps must be at least 1"):
        report.main(report.Config(results=str(tmp_path), reps=0))


def test_every_sweep_command_parses_with_its_script():
    """Each run's whole command line is valid for its algorithm file: its flags exist and their values pass
    the script's checks (a renamed flag or a bad combination would fail here, not hours into a sweep)."""
    import importlib

    import tyro

    for name, sw in sweep.SWEEPS.items():
        for label in sw.variants:
            _, script, *flags = sweep.command(sw, name, label, sw.datasets[0])
            module = importlib.import_module(f"algorithms.{Path(script).stem}")
            args = tyro.cli(module.Args, args=flags)  # raises SystemExit on an unknown flag
            runlog.check(args, module.RULES, module.check_args(args))


BAD_SUMMARIES = [("empty", "", "is empty"),
                 ("truncated", '{"sweep": "mine", "label": "td3', "is not valid JSON (truncated?)"),
                 ("list", "[1, 2, 3]", "holds a JSON list, not an object"),
                 ("no_final_mean", None, "lacks final_mean"),
                 ("string_mean", "string", "has values of the wrong type: final_mean (str)")]


@pytest.mark.parametrize("name,text,message", BAD_SUMMARIES, ids=[b[0] for b in BAD_SUMMARIES])
def test_a_bad_summary_is_named_or_skipped(name, text, message, tmp_path, capsys):
    """One message naming the bad file and what is wrong with it (exit non-zero, no traceback); with
    --skip-bad, a warning naming it and the report of the rest."""
    good = summary("td3_bc", "td3_bc", "hopper-medium-v2", [50.0, 60.0])
    write_summaries(tmp_path, [good])
    bad = tmp_path / "summaries" / "mine" / f"{name}.json"
    if text is None:
        text = json.dumps({k: v for k, v in good.items() if k != "final_mean"})
    elif text == "string":
        text = json.dumps({**good, "final_mean": "55"})
    bad.write_text(text)
    with pytest.raises(SystemExit) as e:
        report.main(report.Config(results=str(tmp_path), reps=10))
    assert e.value.code not in (0, None) and f"{bad} {message}" in str(e.value), e.value
    assert not (tmp_path / "README.md").exists()
    capsys.readouterr()
    report.main(report.Config(results=str(tmp_path), reps=10, skip_bad=True))
    assert f"warning: skipped {bad} {message}" in capsys.readouterr().err
    assert "55.0 ± 5.0" in (tmp_path / "README.md").read_text()

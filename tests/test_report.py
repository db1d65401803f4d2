"""The sweep runner and the report: a tiny sweep end to end, resumable, and a report whose numbers
are the summaries' numbers."""

import json

import numpy as np
import pytest
import yaml

from benchmarks import paper_scores, report, sweep


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
    assert s["args"]["hidden_dim"] == 16 and s["args"]["alpha"] == 1.0 and s["wall_time_s"] > 0
    capsys.readouterr()
    sweep.run("tiny")  # finished runs are not run again
    assert capsys.readouterr().out.count(": done (") == 1


def test_wandb_sweep_file_covers_the_grid(monkeypatch, tmp_path):
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    cfg = yaml.safe_load(sweep.wandb_sweep("cpu-hopper-ablations").read_text())
    sw = sweep.SWEEPS["cpu-hopper-ablations"]
    assert cfg["method"] == "grid" and cfg["program"] == "benchmarks/sweep.py"
    assert cfg["parameters"]["label"]["values"] == list(sw.variants)
    assert cfg["parameters"]["dataset"]["values"] == sw.datasets
    assert "run-one" in cfg["command"]


def summary(label, algo, dataset, finals, updates=(500, 1000)):
    finals = list(finals)
    return {"sweep": "mine", "label": label, "dataset": dataset, "algo": algo, "command": f"python algorithms/{algo}.py",
            "args": {"num_updates": updates[-1], "num_seeds": len(finals), "hidden_dim": 64, "eval_episodes": 10},
            "metric": "normalised score", "seeds": list(range(len(finals))), "episodes_per_seed": 10,
            "final_per_seed": finals, "final_mean": float(np.mean(finals)), "final_std": float(np.std(finals)),
            "curve": {"updates": list(updates), "per_seed": [[f / 2 for f in finals], finals]},
            "wall_time_s": 120.0, "machine": "test machine", "finished": "now"}


def test_report_tables_hold_the_summaries_numbers(tmp_path):
    runs = [summary("td3_bc", "td3_bc", "hopper-medium-v2", [50.0, 60.0]),
            summary("misa", "misa", "hopper-medium-v2", [70.0, 80.0]),
            summary("td3_bc", "td3_bc", "ours/Hopper-v5/medium", [10.0, 30.0])]
    for i, r in enumerate(runs):
        path = tmp_path / "summaries" / "mine" / f"{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    report.main(report.Config(results=str(tmp_path)))
    text = (tmp_path / "README.md").read_text()
    hopper = next(line for line in text.splitlines() if line.startswith("| `hopper-medium-v2`"))
    assert "55.0 ± 5.0" in hopper and "75.0 ± 5.0" in hopper
    assert f"{paper_scores.paper_score('hopper-medium-v2', 'misa'):.1f}" in hopper  # paper number beside ours
    ours = next(line for line in text.splitlines() if line.startswith("| `ours/Hopper-v5/medium`"))
    assert "20.0 ± 10.0" in ours and "not run" in ours and "67.1" not in ours
    total = next(line for line in text.splitlines() if line.startswith("| **total**"))
    assert total.split(" | ")[1:] == ["incomplete", "–", "**75.0**", "– |"]  # misa lacks a dataset; td3_bc: 55 + 20
    assert (tmp_path / "plots" / "mine" / "hopper-medium-v2.png").stat().st_size > 1000
    assert "test machine" in text and "1000 updates" in text

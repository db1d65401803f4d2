"""`sweep.py slurm`: a submitit job array, one run per task, requeued on preemption and resumed from the
run's checkpoint. On CPU with submitit's local executor (the same job protocol as on SLURM) and, for the
sbatch script itself, a stand-in `sbatch`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission

from benchmarks import sweep
from conftest import children

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_grid(tiny_hopper, tmp_path, monkeypatch):
    """Two td3_bc variants on the tiny file, one seed; 4000 updates with a checkpoint every 500 (seconds
    of training), so that a run can be preempted between its first checkpoint and its end."""
    _, local = tiny_hopper
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(sweep, "SUMMARIES", tmp_path / "results" / "summaries")
    return sweep.Sweep("td3_bc on a tiny file", [str(local)], {"td3_bc a=1": "td3_bc --alpha 1.0",
                                                              "td3_bc a=2.5": "td3_bc --alpha 2.5"},
                       num_seeds=1, num_updates=4000, eval_every=500, log_every=500,
                       common_flags="--hidden-dim 16 --batch-size 16 --eval-episodes 1")


def test_job_array_requeues_a_preempted_run_which_resumes(tiny_grid, tmp_path, capsys):
    # one variant already has its summary: only the other is submitted (and this machine's 2 cores train one)
    done = sweep.summary_path("tiny", "td3_bc a=2.5", tiny_grid.datasets[0])
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    jobs = sweep.slurm_sweep("tiny", sw=tiny_grid, executor="local", time_min=30, gpus_per_task=0,
                             cpus_per_task=1, mem_gb=1, log_folder=tmp_path / "slurm")
    assert len(jobs) == 1 and "submitted 1 runs to local (1 already done)" in capsys.readouterr().out
    try:
        rd = sweep.run_dir("tiny", "td3_bc a=1", tiny_grid.datasets[0])
        deadline = time.time() + 120
        while not (rd / "checkpoint.eqx").exists():
            assert time.time() < deadline and jobs[0].state == "RUNNING", jobs[0].stderr()
            time.sleep(0.02)
        (task,) = [pid for pid, cmd in children(jobs[0]._process.pid) if "submitit.core._submit" in cmd]
        (training,) = [pid for pid, cmd in children(task) if "algorithms/td3_bc.py" in cmd]
        os.kill(training, signal.SIGSTOP)  # frozen mid-run, however fast this machine trains
        assert not (rd / "results.json").exists(), "the run ended before it could be preempted"
        # the training process ignores the signals SLURM sends to every process of a preempted job
        ignored = int(next(line for line in Path(f"/proc/{training}/status").read_text().splitlines()
                           if line.startswith("SigIgn:")).split()[1], 16)
        assert all(ignored >> (sig - 1) & 1 for sig in (signal.SIGTERM, signal.SIGUSR2)), hex(ignored)
        # what SLURM does to a preempted job: SIGTERM to each of its processes, then submitit's USR2
        for pid in (task, training):
            os.kill(pid, signal.SIGTERM)
        os.kill(task, signal.SIGUSR2)
        summary = jobs[0].result()  # the task returns its summary's path
    finally:
        jobs[0].cancel()  # a no-op once it finished; stops its processes when the test failed
    assert summary == str(sweep.summary_path("tiny", "td3_bc a=1", tiny_grid.datasets[0]))
    log = jobs[0].stdout()
    assert "this job is preempted" in log and "Requeued" in log
    starts = [line for line in log.splitlines() if line.startswith("[1/1] td3_bc a=1 on") and "python" in line]
    assert len(starts) == 2 and "--resume" not in starts[0] and starts[1].endswith("--resume")
    s = json.loads(Path(summary).read_text())
    assert s["curve"]["updates"] == list(range(500, 4001, 500)) and len(s["final_per_seed"]) == 1
    assert s["args"]["alpha"] == 1.0 and s["wall_time_s"] > 0

    # a second submission has nothing left to run
    assert sweep.slurm_sweep("tiny", sw=tiny_grid, executor="local", log_folder=tmp_path / "slurm") == []


def test_checkpoint_requeues_the_same_run(tiny_grid, tmp_path):
    task = sweep.SweepTask("tiny", tiny_grid, tmp_path / "runs", tmp_path / "summaries")
    again = task.checkpoint("td3_bc a=1", "some.hdf5")
    assert again.function is task and again.args == ("td3_bc a=1", "some.hdf5") and not again.kwargs


def test_sbatch_script_carries_the_flags(tiny_grid, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "$PYTHONPATH" > {tmp_path}/pythonpath\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit wants it on PATH; the jobs would call it
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs = sweep.slurm_sweep("tiny", sw=tiny_grid, executor="slurm", partition="gpu-long", time_min=90,
                             gpus_per_task=2, cpus_per_task=6, mem_gb=48, log_folder=tmp_path / "logs")
    assert [job.job_id for job in jobs] == ["4242_0", "4242_1"]
    # one run per array task: each task's pickled call is its own (variant, dataset)
    calls = [DelayedSubmission.load(job.paths.submitted_pickle) for job in jobs]
    assert [c.args for c in calls] == [(label, tiny_grid.datasets[0]) for label in tiny_grid.variants]
    assert all(isinstance(c.function, sweep.SweepTask) and c.function.sw == tiny_grid for c in calls)
    script = (tmp_path / "submitted.sh").read_text()
    for flag in ("--array=0-1%", "--partition=gpu-long", "--time=90", "--gpus-per-node=2", "--cpus-per-task=6",
                 "--mem=48GB", "--ntasks-per-node=1", "--nodes=1", "--signal=USR2@", "--job-name=sweep-tiny",
                 f"--output={tmp_path}/logs/%A_%a_0_log.out"):
        assert f"#SBATCH {flag}" in script, flag
    # sbatch passes its environment to the jobs: they import this checkout's code
    assert (tmp_path / "pythonpath").read_text().split(os.pathsep)[0].strip() == str(ROOT)


def test_slurm_user_errors_end_in_one_message(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch
    for argv, message in [(["slurm", "nope"], "unknown sweep 'nope'"),
                          (["slurm", "paper", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
                          (["slurm", "paper"], "sbatch and srun not found")]:
        out = subprocess.run([sys.executable, "benchmarks/sweep.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_dry_run_submits_nothing(tiny_grid, tmp_path, capsys):
    assert sweep.slurm_sweep("tiny", sw=tiny_grid, dry_run=True, log_folder=tmp_path / "logs") == []
    out = capsys.readouterr().out
    assert "would submit 2 runs to slurm" in out and out.count("python algorithms/td3_bc.py") == 2
    assert not (tmp_path / "logs").exists()

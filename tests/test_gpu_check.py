"""benchmarks/gpu_check.py (the one command for a lent GPU) in its tiny CPU configuration, its time
budget, its agreement check; the HLO and jaxpr readers of benchmarks/gpu_estimates.py on known
programs; and MISA's --hmc-chains auto."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from algorithms import misa, misa_dv, misa_f
from benchmarks import gpu_estimates, speed
from conftest import uncached_env

ROOT = Path(__file__).resolve().parents[1]
SPEED_KEYS = {"algo", "num_seeds", "chunk", "updates_per_s", "seed_updates_per_s", "compile_s", "chunk_s",
              "other_processes_cores"}  # a row of results/speed.json


def gpu_check(out: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text().splitlines()[-1])
    return proc, record, out.read_text()


def test_tiny_configuration_measures_every_step(tmp_path):
    """Every step of the command, on three of its five variants (the other two are MISA with other
    flags; each MISA program takes seconds to compile on a CPU)."""
    variants = ["td3_bc", "cql", "misa:hmc_chains=sequential"]
    # --compile-guess-s 0: CQL, first compiled after the TD3+BC run, is compiled during it
    proc, record, md = gpu_check(tmp_path / "speed-gpu.md", "--variants", *variants, "--compile-guess-s", "0")
    assert record["status"] == "complete", record["status"]
    assert [r["algo"] for r in record["rows"]] == variants
    assert [r["status"] for r in record["rows"]] == ["measured", "measured (compiled during the TD3+BC run)", "measured"]
    assert record["long_run"][0]["compiled_meanwhile"] == ["cql x 2"]
    for r in record["rows"]:
        assert SPEED_KEYS <= r.keys(), r
        assert r["updates_per_s"] > 0 and r["compile_s"] > 0 and r["seed_updates_per_s"] == pytest.approx(2 * r["updates_per_s"])
        assert r["xla_memory_bytes"] > 0 and r["kernels_per_update"] > 0
    (run,) = record["long_run"]
    assert run["num_seeds"] == 2 and run["updates"] > 0 and run["wall_1m_updates_min"] > 0
    assert record["agreement"]["status"] == "skipped: one backend (cpu)"
    assert "Status: **complete**" in md and f"JAX {jax.__version__}" in md and "| misa:hmc_chains=sequential | 2 |" in md
    assert "seed-updates/s" in proc.stdout and "TD3+BC for" in proc.stdout  # it prints its progress


def test_a_budget_too_small_still_writes_a_labelled_partial_table(tmp_path):
    out = tmp_path / "speed-gpu.md"
    out.write_text("# earlier runs\n\nkept\n")
    # the TD3+BC run cannot fit: the table rows are measured, the run is labelled
    _, record, md = gpu_check(out, "--variants", "td3_bc", "--long-s", "100000")
    assert record["status"].startswith("PARTIAL") and "TD3+BC run x 2" in record["status"]
    assert [r["status"] for r in record["rows"]] == ["measured"]
    assert record["long_run"][0]["status"].startswith("not run: budget")
    assert md.startswith("# earlier runs\n\nkept\n") and "Status: **PARTIAL" in md
    # no measurement fits: every row says so, and the section is appended after the first
    _, record, md = gpu_check(out, "--compile-guess-s", "100000")
    assert record["status"].startswith("PARTIAL")
    assert all(r["status"].startswith("not measured: budget") for r in record["rows"]) and len(record["rows"]) == 5
    assert md.count("Status: **PARTIAL") == 2 and md.count("not measured: budget") == 5
    assert len(out.with_suffix(".json").read_text().splitlines()) == 2


def test_a_wrong_variant_is_one_message_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out",
                           str(tmp_path / "x.md"), "--variants", "misa:no_such_field=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no_such_field" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.md").exists()


def test_agreement_of_one_chunk_on_two_devices():
    """On two host devices (the CPU standing in for the GPU) the chunk is the same program on the same
    inputs: the check must find no difference at all, so its copying of data, state and keys is exact."""
    code = """
import jax
from benchmarks import gpu_check, speed
cfg = gpu_check.Config(tiny=True, agree_variant="td3_bc", agree_seeds=2, agree_updates=4)
a = gpu_check.agreement(cfg, speed.synthetic_dataset(1000), None, jax.devices()[0], jax.devices()[1])
assert a["status"] == "agrees" and a["target_device"] != a["reference_device"], a
assert a["float32_state_rel"] == 0.0 and a["default_state_rel"] == 0.0 and a["default_metrics_rel"] == 0.0, a
assert a["rounding_state_rel"] < 1e-3 and a["tolerance"] >= 1e-5, a  # seeds alone vs vmapped: float rounding
print("ok")
"""
    env = uncached_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def loop_program(length: int):
    """A chunk-like program: a loop with a traced count around a scan of `length` 64x64 matmuls."""
    def chunk(x, n):
        def step(i, c):
            return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), c, None, length=length)[0]
        return jax.lax.fori_loop(0, n, step, x)
    return jax.jit(chunk), (jnp.ones((64, 64)), jnp.int32(3))


def test_loop_readers_apply_trip_counts():
    flops, loops, passes = {}, {}, {}
    kernels = {}
    for length in (7, 14, 21):
        f, args = loop_program(length)
        body = gpu_estimates.step_jaxpr(jax.make_jaxpr(f)(*args).jaxpr)
        flops[length], loops[length], passes[length] = gpu_estimates.profile(body)
        kernels[length] = gpu_estimates.step_kernels(f.lower(*args).compile().as_text())[0]
    assert flops[7] == 7 * 2 * 64**3 and flops[21] == 3 * flops[7]  # XLA's cost_analysis would count one
    assert loops[7] == ["7"] and passes[14] == 14
    assert kernels[14] - kernels[7] == kernels[21] - kernels[14] > 0  # each iteration launches the body again


def test_plan_puts_the_chain_layouts_and_the_agreement_first():
    from benchmarks import gpu_check

    assert gpu_check.Config().variants == ["td3_bc", "cql", "misa:hmc_chains=sequential", "misa:hmc_chains=parallel",
                                           "misa:objective=official"]
    steps = gpu_check.plan(gpu_check.Config())
    assert steps[:3] == [("row", gpu_check.MISA_SEQ, 5), ("row", gpu_check.MISA_PAR, 5), ("agree",)]
    assert steps.index(("long",)) < steps.index(("row", "cql", 5))
    rows = [s for s in steps if s[0] == "row"]
    assert len(rows) == len(set(rows)) == 20


@pytest.mark.parametrize("module", [misa, misa_dv, misa_f])
def test_hmc_chains_auto_follows_the_backend(module, monkeypatch):
    assert module.resolve_args(module.Args(), "locomotion").hmc_chains == "sequential"  # on this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert module.resolve_args(module.Args(), "locomotion").hmc_chains == "parallel"
    assert module.resolve_args(module.Args(hmc_chains="sequential"), "locomotion").hmc_chains == "sequential"


def test_build_applies_tiny_overrides_only_where_the_file_has_them():
    _, args = speed.build_args("td3_bc", 1, 10, 10, {"hidden_dim": 32, "num_samples": 4})
    assert args.hidden_dim == 32 and not hasattr(args, "num_samples")
    _, args = speed.build_args("misa:num_samples=6", 1, 10, 10, {"num_samples": 4})
    assert args.num_samples == 6  # the entry's own override wins

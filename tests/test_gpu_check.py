import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = {
    "cuda_tier",
    "bench_fresh",
    "bench_0.003",
    "bench_0.01",
    "density_sweep",
    "memory_1m",
    "nccl",
}
TARGETS = {
    "step_vs_standard_at_1pct",
    "speedup_vs_builtin_at_1pct",
    "step_vs_standard_fresh",
    "auto_vs_best_worst",
    "peak_mem_vs_builtin_at_1pct",
    "memory_1m_dense_vs_builtin",
    "memory_1m_sparse_vs_builtin",
}


def _run(*args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=600,
    )


def test_the_dry_run_runs_every_step_on_the_cpu_and_writes_the_summary(tmp_path: Path):
    out = tmp_path / "gpu-check"
    done = _run("--dry-run", str(out))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert set(summary["steps"]) == STEPS and summary["all_steps_ok"] is True
    steps = {name: step["result"] for name, step in summary["steps"].items()}
    # The CUDA tier: collected and, without a GPU, every test skipped (none passed or hid).
    tier = steps["cuda_tier"]
    assert tier["tests"] >= 10 and tier["skipped"] == tier["tests"]
    assert tier["failures"] == tier["errors"] == tier["passed"] == 0
    for name in ("bench_fresh", "bench_0.003", "bench_0.01"):
        assert steps[name]["auto_choice"] in ("sparse", "dense"), name
        assert steps[name]["auto_vs_best"] > 0, name
    # At most the density asked for, but one row per feature at least.
    one_row = 1 / summary["shape"]["batch"]
    assert steps["bench_0.01"]["gate_density"] <= 0.01
    assert steps["bench_0.003"]["gate_density"] <= max(0.003, one_row)
    assert 0.3 < steps["bench_fresh"]["auto_run_gate_density"][0] < 0.7
    densities = [s["gate_density"] for s in steps["density_sweep"]["density_sweep"]]
    assert len(densities) == 2 and densities == sorted(densities)
    assert (out / "step_vs_gate_density.png").read_bytes()[:4] == b"\x89PNG"
    assert steps["memory_1m"]["d_sae"] == summary["shape"]["memory_d_sae"]
    assert steps["nccl"]["steps"] == summary["shape"]["nccl_steps"]
    assert set(summary["targets"]) == TARGETS
    one = summary["targets"]["step_vs_standard_at_1pct"]
    assert one["value"] == steps["bench_0.01"]["step_ratio_vs_standard"]
    assert one["met"] is (one["value"] <= 0.5)
    # The dry run writes nothing into the checkout.
    assert not (ROOT / "gpu-check").exists()


def test_usage_mistakes_are_one_line_and_exit_2(tmp_path: Path):
    done = _run()
    assert done.returncode == 2
    assert done.stderr.strip() == "usage: scripts/gpu_check.sh [--dry-run] OUT_DIR"
    # The real run needs the wheels the GPU machine lacks (in .whl/ by default).
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    done = _run(str(tmp_path / "out"), GPU_CHECK_WHEELS=str(wheels))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"gpu_check: no wheels in {wheels}: run scripts/gpu_wheels.sh first"
    )
    assert not (tmp_path / "out").exists()


def test_the_wheel_list_pins_one_version_of_each_package():
    lines = [
        line
        for line in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    names = [line.split("==")[0] for line in lines]
    assert all(line.count("==") == 1 for line in lines)
    assert len(names) == len(set(names))
    assert {"sae-lens", "transformer-lens", "wandb", "datasets"} <= set(names)

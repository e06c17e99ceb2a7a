import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_lens_gated.repro import bench
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = {
    "cuda_tier",
    "cuda_compile",
    "cuda_paths",
    "bench_fresh",
    "bench_0.003",
    "bench_0.01",
    "sparse_ops",
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


gpu_check = load_module(ROOT / "scripts" / "gpu_check.py")


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
    # The CUDA tiers: collected and, without a GPU, every test skipped (none passed or hid);
    # with one, every test passed.
    tier, compiled = steps["cuda_tier"], steps["cuda_compile"]
    paths = steps["cuda_paths"]
    assert tier["tests"] >= 10 and compiled["tests"] == 3  # torch.compile's CUDA tests
    assert paths["tests"] >= 8  # two processes, runners, loading and exports
    for counts in (tier, compiled, paths):
        ran = "passed" if torch.cuda.is_available() else "skipped"
        assert counts[ran] == counts["tests"]
        assert counts["failures"] == counts["errors"] == 0
        seconds = [t for _, t in counts["slowest_s"]]  # to size the next limits
        assert (
            len(seconds) == min(5, counts["tests"]) and seconds == sorted(seconds)[::-1]
        )
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
    # Where each mode's step time goes at 1%: one profiled step of each, ops by self time.
    modes = ["SAELens standard", bench.PAPER_DENSE, bench.PAPER_SPARSE]
    path = (out / gpu_check.PROFILE_NAME).resolve()
    assert steps["bench_0.01"]["profile"] == str(path)
    assert list(steps["bench_0.01"]["profile_top_ms"]) == modes
    assert path.read_text().count("===== ") == len(modes)
    assert "profile" not in steps["bench_fresh"]
    # The sparse step's ops at 1%, each alternative checked against the op it replaces.
    ops = steps["sparse_ops"]
    assert ops["agree"] is True and ops["density"] <= 0.02
    shape = summary["shape"]
    assert (ops["d_sae"], ops["batch"]) == (shape["d_sae"], shape["batch"])
    tiles = shape["probe_tiles"]
    assert {f"decode_tiled_{tile}" for tile in tiles} <= set(ops["errors"])
    assert steps["memory_1m"]["d_sae"] == summary["shape"]["memory_d_sae"]
    for mode in ("data", "latent"):
        run = steps["nccl"][mode]
        assert run["mode"] == mode and run["steps"] == summary["shape"]["nccl_steps"]
        assert run["resampled"] > 0, mode  # the event ran on the device
    assert set(summary["targets"]) == TARGETS
    one = summary["targets"]["step_vs_standard_at_1pct"]
    assert one["value"] == steps["bench_0.01"]["step_ratio_vs_standard"]
    assert one["met"] is (one["value"] <= 0.5)
    # The report for docs/performance.md: a row per step and per target.
    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_report.py"),
            str(out / "gpu_check.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name, step in summary["steps"].items():
        assert f"| {name} | yes | {step['seconds']:.3g} |" in report
    value = steps["bench_0.01"]["step_ratio_vs_standard"]
    met = "yes" if value <= 0.5 else "**no**"
    assert f"| step_vs_standard_at_1pct | {value:.3g} | 0.5 | {met} |" in report
    pair = [ops[key]["decode_pair"] for key in ("ms", "vs_matmul", "errors")]
    assert "| decode_pair | {:.3g} | {:.3g} | {:.3g} |".format(*pair) in report
    op, ms = steps["bench_0.01"]["profile_top_ms"][bench.PAPER_SPARSE][0]
    assert f"- {bench.PAPER_SPARSE}: `{op}` {ms:.3g} ms, " in report
    # The dry run writes nothing into the checkout.
    assert not (ROOT / "gpu-check").exists()


def test_some_steps_alone_for_a_rerun(tmp_path: Path):
    out = tmp_path / "rerun"
    done = _run("--dry-run", "--steps", "nccl,memory_1m", str(out))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert list(summary["steps"]) == ["memory_1m", "nccl"]  # in the check's own order
    assert summary["all_steps_ok"] is True
    # Every command's whole output, in order, in the log that comes back with the JSON.
    log = (out / "gpu_check.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("===== ")]
    assert len(headers) == 2 * 3 and headers.count("===== exit status 0") == 3
    commands = [h for h in headers if "exit status" not in h]
    assert "--memory-only" in commands[0]
    assert "--mode data" in commands[1] and "--mode latent" in commands[2]
    assert '"mode": "latent"' in log
    targets = summary["targets"]
    assert (
        targets["memory_1m_dense_vs_builtin"]["value"]
        == (summary["steps"]["memory_1m"]["result"]["dense_peak_mem_ratio_vs_builtin"])
    )
    assert targets["step_vs_standard_at_1pct"] == {
        "value": None,
        "bound": 0.5,
        "met": None,
    }


def test_usage_mistakes_are_one_line_and_exit_2(tmp_path: Path):
    usage = "usage: scripts/gpu_check.sh [--dry-run] [--steps STEP,...] OUT_DIR"
    for args in ((), ("--dry-run",), ("a", "b"), ("--fast", "a"), ("a", "--steps")):
        done = _run(*args)
        assert done.returncode == 2, args
        assert done.stderr.strip() == usage, args
    out = tmp_path / "out"
    for steps, error in (
        ("bench_fresh,nope", "unknown step 'nope'"),
        (",", "no step named"),
    ):
        done = _run("--dry-run", "--steps", steps, str(out))
        assert done.returncode == 2
        assert done.stderr.strip() == f"gpu_check: argument --steps: {error}"
        assert done.stdout == "" and not out.exists()
    # The real run needs the wheels the GPU machine lacks (in .whl/ by default).
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    done = _run(str(tmp_path / "out"), GPU_CHECK_WHEELS=str(wheels))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"gpu_check: no wheels in {wheels}: run scripts/gpu_wheels.sh first"
    )
    assert not (tmp_path / "out").exists()


def test_the_gpu_steps_fit_in_eight_minutes_and_a_stopped_run_keeps_its_summary(
    tmp_path: Path,
):
    limits = gpu_check.GPU.limits
    assert set(limits) == set(gpu_check.DRY_RUN.limits)
    # The three benches share one limit each.
    assert sum(limits.values()) + 2 * limits["bench"] <= 8 * 60
    # The summary is written after each step: a run stopped during the next keeps it.
    summary: dict[str, object] = {"steps": {}}
    gpu_check._step("nccl", summary, lambda: (True, {"data": {}}))
    gpu_check._write_summary(summary, tmp_path)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["all_steps_ok"] is True and list(written["steps"]) == ["nccl"]
    assert set(written["targets"]) == TARGETS


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


def test_a_step_out_of_time_keeps_what_it_printed_before(tmp_path: Path):
    printing = (
        "import time\n"
        "print('tests/saes/test_a.py::test_one[cuda] PASSED   [ 33%]')\n"
        "print('tests/saes/test_a.py::test_two[cuda] FAILED   [ 66%]')\n"
        "print('tests/saes/test_a.py::test_six[cuda] SKIPPED (no CUDA device)', flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "pytest.log"
    ok, output = gpu_check._run([sys.executable, "-c", printing], 3.0, log=log)
    assert not ok and output.startswith("timed out after 3.0 s")
    assert gpu_check.printed_counts(log.read_text()) == {
        "tests": 3,
        "failures": 1,
        "errors": 0,
        "skipped": 1,
    }
    # Lines that are not a test's result are not counted.
    assert gpu_check.printed_counts(
        "collected 3 items\nFAILED tests/a.py::x - boom\n"
    ) == {
        "tests": 0,
        "failures": 0,
        "errors": 0,
        "skipped": 0,
    }


def test_a_failing_command_is_kept_whole_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    log = tmp_path / "gpu_check.log"
    log.write_text("")
    monkeypatch.setattr(gpu_check, "_full_log", log)
    failing = "import sys; print('x' * 5000 + 'END'); sys.exit('boom')"
    ok, output = gpu_check._run([sys.executable, "-c", failing], 30.0)
    assert not ok and len(output) == 3000 and output.endswith("END\nboom\n")
    kept = log.read_text()
    assert "x" * 5000 + "END" in kept and "===== exit status 1" in kept


def test_a_test_tier_out_of_time_reports_what_it_counted():
    # Half a second: pytest is stopped while it imports, before any result or report.
    shape = dataclasses.replace(gpu_check.DRY_RUN, limits={"cuda_tier": 0.5})
    ok, counts = gpu_check._cuda_tier(shape, "cuda_tier")
    assert not ok
    assert counts["log"].startswith("timed out after 0.5 s")
    assert {k: v for k, v in counts.items() if k != "log"} == {
        "tests": 0,
        "failures": 0,
        "errors": 0,
        "skipped": 0,
        "passed": 0,
        "timed_out": True,
    }


def test_the_memory_targets_count_a_builtin_out_of_memory_as_met_by_a_mode_that_fit():
    names = gpu_check.MEMORY_VARIANTS
    assert (names["dense"], names["sparse"], names["builtin"]) == (
        bench.PAPER_DENSE,
        bench.PAPER_SPARSE,
        bench.BUILTIN,
    )

    def targets(memory: dict[str, object]) -> dict[str, dict[str, object]]:
        steps = {"memory_1m": {"ok": True, "result": memory}}
        found = gpu_check._targets(steps)
        return {k: v for k, v in found.items() if k.startswith("memory_1m")}

    measured = targets(
        {
            "dense_peak_mem_ratio_vs_builtin": 0.8,
            "sparse_peak_mem_ratio_vs_builtin": 1.1,
            "out_of_memory": [],
        }
    )
    assert measured["memory_1m_dense_vs_builtin"]["met"] is True
    assert measured["memory_1m_sparse_vs_builtin"]["met"] is False
    both_out = [bench.BUILTIN, bench.PAPER_SPARSE]
    out = targets(
        {
            "dense_peak_mem_ratio_vs_builtin": None,
            "sparse_peak_mem_ratio_vs_builtin": None,
            "out_of_memory": both_out,
        }
    )
    assert out["memory_1m_dense_vs_builtin"] == {
        "value": None,
        "bound": 1.0,
        "met": True,
        "out_of_memory": both_out,
    }
    assert out["memory_1m_sparse_vs_builtin"]["met"] is False
    # A failed step: nothing measured, nothing met.
    assert gpu_check._targets({})["memory_1m_dense_vs_builtin"]["met"] is None


def test_the_report_shows_failures_and_a_tier_out_of_time():
    summary = {
        "dry_run": False,
        "device": "cuda",
        "torch": "2.11.0+cu130",
        "gpu": "NVIDIA H100 80GB HBM3",
        "shape": {"dtype": "bfloat16", "d_in": 2304, "d_sae": 65536, "batch": 4096},
        "steps": {
            "cuda_tier": {
                "ok": False,
                "seconds": 100.2,
                "error": {
                    "tests": 60,
                    "failures": 1,
                    "errors": 0,
                    "skipped": 0,
                    "passed": 59,
                    "timed_out": True,
                    "log": "timed out after 100 s",
                },
            },
            "bench_0.01": {
                "ok": True,
                "seconds": 31.0,
                "result": {
                    "gate_density": 0.01,
                    "step_ratio_vs_standard": 0.41234,
                    "speedup_vs_builtin": 5.5,
                    "peak_mem_ratio_vs_builtin": 0.25,
                    "auto_choice": "sparse",
                    "auto_vs_best": 1.01,
                },
            },
            "nccl": {"ok": False, "seconds": 3.0, "error": "NCCL error"},
        },
        "targets": {
            "step_vs_standard_at_1pct": {"value": 0.41234, "bound": 0.5, "met": True},
            "step_vs_standard_fresh": {"value": None, "bound": 1.2, "met": None},
        },
    }
    report = load_module(ROOT / "scripts" / "gpu_report.py").report(summary)
    assert report.startswith(
        "GPU check on NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130): bfloat16, d_in 2304, "
        "d_sae 65536, batch 4096.\n"
    )
    assert "| cuda_tier | **no** | 100 |" in report
    assert "| nccl | **no** | 3 |" in report
    assert "| bench_0.01 | 0.01 | 0.412 | 5.5 | 0.25 | sparse | 1.01 |" in report
    assert (
        "cuda_tier: 59 passed, 1 failed, 0 errors, 0 skipped (out of time)." in report
    )
    assert "| step_vs_standard_at_1pct | 0.412 | 0.5 | yes |" in report
    assert "| step_vs_standard_fresh | - | 1.2 | - |" in report

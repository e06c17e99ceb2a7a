import json
import math
import time
from typing import Any

import pytest
import torch

from sae_lens_gated.repro.bench import BenchConfig, format_report, run_benchmark

# (batch x d_in x d_sae) matmuls in one training step, counted by hand (docs/performance.md):
# the plugin's single encoder matmul serves the gate, the magnitudes and the aux loss.
EXPECTED_MATMULS = {
    "plugin (paper)": 7,  # encoder, decoder, frozen aux decoder | W_enc, W_dec grads, 2 input grads
    "plugin (april_update)": 8,  # the aux decoder trains: one more W_dec gradient
    "SAELens built-in gated": 13,  # 3 encoder matmuls, 2 decoders | 8 in backward
    "SAELens standard": 6,  # encoder, decoder | 4 in backward
}

CFG = BenchConfig(d_in=32, d_sae=256, batch=512, repeats=3)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    return run_benchmark(CFG, progress=False)


def test_bench_counts_the_matmuls_each_design_needs(result: dict[str, Any]):
    matmuls = result["matmuls_per_step"]
    # Whole matmuls plus at most a few small products (b_dec's gradient, a norm).
    assert {name: round(count) for name, count in matmuls.items()} == EXPECTED_MATMULS
    for name, count in matmuls.items():
        assert 0 <= count - EXPECTED_MATMULS[name] < 0.01, name


def test_bench_timings_are_seconds_and_its_gemm_rate_matches_a_timed_matmul(
    result: dict[str, Any],
):
    # The best of matmuls of the benchmark's shape timed here (the first few warm up).
    a = torch.randn(CFG.batch, CFG.d_in)
    b = torch.randn(CFG.d_in, CFG.d_sae)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    best_seconds = min(times[5:])
    best_rate = 2 * CFG.batch * CFG.d_in * CFG.d_sae / best_seconds

    steps = result["step_seconds"]
    assert set(steps) == set(EXPECTED_MATMULS)
    for name, seconds in steps.items():
        # In seconds, and at least the cost of the (6 or more) dense matmuls of a step.
        assert math.isfinite(seconds) and 3 * best_seconds < seconds < 60, name
    # The reported matmul rate is in FLOP/s and no faster than the best here (it is a
    # median of a few). Only loosely below: on a loaded machine a descheduled worker
    # thread can stretch a 0.1 ms matmul to 20 ms.
    assert 0 < result["gemm_seconds"] < 1
    assert best_rate / 1000 < result["gemm_flops_per_second"] < best_rate * 2
    peaks = result["peak_memory_bytes"]
    assert all(p >= 0 or math.isnan(p) for p in peaks.values())


def test_bench_report_ends_with_its_summary_as_json(result: dict[str, Any]):
    report = format_report(result)

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    summary = json.loads(report.splitlines()[-1], parse_constant=strict)
    assert summary == result["summary"]
    assert (summary["d_in"], summary["d_sae"], summary["batch"]) == (32, 256, 512)
    assert (summary["device"], summary["dtype"]) == ("cpu", "float32")
    for name in EXPECTED_MATMULS:
        assert name in report
    assert "7.00 matmuls' FLOPs per step" in report


def test_bench_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="float16")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="batch must be at least 1, got -2"):
        BenchConfig(batch=-2)
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        BenchConfig(device="gpu0")


def test_bench_config_rejects_bad_gate_densities():
    for density in (0.0, -0.1, 2.0, float("nan")):
        with pytest.raises(ValueError, match="gate densities must be fractions"):
            BenchConfig(gate_density=density)
    with pytest.raises(ValueError, match="gate densities must be fractions"):
        BenchConfig(density_sweep=(0.01, 1.5))
    with pytest.raises(ValueError, match="not both"):
        BenchConfig(gate_density=0.01, density_sweep=(0.01,))


SMALL: dict[str, Any] = {"d_in": 32, "d_sae": 512, "batch": 512, "repeats": 2}


def test_bench_sets_the_gate_density_and_times_the_limit():
    result = run_benchmark(BenchConfig(gate_density=0.02, **SMALL), progress=False)
    summary = result["summary"]
    # 2% of 512 rows is 10 open rows per feature, exactly.
    assert summary["gate_density"] == pytest.approx(10 / 512)
    steps = result["step_seconds"]
    assert {
        "plugin (paper, dense steps)",
        "plugin (paper, sparse steps)",
    } <= set(steps)
    assert summary["step_ratio_vs_limit"] == pytest.approx(
        steps["plugin (paper)"] / summary["limit_s"]
    )
    # The limit is one matmul and one pass: at least a matmul, well under a step.
    assert result["gemm_seconds"] / 3 < summary["limit_s"] < steps["SAELens standard"]
    # After its warm-up step, "auto" takes sparse steps here: about one matmul's FLOPs.
    matmuls = result["matmuls_per_step"]
    assert matmuls["plugin (paper)"] == pytest.approx(1.0, abs=0.01)
    assert matmuls["plugin (paper, sparse steps)"] == pytest.approx(1.0, abs=0.01)
    assert round(matmuls["plugin (paper, dense steps)"]) == 7
    report = format_report(result)
    assert json.loads(report.splitlines()[-1]) == summary
    assert "Gate density 1.95%" in report


def test_a_density_sweep_plots_step_time_against_density(tmp_path: Any):
    plot = tmp_path / "density.png"
    result = run_benchmark(
        BenchConfig(density_sweep=(0.01, 0.2), plot=plot, **SMALL), progress=False
    )
    densities = [s["gate_density"] for s in result["summary"]["density_sweep"]]
    assert densities == pytest.approx([5 / 512, 102 / 512])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = format_report(result)
    assert json.loads(report.splitlines()[-1]) == result["summary"]
    assert report.count("Gate density") == 2

import json

import pytest

from sae_lens_gated.repro.bench import (
    MATMULS_PER_STEP,
    BenchConfig,
    format_report,
    run_benchmark,
)


def test_bench_reports_consistent_ratios_and_a_json_last_line():
    cfg = BenchConfig(d_in=32, d_sae=128, batch=256, repeats=2)
    result = run_benchmark(cfg, progress=False)
    steps = result["step_seconds"]
    assert set(steps) == set(MATMULS_PER_STEP)
    assert all(t > 0 for t in steps.values())
    summary = result["summary"]
    assert summary["step_ratio_vs_standard"] == pytest.approx(
        steps["plugin (paper)"] / steps["SAELens standard"]
    )
    assert summary["speedup_vs_builtin"] == pytest.approx(
        steps["SAELens built-in gated"] / steps["plugin (paper)"]
    )
    assert summary["fraction_of_gemm_roofline"] == pytest.approx(
        7 * result["gemm_seconds"] / steps["plugin (paper)"]
    )
    report = format_report(result)
    last = json.loads(report.splitlines()[-1])
    for key in (
        "step_ratio_vs_standard",
        "speedup_vs_builtin",
        "encode_speedup_vs_builtin",
        "peak_mem_ratio_vs_builtin",
        "fraction_of_gemm_roofline",
        "d_in",
        "d_sae",
        "batch",
    ):
        assert key in last
    assert (last["d_in"], last["d_sae"], last["batch"]) == (32, 128, 256)
    assert "plugin (paper)" in report and "SAELens built-in gated" in report


def test_bench_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="float16")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=">= 1"):
        BenchConfig(repeats=0)

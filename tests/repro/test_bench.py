import json
import math
import statistics
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
    steps = result["step_seconds"]
    assert set(steps) == set(EXPECTED_MATMULS)
    # Positive and finite, and a training step costs at least its dense matmuls.
    gemm = result["gemm_seconds"]
    assert 0 < gemm < 1
    for name, seconds in steps.items():
        assert math.isfinite(seconds) and seconds > gemm, name
    # The reported matmul rate, in FLOP/s, against one timed here (loose: a shared machine).
    a = torch.randn(CFG.batch, CFG.d_in)
    b = torch.randn(CFG.d_in, CFG.d_sae)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    direct = 2 * CFG.batch * CFG.d_in * CFG.d_sae / statistics.median(times)
    assert direct / 4 < result["gemm_flops_per_second"] < direct * 4
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

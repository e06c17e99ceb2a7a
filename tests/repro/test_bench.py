import json
import math
import statistics
import time
from typing import Any

import pytest
import torch

from sae_lens_gated.repro import bench
from sae_lens_gated.repro.bench import (
    PAPER_DENSE,
    PAPER_SPARSE,
    BenchConfig,
    format_report,
    run_benchmark,
)
from sae_lens_gated.training.sparse_policy import PROBE_STEPS, SparseStepPolicy

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
    with pytest.raises(
        ValueError, match=r"auto_steps must be 0 or at least 9 \(.*\), got 5\."
    ):
        BenchConfig(auto_steps=5)


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
    # A sparse step costs about one matmul's FLOPs, a dense one 7. "auto" decided before
    # it was timed (on this machine's clock) and then took the steps it chose.
    matmuls = result["matmuls_per_step"]
    assert matmuls["plugin (paper, sparse steps)"] == pytest.approx(1.0, abs=0.01)
    assert round(matmuls["plugin (paper, dense steps)"]) == 7
    chosen = {"sparse": PAPER_SPARSE, "dense": PAPER_DENSE}[summary["paper_auto_mode"]]
    assert matmuls["plugin (paper)"] == pytest.approx(matmuls[chosen], abs=0.01)
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


class _ScriptedClock:
    """Each reading moves time on by the step's cost: sparse steps 1 s, dense 3 s."""

    def __init__(self, policy: SparseStepPolicy) -> None:
        self.policy, self.now, self.started = policy, 0.0, False

    def __call__(self) -> float:
        position = self.policy.probe_position
        assert position is not None  # read on timed probe steps only
        if self.started:  # the second reading of a step
            self.now += 1.0 if self.policy.next_sparse() else 3.0
        self.started = not self.started
        return self.now


def test_auto_steps_compare_auto_with_both_forced_modes(
    monkeypatch: pytest.MonkeyPatch,
):
    # auto decides on a scripted clock (sparse 3x faster); the benchmark's own clock
    # stays real, as do the step times it reports.
    built: list[SparseStepPolicy] = []
    real_init = SparseStepPolicy.__init__

    def scripted_init(policy: SparseStepPolicy, *args: Any, **kwargs: Any) -> None:
        real_init(policy, *args, **kwargs)
        policy.clock = _ScriptedClock(policy)
        built.append(policy)

    monkeypatch.setattr(SparseStepPolicy, "__init__", scripted_init)
    seconds: list[float] = []
    real_measure = bench._measure

    def measure(fn: Any, device: torch.device) -> tuple[float, float]:
        result = real_measure(fn, device)
        seconds.append(result[0])
        return result

    monkeypatch.setattr(bench, "_measure", measure)
    n = PROBE_STEPS + 6
    cfg = BenchConfig(gate_density=0.02, auto_steps=n, **SMALL)
    result = run_benchmark(cfg, progress=False)
    summary = result["summary"]
    assert summary["auto_choice"] == "sparse"
    assert summary["auto_decided_at_step"] == 1 + PROBE_STEPS
    # The auto run comes first: its step times are the first 3n measurements, interleaved
    # in the order (auto, always, never) rotated by one at each step.
    runs: dict[str, list[float]] = {"auto": [], "always": [], "never": []}
    for t in range(n):
        names = list(runs)[t % 3 :] + list(runs)[: t % 3]
        for j, name in enumerate(names):
            runs[name].append(seconds[3 * t + j])
    auto_t, always_t, never_t = runs.values()
    first = 1 + PROBE_STEPS
    medians = [statistics.median(t[first:]) for t in (auto_t, always_t, never_t)]
    assert summary["auto_step_seconds"] == {
        "auto": medians[0],
        "always": medians[1],
        "never": medians[2],
    }
    best = min(medians[1:])
    assert summary["auto_vs_best"] == pytest.approx(medians[0] / best)
    probe_extra = sum(t - best for t in auto_t[1:first])
    assert summary["probe_cost_steps"] == pytest.approx(probe_extra / best)
    # The density stays where it was set: at the start, exactly the benchmark's (the same
    # weights and batch), at the end on a fresh batch, close to it.
    start, end = summary["auto_run_gate_density"]
    assert start == summary["gate_density"]
    assert end == pytest.approx(start, rel=0.2)
    report = format_report(result)
    assert f"sparse_step=auto over {n} steps: chose sparse steps" in report
    assert json.loads(report.splitlines()[-1]) == summary


def test_memory_only_measures_one_pass_of_each_variant_alone():
    cfg = BenchConfig(memory_only=True, gate_density=0.01, **SMALL)
    result = run_benchmark(cfg, progress=False)
    peaks = result["peak_memory_bytes"]
    assert set(peaks) == {PAPER_DENSE, PAPER_SPARSE, "SAELens built-in gated"}
    summary = result["summary"]
    builtin = peaks["SAELens built-in gated"]
    for mode, name in (("dense", PAPER_DENSE), ("sparse", PAPER_SPARSE)):
        # null where the CPU's resident-set measure saw the built-in's pass add nothing
        expected = peaks[name] / builtin if builtin > 0 else None
        assert summary[f"{mode}_peak_mem_ratio_vs_builtin"] == expected
    report = format_report(result)
    assert report.startswith("Peak memory of one forward and backward pass, batch=512")
    assert json.loads(report.splitlines()[-1]) == summary
    with pytest.raises(ValueError, match="memory_only measures no times"):
        BenchConfig(memory_only=True, auto_steps=20)

import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.autograd import DeviceType
from transformer_lens import HookedTransformer

from sae_lens_gated.repro import bench
from sae_lens_gated.repro.bench import (
    PAPER_DENSE,
    PAPER_SPARSE,
    BenchConfig,
    format_report,
    multi_runner_l1_coefficients,
    run_benchmark,
)
from sae_lens_gated.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
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
    # Timed for a second, not a few times: on a busy machine most of a few can be
    # descheduled (best of 25 was once 7.8 ms, 70x the quiet best).
    a = torch.randn(CFG.batch, CFG.d_in)
    b = torch.randn(CFG.d_in, CFG.d_sae)
    times: list[float] = []
    until = time.perf_counter() + 1.0
    while len(times) < 30 or time.perf_counter() < until:
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
    assert "Optimizer: the plugin's rows step Adam as PyTorch's fused kernel" in report


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
    # The limit is one matmul and one pass: about a matmul, well under a step. Loosely
    # above: the two are timed at different moments, and on a busy machine the median
    # matmul once took 4x the limit (a unit slip would be 1000x).
    assert result["gemm_seconds"] / 30 < summary["limit_s"] < steps["SAELens standard"]
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


def test_profile_records_one_step_of_each_mode(tmp_path: Path):
    path = tmp_path / "profile.txt"
    cfg = BenchConfig(gate_density=0.02, profile=path, **SMALL)
    result = run_benchmark(cfg, progress=False)
    summary = result["summary"]
    assert summary["profile"] == str(path)
    text = path.read_text()
    sections = {block.split(":", 1)[0]: block for block in text.split("===== ")[1:]}
    assert set(sections) == {"SAELens standard", PAPER_DENSE, PAPER_SPARSE}
    # The sparse step gathers on the open gates and sorts them by feature; the dense
    # one does neither.
    assert "aten::_embedding_bag" in sections[PAPER_SPARSE]
    assert "aten::sort" in sections[PAPER_SPARSE]
    assert "embedding_bag" not in sections[PAPER_DENSE]
    assert "aten::sort" not in sections[PAPER_DENSE]
    for name, ops in summary["profile_top_ms"].items():
        times = [ms for _, ms in ops]
        assert len(ops) == bench.PROFILE_TOP_OPS and times == sorted(times)[::-1]
        # Milliseconds of one step: positive, and within a step's time (a unit slip
        # would be 1000x off).
        assert 0 < sum(times) < 10 * 1000 * result["step_seconds"][name], name
    assert f"Profile of one step each ({path})" in format_report(result)
    assert json.loads(json.dumps(result))["config"]["profile"] == str(path)


class _SilentProfiler:
    """A profiler that records ops without time, as without CUPTI on a GPU."""

    def __init__(self, **_: Any) -> None:
        pass

    def __enter__(self) -> "_SilentProfiler":
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def key_averages(self) -> list[Any]:
        op = SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU)
        return [SimpleNamespace(**vars(op), self_cpu_time_total=0.0)]


def _failing_profiler(**_: Any) -> Any:
    raise RuntimeError("CUPTI could not be loaded")


@pytest.mark.parametrize(
    ("profiler", "error"),
    [
        (_failing_profiler, "CUPTI could not be loaded"),
        (_SilentProfiler, "the profiler recorded no self_cpu_time_total"),
    ],
)
def test_a_failing_profiler_keeps_the_timings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profiler: Any, error: str
):
    monkeypatch.setattr(torch.profiler, "profile", profiler)
    path = tmp_path / "profile.txt"
    result = run_benchmark(BenchConfig(profile=path, **SMALL), progress=False)
    summary = result["summary"]
    assert summary["profile_error"] == f"SAELens standard: {error}"
    assert "profile" not in summary and not path.exists()
    assert summary["step_ratio_vs_standard"] > 0
    assert f"Profile failed: SAELens standard: {error}" in format_report(result)


def test_profile_settings_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="drop memory_only"):
        BenchConfig(memory_only=True, profile=tmp_path / "p.txt")
    with pytest.raises(ValueError, match="drop density_sweep"):
        BenchConfig(density_sweep=(0.01,), profile=tmp_path / "p.txt")
    for bad in (tmp_path, tmp_path / "missing" / "p.txt"):
        with pytest.raises(ValueError, match="profile must be a text file"):
            BenchConfig(profile=bad)


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
    assert summary["out_of_memory"] == []
    with pytest.raises(ValueError, match="memory_only measures no times"):
        BenchConfig(memory_only=True, auto_steps=20)


def test_a_variant_out_of_gpu_memory_is_reported_and_the_others_still_measured(
    monkeypatch: pytest.MonkeyPatch,
):
    builtin = bench.BuiltinGatedTrainingSAE
    real_pass = builtin.training_forward_pass

    def no_room(self: Any, step_input: Any) -> Any:
        if type(self) is builtin:  # the plugin's SAEs subclass it
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 4 GiB"
            )
        return real_pass(self, step_input)

    monkeypatch.setattr(builtin, "training_forward_pass", no_room)
    result = run_benchmark(
        BenchConfig(memory_only=True, gate_density=0.01, **SMALL), progress=False
    )
    peaks = result["peak_memory_bytes"]
    assert peaks["SAELens built-in gated"] is None
    assert peaks[PAPER_DENSE] is not None and peaks[PAPER_SPARSE] is not None
    summary = result["summary"]
    assert summary["out_of_memory"] == ["SAELens built-in gated"]
    assert summary["dense_peak_mem_ratio_vs_builtin"] is None
    assert summary["sparse_peak_mem_ratio_vs_builtin"] is None
    lines = format_report(result).splitlines()
    assert lines[-2] == f"{'SAELens built-in gated':<30}   out of memory"
    assert json.loads(lines[-1]) == summary


# The multi-runner comparison at tiny shapes: 2 SAEs of 4 x 32 latents on a 2-layer model.
MULTI: dict[str, Any] = {
    "multi_runner": 2,
    "lm_layers": 2,
    "d_in": 32,
    "batch": 64,
    "lm_steps": 4,
    "repeats": 2,
}


def test_multi_runner_l1_coefficients_are_geometric_around_one():
    l1s = multi_runner_l1_coefficients(4)
    assert l1s == pytest.approx([2**-1.5, 2**-0.5, 2**0.5, 2**1.5])
    assert math.prod(l1s) == pytest.approx(1.0)
    assert multi_runner_l1_coefficients(1) == [1.0]


def test_multi_runner_times_one_multi_run_against_k_single_runs(
    monkeypatch: pytest.MonkeyPatch,
):
    runs: list[dict[str, Any]] = []

    class SingleRunner(bench.LanguageModelSAETrainingRunner):
        def run(self) -> Any:
            sae = super().run()
            runs.append({"runner": self, "saes": {"single": sae}})
            return sae

    class MultiRunner(bench.MultiSAETrainingRunner):
        def run(self) -> Any:
            saes = super().run()
            runs.append({"runner": self, "saes": saes})
            return saes

    monkeypatch.setattr(bench, "LanguageModelSAETrainingRunner", SingleRunner)
    monkeypatch.setattr(bench, "MultiSAETrainingRunner", MultiRunner)
    timed: list[float] = []
    real_time_run = bench._time_run

    def time_run(*args: Any) -> float:
        seconds = real_time_run(*args)
        timed.append(seconds)
        return seconds

    monkeypatch.setattr(bench, "_time_run", time_run)
    result = run_benchmark(BenchConfig(**MULTI), progress=False)

    # The multi run first, then one single run per lambda, in order.
    multi, *singles = runs
    l1s = [2**-0.5, 2**0.5]
    multi_runner = multi["runner"]
    assert isinstance(multi_runner, MultiRunner)
    assert [type(run["runner"]) for run in singles] == [SingleRunner] * 2
    multi_cfg = multi_runner.cfg
    gated_cfgs = [
        c for c in multi_cfg.saes.values() if isinstance(c, GatedTrainingSAEConfig)
    ]
    assert [c.l1_coefficient for c in gated_cfgs] == l1s
    assert [run["runner"].cfg.sae.l1_coefficient for run in singles] == l1s
    trained = [*multi["saes"].values(), *(run["saes"]["single"] for run in singles)]
    assert [sae.cfg.l1_coefficient for sae in trained] == l1s + l1s
    for sae in trained:
        assert isinstance(sae, GatedTrainingSAE)
        assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.recipe) == (32, 128, "paper")
    # The same model object, dataset rows, steps and optimizer for every run, and
    # nothing written or logged.
    for run in runs:
        cfg = run["runner"].cfg
        assert run["runner"].model is multi_runner.model
        assert (cfg.training_tokens, cfg.train_batch_size_tokens) == (4 * 64, 64)
        assert (cfg.lr, cfg.adam_beta1, cfg.seed) == (3e-4, 0.0, 0)
        assert (cfg.output_path, cfg.checkpoint_path) == (None, None)
        assert not cfg.logger.log_to_wandb
        store = run["runner"].activations_store
        assert (
            store.n_dataset_processed
            == multi_runner.activations_store.n_dataset_processed
        )
    assert multi_cfg.hook_names == "blocks.1.hook_resid_post"
    assert singles[0]["runner"].cfg.hook_name == "blocks.1.hook_resid_post"
    model = multi_runner.model
    assert isinstance(model, HookedTransformer) and model.cfg.n_layers == 2

    summary = result["summary"]
    assert summary["multi_seconds"] == timed[0]
    assert summary["single_seconds"] == timed[1:]
    assert summary["multi_vs_sum_of_singles"] == timed[0] / sum(timed[1:])
    assert summary["lm_forward_vs_sae_step"] == (
        result["lm_forward_seconds"] / result["sae_step_seconds"]
    )
    assert summary["l1_coefficients"] == l1s
    assert (summary["k"], summary["d_in"], summary["d_sae"]) == (2, 32, 128)
    report = format_report(result)
    assert (
        f"multi / sum of 2 singles: {summary['multi_vs_sum_of_singles']:.3f}" in report
    )
    assert json.loads(report.splitlines()[-1]) == summary


def test_multi_runner_settings_are_checked():
    with pytest.raises(ValueError, match="multi_runner must be 0 .*got -1"):
        BenchConfig(multi_runner=-1)
    others: dict[str, Any] = {
        "memory_only": True,
        "density_sweep": (0.01,),
        "auto_steps": 20,
        "d_sae": 4096,
    }
    for name, value in others.items():
        with pytest.raises(ValueError, match=f"runner comparison .*drop {name}"):
            BenchConfig(multi_runner=4, **{name: value})
    for name in ("lm_layers", "lm_expansion", "lm_steps"):
        zero: dict[str, Any] = {name: 0}
        with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
            BenchConfig(multi_runner=4, **zero)


def test_multi_runner_starts_every_run_from_one_initialization_at_the_gate_density(
    monkeypatch: pytest.MonkeyPatch,
):
    opened: list[tuple[float, dict[str, torch.Tensor]]] = []
    real_open_gates = bench._open_gates

    def open_gates(sae: Any, x: torch.Tensor, fraction: float) -> None:
        assert fraction == 0.01
        real_open_gates(sae, x, fraction)
        with torch.no_grad():
            density = float(
                (sae.process_sae_in(x) @ sae.W_enc + sae.b_gate > 0).float().mean()
            )
        # At most the fraction, but at least one row per feature.
        assert 0.0 < density <= max(fraction, 1 / x.shape[0])
        opened.append((density, {k: v.clone() for k, v in sae.state_dict().items()}))

    monkeypatch.setattr(bench, "_open_gates", open_gates)
    settings: dict[str, Any] = {
        **MULTI,
        "lm_steps": 1 + PROBE_STEPS + 2,
    }  # auto decides
    result = run_benchmark(BenchConfig(**settings, gate_density=0.01), progress=False)

    # The regime's SAE, the multi run's two and the two single runs' SAEs.
    assert len(opened) == 5
    first = opened[0][1]
    for _, state in opened:
        for name in ("W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec"):
            assert torch.equal(state[name], first[name]), name
    assert len(result["auto_modes"]) == 4
    assert set(result["auto_modes"]) <= {"dense", "sparse"}
    assert result["summary"]["regime_step_mode"] in ("dense", "sparse")
    assert result["summary"]["gate_density"] == 0.01
    assert "gates opened on 1.00% of a batch" in format_report(result)
    assert "auto ran: " in format_report(result)

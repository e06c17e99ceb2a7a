"""``sae-lens-gated bench``: the plugin's gated SAE against SAELens's, measured side by side.

Every variant runs a real training step of SAELens's own ``SAETrainer`` (forward, backward,
gradient clipping, Adam, LR and coefficient schedulers, and the plugin's optimizer hooks)
on the same batch. Variants are interleaved (A B C D A B C D ...) after a warm-up, and the
median of the repetitions is reported, so slow drifts of a noisy machine hit all of them
alike and the ratios measured in one run are comparable.
"""

import dataclasses
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens.saes.gated_sae import GatedSAE as BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as BuiltinGatedSAEConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE as BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as BuiltinGatedTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from sae_lens_gated.repro.experiments import (
    TrainingSettings,
    check_counts,
    check_device,
    trainer_config,
)
from sae_lens_gated.saes.gated_sae import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
)
from sae_lens_gated.training.sparse_policy import PROBE_STEPS, synchronize_device


@dataclass
class BenchConfig:
    """Settings of ``sae-lens-gated bench``.

    Args:
        d_in: Input width.
        d_sae: Dictionary size (the same for every variant).
        batch: Activations per training step.
        device: Torch device.
        dtype: ``"float32"``, or ``"bfloat16"`` for bf16 autocast with float32 master weights.
        repeats: Timed repetitions per variant (after one warm-up step each).
        seed: Seed for weights and the batch.
        gate_density: Set every SAE's gate (or encoder) bias so that this fraction of its
            gates is open on the benchmark batch, and also time the plugin's dense and
            sparse steps and the limit (one encoder matmul and one elementwise pass). Unset:
            the fresh SAEs' own, about half open.
        density_sweep: Run the benchmark at each of these gate densities and plot step
            time against density to ``plot`` (with the numbers in a JSON file beside it).
        plot: PNG file for ``density_sweep``'s plot.
        auto_steps: Also train this many steps from one start under each of
            ``sparse_step`` ``auto``, ``always`` and ``never`` (interleaved), and report
            auto's choice, its step time after deciding over the faster forced mode's
            (``auto_vs_best``) and the extra time its probe took (``probe_cost_steps``, in
            steps of the faster mode). 0: not run; else at least 9 (a probe takes 7).
        memory_only: Measure only the memory of one forward and backward pass of the plugin's
            dense and sparse steps and of the built-in gated SAE, one SAE at a time
            (``torch.cuda.max_memory_allocated`` on CUDA), for widths where six SAEs with
            their optimizers do not fit on the device together (d_sae 1,048,576).
    """

    d_in: int = 512
    d_sae: int = 8192
    batch: int = 4096
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    repeats: int = 5
    seed: int = 0
    gate_density: float | None = None
    density_sweep: tuple[float, ...] = ()
    plot: Path = Path("bench_density.png")
    auto_steps: int = 0
    memory_only: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}.")
        check_counts(
            d_in=self.d_in, d_sae=self.d_sae, batch=self.batch, repeats=self.repeats
        )
        check_device(self.device)
        densities = [*self.density_sweep]
        if self.gate_density is not None:
            densities.append(self.gate_density)
        for density in densities:
            if not (math.isfinite(density) and 0 < density <= 1):
                raise ValueError(
                    f"gate densities must be fractions in (0, 1], got {density}."
                )
        if self.density_sweep and self.gate_density is not None:
            raise ValueError("Give gate_density or density_sweep, not both.")
        if self.density_sweep and self.plot.is_dir():
            raise ValueError(f"plot must be a PNG file, but {self.plot} is a folder.")
        if self.memory_only and (self.density_sweep or self.auto_steps):
            raise ValueError(
                "memory_only measures no times: drop density_sweep/auto_steps."
            )
        if self.auto_steps != 0 and self.auto_steps < AUTO_MIN_STEPS:
            raise ValueError(
                f"auto_steps must be 0 or at least {AUTO_MIN_STEPS} (auto's first step "
                f"is dense and a probe takes {PROBE_STEPS} steps), got {self.auto_steps}."
            )


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Measure every variant and return the numbers behind the report.

    With ``density_sweep``, the result holds one benchmark per density
    (``"density_sweep"``), their summaries as the summary, and the plot is written.
    """
    if cfg.memory_only:
        return _memory_benchmark(cfg, progress)
    if cfg.density_sweep:
        runs = [
            run_benchmark(
                dataclasses.replace(cfg, gate_density=density, density_sweep=()),
                progress,
            )
            for density in tqdm(
                cfg.density_sweep, desc="densities", disable=not progress
            )
        ]
        from sae_lens_gated.repro.plots import plot_density_sweep

        plot_density_sweep(runs, cfg.plot, DENSITY_SWEEP_LINES)
        # The numbers behind the plot, to re-plot or compare later.
        cfg.plot.with_suffix(".json").write_text(json.dumps(runs, indent=1))
        return {
            "density_sweep": runs,
            "plot": str(cfg.plot),
            "summary": {"density_sweep": [run["summary"] for run in runs]},
        }
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    x = torch.randn(cfg.batch, cfg.d_in, device=device)
    trainers = _build_trainers(cfg)
    encoders = _build_encoders(cfg)
    measured_density = None
    if cfg.gate_density is not None:
        for trainer in trainers.values():
            _open_gates(trainer.sae, x, cfg.gate_density)
        measured_density = _open_fraction(trainers[PAPER].sae, x)
        # Let "auto" decide before it is timed: the steps below are the ones it then takes.
        for _ in tqdm(
            range(1 + PROBE_STEPS), desc="auto decides", disable=not progress
        ):
            trainers[PAPER].step(x)
    auto = _auto_run(cfg, x, progress) if cfg.auto_steps else {}

    n_rounds = cfg.repeats + 1
    step_times: dict[str, list[float]] = {name: [] for name in trainers}
    encode_times: dict[str, list[float]] = {name: [] for name in encoders}
    peaks: dict[str, list[float]] = {name: [] for name in trainers}
    gemm_times: list[float] = []
    limit_times: list[float] = []
    out = torch.empty(cfg.batch, cfg.d_sae, device=device, dtype=_work_dtype(cfg))
    gemm_a = x.to(out.dtype)
    gemm_b = torch.randn(cfg.d_in, cfg.d_sae, device=device, dtype=out.dtype)
    gemm_bias = torch.randn(cfg.d_sae, device=device, dtype=out.dtype)

    def limit() -> None:
        # What any gated step must do: the dense encoder matmul and one elementwise pass.
        torch.addmm(gemm_bias, gemm_a, gemm_b, out=out)
        torch.relu_(out)

    flops_per_matmul = 2 * cfg.batch * cfg.d_in * cfg.d_sae
    matmuls: dict[str, float] = {}

    rounds = tqdm(range(n_rounds), desc="bench rounds", disable=not progress)
    for round_index in rounds:
        gc.collect()  # once per round: a full collection takes long in a big process
        if round_index == 1:
            # One counted step per variant after the warm-up round, so that each variant
            # counts the kind of step (dense or sparse) it then takes.
            matmuls = {
                name: _matmul_flops(lambda t=trainer: t.step(x)) / flops_per_matmul
                for name, trainer in trainers.items()
            }
        for name, trainer in trainers.items():
            seconds, peak = _measure(lambda t=trainer: t.step(x), device)
            if round_index > 0:  # the first round is warm-up
                step_times[name].append(seconds)
                peaks[name].append(peak)
        with torch.no_grad():
            for name, sae in encoders.items():
                seconds, _ = _measure(lambda s=sae: s.encode(x), device)
                if round_index > 0:
                    encode_times[name].append(seconds)
        seconds, _ = _measure(lambda: torch.mm(gemm_a, gemm_b, out=out), device)
        if round_index > 0:
            gemm_times.append(seconds)
        if cfg.gate_density is not None:
            seconds, _ = _measure(limit, device)
            if round_index > 0:
                limit_times.append(seconds)

    step = {name: statistics.median(v) for name, v in step_times.items()}
    encode = {name: statistics.median(v) for name, v in encode_times.items()}
    peak = {name: statistics.median(v) for name, v in peaks.items()}
    gemm = statistics.median(gemm_times)
    paper, builtin, standard = PAPER, BUILTIN, STANDARD
    achieved = matmuls[paper] * flops_per_matmul / step[paper]
    density: dict[str, Any] = {}
    if measured_density is not None:
        limit_s = statistics.median(limit_times)
        density = {
            "gate_density": measured_density,
            "limit_s": limit_s,
            "step_ratio_vs_limit": step[paper] / limit_s,
        }
    return {
        "config": {**asdict(cfg), "plot": str(cfg.plot)},
        "machine": _machine(device),
        "step_seconds": step,
        "step_spread": {n: _spread(v) for n, v in step_times.items()},
        "encode_seconds": encode,
        "peak_memory_bytes": peak,
        "memory_measure": _memory_measure_name(device),
        "matmuls_per_step": matmuls,
        "gemm_seconds": gemm,
        "gemm_flops_per_second": flops_per_matmul / gemm,
        "plugin_flops_per_second": achieved,
        "tokens_per_second": {n: cfg.batch / t for n, t in step.items()},
        "summary": {
            "step_ratio_vs_standard": step[paper] / step[standard],
            "speedup_vs_builtin": step[builtin] / step[paper],
            "april_update_speedup_vs_builtin": step[builtin]
            / step["plugin (april_update)"],
            "encode_speedup_vs_builtin": encode["SAELens built-in"] / encode["plugin"],
            # null, not NaN (which strict JSON parsers refuse), when not measurable.
            "peak_mem_ratio_vs_builtin": peak[paper] / peak[builtin]
            if peak[builtin] > 0
            else None,
            "fraction_of_gemm_roofline": achieved / (flops_per_matmul / gemm),
            "paper_auto_mode": _decided_mode(trainers[PAPER].sae),
            **density,
            **auto,
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "batch": cfg.batch,
            "device": cfg.device,
            "dtype": cfg.dtype,
        },
    }


def format_report(result: dict[str, Any]) -> str:
    """A readable table of :func:`run_benchmark`'s result, then its summary as one JSON line."""
    if "memory_only" in result:
        cfg = result["config"]
        lines = [
            f"Peak memory of one forward and backward pass, batch={cfg['batch']}, "
            f"d_in={cfg['d_in']}, d_sae={cfg['d_sae']}, {cfg['device']}, {cfg['dtype']} "
            f"({result['memory_measure']})",
            *(
                f"{name:<30}{peak / 2**20:>10.0f} MiB"
                for name, peak in result["peak_memory_bytes"].items()
            ),
            json.dumps(result["summary"]),
        ]
        return "\n".join(lines)
    if "density_sweep" in result:
        reports = [
            format_report(run).rsplit("\n", 1)[0] for run in result["density_sweep"]
        ]
        return "\n\n".join(
            [*reports, f"Plot: {result['plot']}", json.dumps(result["summary"])]
        )
    cfg, summary = result["config"], result["summary"]
    standard = result["step_seconds"]["SAELens standard"]
    builtin = result["step_seconds"]["SAELens built-in gated"]
    lines = [
        f"Training step, batch={cfg['batch']}, d_in={cfg['d_in']}, d_sae={cfg['d_sae']}, "
        f"{cfg['device']}, {cfg['dtype']} (median of {cfg['repeats']}, interleaved)",
        f"{'variant':<30}{'step s':>9}{'spread':>9}{'x std':>7}{'vs built-in':>12}"
        f"{'tokens/s':>11}{'peak MiB':>10}",
    ]
    for name, seconds in result["step_seconds"].items():
        lines.append(
            f"{name:<30}{seconds:>9.3f}{result['step_spread'][name]:>8.1%} "
            f"{seconds / standard:>6.2f}{builtin / seconds:>11.2f}x"
            f"{result['tokens_per_second'][name]:>11.0f}"
            f"{result['peak_memory_bytes'][name] / 2**20:>10.0f}"
        )
    encode = result["encode_seconds"]
    lines += [
        f"Inference encode: plugin {encode['plugin']:.3f} s, built-in "
        f"{encode['SAELens built-in']:.3f} s ({summary['encode_speedup_vs_builtin']:.2f}x)",
        f"Dense matmul ({cfg['batch']}x{cfg['d_in']} @ {cfg['d_in']}x{cfg['d_sae']}): "
        f"{result['gemm_seconds']:.3f} s = {result['gemm_flops_per_second'] / 1e9:.0f} GFLOP/s; "
        f"plugin step achieves {result['plugin_flops_per_second'] / 1e9:.0f} GFLOP/s "
        f"({summary['fraction_of_gemm_roofline']:.0%} of that, counting "
        f"{result['matmuls_per_step']['plugin (paper)']:.2f} matmuls' FLOPs per step)",
        *(
            [
                f"Gate density {summary['gate_density']:.2%} (measured on the batch); "
                f"limit (one encoder matmul + one elementwise pass) "
                f"{summary['limit_s']:.3f} s; plugin (paper) step = "
                f"{summary['step_ratio_vs_limit']:.2f}x the limit"
            ]
            if "gate_density" in summary
            else []
        ),
        *(
            [
                f"sparse_step=auto over {cfg['auto_steps']} steps: chose "
                f"{summary['auto_choice']} steps, {summary['auto_vs_best']:.3f}x the faster "
                f"forced mode after deciding; probing cost "
                f"{summary['probe_cost_steps']:.2f} steps"
            ]
            if "auto_choice" in summary
            else []
        ),
        f"Peak memory: {result['memory_measure']}.",
        f"Machine: {json.dumps(result['machine'])}",
        json.dumps(summary),
    ]
    return "\n".join(lines)


PAPER = "plugin (paper)"
PAPER_DENSE = "plugin (paper, dense steps)"
PAPER_SPARSE = "plugin (paper, sparse steps)"
STANDARD = "SAELens standard"
BUILTIN = "SAELens built-in gated"
# The density sweep's lines: variant and legend label.
DENSITY_SWEEP_LINES = {
    PAPER_DENSE: "plugin (paper), dense steps",
    PAPER_SPARSE: "plugin (paper), sparse steps",
    PAPER: "plugin (paper), sparse_step=auto (after deciding)",
    STANDARD: "SAELens standard SAE",
    BUILTIN: "SAELens built-in gated SAE",
}
AUTO_MIN_STEPS = PROBE_STEPS + 2
# The auto run's learning rate: small enough that the gate density stays where it was set.
AUTO_RUN_LR = 1e-6


def _auto_run(cfg: BenchConfig, x: torch.Tensor, progress: bool) -> dict[str, Any]:
    """Train ``cfg.auto_steps`` steps from one start under each ``sparse_step`` setting,
    interleaved, and compare ``auto`` with the faster of the forced modes.

    Every step gets a fresh batch (the same for the three runs), and the learning rate is
    :data:`AUTO_RUN_LR`: at a realistic one the sparsity penalty closes gates within tens of
    steps (10% open became 6.5% in 100 steps at 3e-4), and the comparison would leave the
    density asked for. The gate density at the start and at the end is reported.
    """
    shape: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "device": cfg.device}
    saes = {
        setting: GatedTrainingSAE(GatedTrainingSAEConfig(sparse_step=setting, **shape))
        for setting in ("auto", "always", "never")
    }
    if cfg.gate_density is not None:
        _open_gates(saes["auto"], x, cfg.gate_density)
    start = {k: v.clone() for k, v in saes["auto"].state_dict().items()}
    for sae in saes.values():
        sae.load_state_dict(start)
    trainers = {name: _trainer(cfg, sae, lr=AUTO_RUN_LR) for name, sae in saes.items()}
    policy = saes["auto"].conventions.sparse_policy
    device = torch.device(cfg.device)
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    probing: list[bool] = []
    batch = x
    densities = [_open_fraction(saes["auto"], batch)]
    for _ in tqdm(range(cfg.auto_steps), desc="auto vs forced", disable=not progress):
        batch = torch.randn(x.shape, generator=generator, device=device)
        probing.append(policy.probe_position is not None)
        # A rotating order, so that no run always follows the same other run.
        order = list(trainers)
        shift = (len(probing) - 1) % len(order)
        for name in order[shift:] + order[:shift]:
            gc.collect()
            step = trainers[name].step
            times[name].append(_measure(lambda s=step: s(batch), device)[0])
    densities.append(_open_fraction(saes["auto"], batch))
    decision = policy.decision
    # Compare the steps after the decision (all of them when auto never probed).
    first = 0 if decision is None else decision.step
    after = {name: statistics.median(t[first:]) for name, t in times.items()}
    best = min(after["always"], after["never"])
    probe_extra = sum(t - best for t, p in zip(times["auto"], probing) if p)
    return {
        "auto_choice": "dense" if decision is None else decision.mode,
        "auto_decided_at_step": None if decision is None else decision.step,
        "auto_vs_best": after["auto"] / best,
        "probe_cost_steps": probe_extra / best,
        "auto_step_seconds": after,
        "auto_run_gate_density": densities,
    }


def _memory_benchmark(cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    """Peak memory of one forward and backward pass of each variant, built one at a time.

    What the variants share (weights, gradients, Adam state) is not what differs between
    them, so no optimizer is built: the step's own activations and buffers are measured.
    """
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    x = torch.randn(cfg.batch, cfg.d_in, device=device)
    shape: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "device": cfg.device}
    makers: dict[str, Callable[[], TrainingSAE[Any]]] = {
        PAPER_DENSE: lambda: GatedTrainingSAE(
            GatedTrainingSAEConfig(sparse_step="never", **shape)
        ),
        PAPER_SPARSE: lambda: GatedTrainingSAE(
            GatedTrainingSAEConfig(sparse_step="always", **shape)
        ),
        BUILTIN: lambda: BuiltinGatedTrainingSAE(
            BuiltinGatedTrainingSAEConfig(**shape)
        ),
    }
    peaks: dict[str, float] = {}
    for name, make in tqdm(makers.items(), desc="memory", disable=not progress):
        sae = make()
        if cfg.gate_density is not None:
            _open_gates(sae, x, cfg.gate_density)

        def forward_backward(sae: TrainingSAE[Any] = sae) -> None:
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"
            ):
                out = sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=x,
                        coefficients={"l1": 1.0},
                        dead_neuron_mask=None,
                        n_training_steps=0,
                        is_logging_step=False,
                    )
                )
            out.loss.backward()

        forward_backward()  # allocates the gradients, which all variants share
        peaks[name] = _measure(forward_backward, device)[1]
        del sae, forward_backward
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    builtin = peaks[BUILTIN]
    return {
        "memory_only": True,
        "config": {**asdict(cfg), "plot": str(cfg.plot)},
        "machine": _machine(device),
        "peak_memory_bytes": peaks,
        "memory_measure": _memory_measure_name(device),
        "summary": {
            "dense_peak_mem_ratio_vs_builtin": peaks[PAPER_DENSE] / builtin
            if builtin > 0
            else None,
            "sparse_peak_mem_ratio_vs_builtin": peaks[PAPER_SPARSE] / builtin
            if builtin > 0
            else None,
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "batch": cfg.batch,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "gate_density": cfg.gate_density,
        },
    }


def _decided_mode(sae: TrainingSAE[Any]) -> str | None:
    """The mode ``sparse_step="auto"`` decided on (None if it has not probed)."""
    assert isinstance(sae, GatedTrainingSAE)
    decision = sae.conventions.sparse_policy.decision
    return None if decision is None else decision.mode


def _build_trainers(cfg: BenchConfig) -> dict[str, SAETrainer[Any, Any]]:
    shape: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "device": cfg.device}
    saes: dict[str, TrainingSAE[Any]] = {
        PAPER: GatedTrainingSAE(GatedTrainingSAEConfig(**shape))
    }
    if cfg.gate_density is not None:
        # Each kind of step, whatever the density ("auto" above picks one of them).
        saes[PAPER_DENSE] = GatedTrainingSAE(
            GatedTrainingSAEConfig(sparse_step="never", **shape)
        )
        saes[PAPER_SPARSE] = GatedTrainingSAE(
            GatedTrainingSAEConfig(sparse_step="always", **shape)
        )
    saes |= {
        "plugin (april_update)": GatedTrainingSAE(
            GatedTrainingSAEConfig(recipe="april_update", **shape)
        ),
        "SAELens built-in gated": BuiltinGatedTrainingSAE(
            BuiltinGatedTrainingSAEConfig(**shape)
        ),
        "SAELens standard": StandardTrainingSAE(StandardTrainingSAEConfig(**shape)),
    }
    return {name: _trainer(cfg, sae) for name, sae in saes.items()}


def _trainer(
    cfg: BenchConfig, sae: TrainingSAE[Any], lr: float = 3e-4
) -> SAETrainer[Any, Any]:
    # A run too long to end, without warm-up, so every timed step is a full-rate step.
    settings = TrainingSettings(
        steps=10**9, batch_size=cfg.batch, lr=lr, device=cfg.device
    )
    trainer_cfg = trainer_config(
        settings,
        lr_warm_up_steps=0,
        autocast=cfg.dtype == "bfloat16",
        dead_feature_window=1000,
        feature_sampling_window=1000,
    )
    return SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))


def _build_encoders(cfg: BenchConfig) -> dict[str, Any]:
    shape: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "device": cfg.device}
    plugin = GatedSAE(GatedSAEConfig(**shape))
    builtin = BuiltinGatedSAE(BuiltinGatedSAEConfig(**shape))
    with torch.no_grad():
        for sae in (plugin, builtin):  # non-trivial gates: biases and r_mag away from 0
            sae.r_mag.normal_(0, 0.1)
            sae.b_gate.normal_(0, 0.1)
            sae.b_mag.normal_(0, 0.1)
        builtin.load_state_dict(plugin.state_dict())
    return {"plugin": plugin, "SAELens built-in": builtin}


@torch.no_grad()
def _open_gates(sae: TrainingSAE[Any], x: torch.Tensor, fraction: float) -> None:
    """Set the gate bias (a standard SAE's encoder bias) so that each feature opens on the
    ``fraction`` of the rows of ``x`` where its pre-activation is largest."""
    pre = sae.process_sae_in(x) @ sae.W_enc
    n_rows = pre.shape[0]
    # Open where pre > the k-th smallest value: n_rows - k rows per feature, at most the
    # fraction asked for (10% must not become 10.01%, above auto's sparse ceiling) but at
    # least one row.
    k = max(1, min(n_rows - 1, math.ceil((1 - fraction) * n_rows - 1e-9)))
    bias = sae.b_gate if isinstance(sae, BuiltinGatedTrainingSAE) else sae.b_enc
    assert isinstance(bias, torch.Tensor)
    bias.copy_(-pre.kthvalue(k, dim=0).values)


@torch.no_grad()
def _open_fraction(sae: TrainingSAE[Any], x: torch.Tensor) -> float:
    """The fraction of gates open on ``x``."""
    assert isinstance(sae, BuiltinGatedTrainingSAE)
    return float((sae.process_sae_in(x) @ sae.W_enc + sae.b_gate > 0).float().mean())


def _matmul_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products ``fn`` runs, counted by PyTorch's dispatcher."""
    # The gated function accumulates weight gradients in place (addmm_), which torch's
    # counter does not know by default.
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops}
    )
    with counter:
        fn()
    return counter.get_total_flops()


def _addmm_flops(
    _bias_shape: torch.Size, a_shape: torch.Size, b_shape: torch.Size, **_: Any
) -> int:
    """FLOPs of ``bias + a @ b``: a multiply and an add per term of the product."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall time of ``fn`` and the peak memory it added (bytes), without garbage
    collection pauses inside it."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        synchronize_device(device)
        base = _reset_peak_memory(device)
        start = time.perf_counter()
        fn()
        synchronize_device(device)
        seconds = time.perf_counter() - start
    finally:
        if collecting:
            gc.enable()
    return seconds, max(0.0, _peak_memory(device) - base)


def _memory_measure_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the step, minus memory allocated before it"
    return (
        "peak resident set size (VmHWM, reset through /proc/self/clear_refs) during the step, "
        "minus the resident size before it"
    )


def _reset_peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    return _proc_status_bytes("VmRSS")


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def _work_dtype(cfg: BenchConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def _spread(values: list[float]) -> float:
    """Interquartile range relative to the median."""
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

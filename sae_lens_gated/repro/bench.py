"""``sae-lens-gated bench``: the plugin's gated SAE against SAELens's, measured side by side.

Every variant runs a real training step of SAELens's own ``SAETrainer`` (forward, backward,
gradient clipping, Adam, LR and coefficient schedulers, and the plugin's optimizer hooks)
on the same batch. Variants are interleaved (A B C D A B C D ...) after a warm-up, and the
median of the repetitions is reported, so slow drifts of a noisy machine hit all of them
alike and the ratios measured in one run are comparable.

``--multi-runner K`` instead times whole training runs through SAELens's runners on a
random language model: K gated SAEs at K sparsity coefficients trained together by
``MultiSAETrainingRunner`` (one model forward pass per batch for all of them) against the
same K trained one at a time by ``LanguageModelSAETrainingRunner``.
"""

import dataclasses
import gc
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig
from sae_lens.multi_sae_training_runner import (
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
)
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
from transformer_lens import HookedTransformer, HookedTransformerConfig

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

DEFAULT_D_SAE = 8192


@dataclass
class BenchConfig:
    """Settings of ``sae-lens-gated bench``.

    Args:
        d_in: Input width.
        d_sae: Dictionary size (the same for every variant; not used by ``multi_runner``).
        batch: Activations per training step.
        device: Torch device.
        dtype: ``"float32"``, or ``"bfloat16"`` for bf16 autocast with float32 master weights.
        repeats: Timed repetitions per variant (after one warm-up step each).
        seed: Seed for weights and the batch.
        gate_density: Set every SAE's gate (or encoder) bias so that this fraction of its
            gates is open on the benchmark batch, and also time the plugin's dense and
            sparse steps and the limit (one encoder matmul and one elementwise pass). Unset:
            the fresh SAEs' own, about half open. With ``multi_runner``: the SAEs of every
            run start with this fraction open on a batch of the model's activations.
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
            their optimizers do not fit on the device together (d_sae 1,048,576). A
            variant that runs out of GPU memory is named in the summary's
            ``out_of_memory``, and the others are still measured.
        multi_runner: Time only this: K gated SAEs (paper recipe) at K sparsity
            coefficients (a geometric series around 1, factor 2) trained from one random
            ``HookedTransformer``'s activations by SAELens's ``MultiSAETrainingRunner``,
            against the K trained one at a time by ``LanguageModelSAETrainingRunner``
            (wall time of each run), and one model forward pass against one SAE training
            step on a batch. ``d_in`` is the model's ``d_model``, ``batch`` the tokens per
            step, ``repeats`` the repetitions of the forward-pass-versus-step timing.
            0: not run.
        lm_layers: With ``multi_runner``: the random model's layers (the SAEs read the last
            one's ``hook_resid_post``, so every layer runs).
        lm_expansion: With ``multi_runner``: the SAEs' width as a multiple of ``d_in``
            (``d_sae`` is not used there).
        lm_steps: With ``multi_runner``: training steps of each run.
        profile: Also run one step of the standard SAE and of the plugin (each of its
            forced modes with ``gate_density``) under ``torch.profiler`` after the
            timings, and write every op's self time (on the GPU, where there is one) to
            this text file; the summary gets each step's slowest ops. None: not run.
    """

    d_in: int = 512
    d_sae: int = DEFAULT_D_SAE
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
    multi_runner: int = 0
    lm_layers: int = 4
    lm_expansion: int = 4
    lm_steps: int = 20
    profile: Path | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}.")
        check_counts(
            d_in=self.d_in,
            d_sae=self.d_sae,
            batch=self.batch,
            repeats=self.repeats,
            lm_layers=self.lm_layers,
            lm_expansion=self.lm_expansion,
            lm_steps=self.lm_steps,
        )
        if self.multi_runner < 0:
            raise ValueError(
                f"multi_runner must be 0 (off) or a number of SAEs, got {self.multi_runner}."
            )
        if self.multi_runner:
            others = {
                "memory_only": self.memory_only,
                "density_sweep": bool(self.density_sweep),
                "auto_steps": bool(self.auto_steps),
                # Its width is lm_expansion x d_in: a d_sae given here would be ignored.
                "d_sae": self.d_sae != DEFAULT_D_SAE,
            }
            given = [name for name, on in others.items() if on]
            if given:
                raise ValueError(
                    "multi_runner runs only the runner comparison (its SAE width is "
                    f"lm_expansion x d_in): drop {'/'.join(given)}."
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
        if self.profile is not None:
            others = {
                "memory_only": self.memory_only,
                "density_sweep": bool(self.density_sweep),
                "multi_runner": bool(self.multi_runner),
            }
            given = [name for name, on in others.items() if on]
            if given:
                raise ValueError(
                    "profile records one step of each variant at one density: drop "
                    f"{'/'.join(given)}."
                )
            if self.profile.is_dir() or not self.profile.parent.is_dir():
                raise ValueError(
                    f"profile must be a text file in an existing folder, got {self.profile}."
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
    if cfg.multi_runner:
        return _multi_runner_benchmark(cfg, progress)
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

    profiled: dict[str, Any] = {}
    if cfg.profile is not None:
        variants = (
            [PAPER_DENSE, PAPER_SPARSE] if cfg.gate_density is not None else [PAPER]
        )
        profiled = _profile_steps(trainers, [STANDARD, *variants], x, cfg.profile)
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
        "config": _config_json(cfg),
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
            **profiled,
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
                f"{name:<30}"
                + ("   out of memory" if peak is None else f"{peak / 2**20:>10.0f} MiB")
                for name, peak in result["peak_memory_bytes"].items()
            ),
            json.dumps(result["summary"]),
        ]
        return "\n".join(lines)
    if "multi_runner" in result:
        return _format_multi_runner(result)
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
        *(
            [
                f"Profile of one step each ({summary['profile']}), slowest op: "
                + "; ".join(
                    f"{name} {ops[0][0]} {ops[0][1]:.1f} ms"
                    for name, ops in summary["profile_top_ms"].items()
                )
            ]
            if "profile" in summary
            else []
        ),
        *(
            [f"Profile failed: {summary['profile_error']}"]
            if "profile_error" in summary
            else []
        ),
        f"Peak memory: {result['memory_measure']}.",
        "Optimizer: the plugin's rows step Adam as PyTorch's fused kernel "
        "(fused_optimizer=True, the default), SAELens's rows as SAELens builds it.",
        f"Machine: {json.dumps(result['machine'])}",
        json.dumps(summary),
    ]
    return "\n".join(lines)


def _format_multi_runner(result: dict[str, Any]) -> str:
    """The report of :func:`_multi_runner_benchmark`'s result."""
    summary, lm = result["summary"], result["model"]
    k = summary["k"]
    singles = summary["single_seconds"]
    l1s = ", ".join(f"{l1:.3g}" for l1 in summary["l1_coefficients"])
    return "\n".join(
        [
            f"SAELens's MultiSAETrainingRunner against {k} single runs: {k} gated SAEs "
            f"(paper recipe) at l1 {l1s}, d_in {summary['d_in']}, d_sae "
            f"{summary['d_sae']}, {summary['steps']} steps of {summary['batch']} tokens, "
            f"{summary['device']}, {summary['dtype']}",
            f"Model: random HookedTransformer, {lm['n_layers']} layers, d_model "
            f"{lm['d_model']}, {lm['n_heads']} heads of {lm['d_head']}, d_mlp "
            f"{lm['d_mlp']}, context {lm['context_size']}, hook {lm['hook']}; built once "
            "and handed to every run (its construction is in no run's time, which "
            "favours the single runs)",
            (
                "SAEs from one initialization, fresh gates (about half open)"
                if summary["gate_density"] is None
                else f"SAEs from one initialization, gates opened on "
                f"{summary['gate_density']:.2%} of a batch of the model's activations"
            )
            + "; sparse_step=auto ran: "
            + ", ".join(_mode_name(mode) for mode in result["auto_modes"]),
            f"One model forward pass over a batch {result['lm_forward_seconds']:.3f} s, "
            f"one SAE training step ({_mode_name(summary['regime_step_mode'])}) "
            f"{result['sae_step_seconds']:.3f} s: "
            f"lm_forward_vs_sae_step {summary['lm_forward_vs_sae_step']:.2f}",
            f"Single runs: {', '.join(f'{t:.1f}' for t in singles)} s "
            f"(sum {sum(singles):.1f} s)",
            f"Multi run, {k} SAEs from one activation stream: "
            f"{summary['multi_seconds']:.1f} s",
            f"multi / sum of {k} singles: {summary['multi_vs_sum_of_singles']:.3f}",
            f"Machine: {json.dumps(result['machine'])}",
            json.dumps(summary),
        ]
    )


def _mode_name(mode: str | None) -> str:
    # auto never probes while more than its ceiling of the gates is open.
    return mode or "dense (never probed)"


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
    peaks: dict[str, float | None] = {}
    out_of_memory: list[str] = []
    for name, make in tqdm(makers.items(), desc="memory", disable=not progress):
        try:
            peaks[name] = _one_pass_peak(make, x, cfg, device)
        except torch.cuda.OutOfMemoryError:
            # At d_sae 2**20 a variant may not fit the GPU: that is a result, and the
            # other variants are still measured.
            peaks[name] = None
            out_of_memory.append(name)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "memory_only": True,
        "config": _config_json(cfg),
        "machine": _machine(device),
        "peak_memory_bytes": peaks,
        "memory_measure": _memory_measure_name(device),
        "summary": {
            "dense_peak_mem_ratio_vs_builtin": _memory_ratio(peaks, PAPER_DENSE),
            "sparse_peak_mem_ratio_vs_builtin": _memory_ratio(peaks, PAPER_SPARSE),
            "out_of_memory": out_of_memory,
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "batch": cfg.batch,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "gate_density": cfg.gate_density,
        },
    }


def _one_pass_peak(
    make: Callable[[], TrainingSAE[Any]],
    x: torch.Tensor,
    cfg: BenchConfig,
    device: torch.device,
) -> float:
    """The peak memory one forward and backward pass of a new SAE from ``make`` adds."""
    sae = make()
    if cfg.gate_density is not None:
        _open_gates(sae, x, cfg.gate_density)

    def forward_backward() -> None:
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
    return _measure(forward_backward, device)[1]


def _memory_ratio(peaks: dict[str, float | None], name: str) -> float | None:
    """``name``'s peak over the built-in's; None where either ran out of memory, or where
    the CPU's resident-set measure saw the built-in's pass add nothing."""
    peak, builtin = peaks[name], peaks[BUILTIN]
    if peak is None or builtin is None or builtin <= 0:
        return None
    return peak / builtin


# The multi-runner comparison's language model: tokens per sequence, vocabulary (its
# unembedding never runs: SAELens stops the forward pass at the hooked layer), head width,
# and the factor between successive sparsity coefficients.
LM_CONTEXT = 128
LM_VOCAB = 1024
LM_D_HEAD = 64
L1_FACTOR = 2.0


def multi_runner_l1_coefficients(k: int) -> list[float]:
    """``k`` sparsity coefficients, a geometric series with factor :data:`L1_FACTOR`
    centred on 1 (k=4: 0.354, 0.707, 1.41, 2.83)."""
    return [L1_FACTOR ** (i - (k - 1) / 2) for i in range(k)]


def _multi_runner_benchmark(cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    """Wall time of one ``MultiSAETrainingRunner`` run of ``cfg.multi_runner`` gated SAEs
    against one ``LanguageModelSAETrainingRunner`` run of each, and of one model forward
    pass against one SAE training step.

    Every run gets the same model object, dataset, steps, batch, learning rate and seed, and
    writes nothing (no W&B, checkpoints or outputs). A run's time is its runner's
    construction (activation store, SAEs) and ``run()``; the model is built once before
    any of them, so no side pays for it (a real single run would, which favours the
    singles here). The multi run goes first, so one-off costs fall on it.
    """
    device = torch.device(cfg.device)
    context = min(LM_CONTEXT, cfg.batch)
    prompts = math.ceil(cfg.batch / context)  # one batch's tokens per forward pass
    d_sae = cfg.lm_expansion * cfg.d_in
    hook = f"blocks.{cfg.lm_layers - 1}.hook_resid_post"
    model = _random_lm(cfg, context)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Every run reads the dataset from its start: enough rows for all of one run's forward
    # passes (one more than its steps, to fill SAELens's shuffle buffer), and a spare.
    tokens = torch.randint(
        0, LM_VOCAB, ((cfg.lm_steps + 3) * prompts, context), generator=gen
    )
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    l1s = multi_runner_l1_coefficients(cfg.multi_runner)
    names = [f"l1_{l1:.4g}" for l1 in l1s]
    shared: dict[str, Any] = {
        "model_name": "random",
        "dataset_path": "",
        "streaming": False,
        "context_size": context,
        "prepend_bos": False,
        "training_tokens": cfg.lm_steps * cfg.batch,
        "train_batch_size_tokens": cfg.batch,
        "store_batch_size_prompts": prompts,
        # SAELens's shuffle buffer (this many sequences' worth of tokens) must hold a
        # batch; two batches make one model forward pass per training step.
        "n_batches_in_buffer": math.ceil(2 * cfg.batch / context),
        "lr": 3e-4,
        "lr_warm_up_steps": 0,
        "adam_beta1": 0.0,  # the paper's Adam betas (0, 0.999)
        "adam_beta2": 0.999,
        "device": cfg.device,
        "autocast": cfg.dtype == "bfloat16",
        "autocast_lm": cfg.dtype == "bfloat16",
        "n_checkpoints": 0,
        "checkpoint_path": None,
        "output_path": None,
        "seed": cfg.seed,
    }

    def sae_cfg(l1: float) -> GatedTrainingSAEConfig:
        return GatedTrainingSAEConfig(
            d_in=cfg.d_in, d_sae=d_sae, l1_coefficient=l1, device=cfg.device
        )

    # Every run starts from the same weights; with gate_density, their gates open on that
    # fraction of a batch of the model's activations (the regime of most of a run).
    x = _lm_activations(cfg, model, tokens[:prompts].to(device), hook)
    torch.manual_seed(cfg.seed)
    initial = GatedTrainingSAE(sae_cfg(1.0)).state_dict()
    trained: list[GatedTrainingSAE] = []

    def new_sae(l1: float) -> GatedTrainingSAE:
        sae = GatedTrainingSAE(sae_cfg(l1))
        sae.load_state_dict(initial)
        if cfg.gate_density is not None:
            _open_gates(sae, x, cfg.gate_density)
        trained.append(sae)
        return sae

    def run_multi() -> None:
        runner_cfg = MultiSAETrainingRunnerConfig(
            saes={name: sae_cfg(l1) for name, l1 in zip(names, l1s)},
            hook_names=hook,
            logger=LoggingConfig(log_to_wandb=False),
            **shared,
        )
        MultiSAETrainingRunner(
            runner_cfg,
            override_dataset=dataset,
            override_model=model,
            override_saes={name: new_sae(l1) for name, l1 in zip(names, l1s)},
        ).run()

    def run_single(l1: float) -> None:
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=sae_cfg(l1),
            hook_name=hook,
            is_dataset_tokenized=True,
            verbose=False,
            logger=LoggingConfig(log_to_wandb=False),
            **shared,
        )
        # SAELens 6.50 turns checkpoint_path=None into "None/<run id>" (6.54 keeps None).
        runner_cfg.checkpoint_path = None
        LanguageModelSAETrainingRunner(
            runner_cfg,
            override_dataset=dataset,
            override_model=model,
            override_sae=new_sae(l1),
        ).run()

    bar = tqdm(total=2 + len(l1s), desc="multi-runner bench", disable=not progress)
    bar.set_postfix_str("model forward vs SAE step")
    regime = _lm_forward_vs_sae_step(
        cfg, model, tokens[:prompts].to(device), hook, x, new_sae(1.0)
    )
    trained.clear()
    bar.update()
    bar.set_postfix_str(f"multi run of {len(l1s)}")
    multi_seconds = _time_run(run_multi, cfg.seed, device)
    bar.update()
    single_seconds: list[float] = []
    for l1 in l1s:
        bar.set_postfix_str(f"single run, l1 {l1:.4g}")
        single_seconds.append(_time_run(lambda l1=l1: run_single(l1), cfg.seed, device))
        bar.update()
    bar.close()
    model_cfg = model.cfg
    modes = [_decided_mode(sae) for sae in trained]
    return {
        "multi_runner": True,
        "config": _config_json(cfg),
        "machine": _machine(device),
        "model": {
            "n_layers": model_cfg.n_layers,
            "d_model": model_cfg.d_model,
            "n_heads": model_cfg.n_heads,
            "d_head": model_cfg.d_head,
            "d_mlp": model_cfg.d_mlp,
            "context_size": context,
            "d_vocab": model_cfg.d_vocab,
            "hook": hook,
        },
        "sae_names": names,
        # The mode sparse_step="auto" chose in each run (multi run's SAEs first).
        "auto_modes": modes,
        "lm_forward_seconds": regime["lm_forward_seconds"],
        "sae_step_seconds": regime["sae_step_seconds"],
        "summary": {
            "multi_vs_sum_of_singles": multi_seconds / sum(single_seconds),
            "multi_seconds": multi_seconds,
            "single_seconds": single_seconds,
            "lm_forward_vs_sae_step": regime["lm_forward_vs_sae_step"],
            "k": cfg.multi_runner,
            "l1_coefficients": l1s,
            "lm_layers": cfg.lm_layers,
            "d_in": cfg.d_in,
            "d_sae": d_sae,
            "batch": cfg.batch,
            "steps": cfg.lm_steps,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "gate_density": cfg.gate_density,
            "regime_step_mode": regime["step_mode"],
        },
    }


def _random_lm(cfg: BenchConfig, context: int) -> HookedTransformer:
    """A ``HookedTransformer`` with random weights, built from a config (no download)."""
    d_head = min(LM_D_HEAD, cfg.d_in)
    return HookedTransformer(
        HookedTransformerConfig(
            n_layers=cfg.lm_layers,
            d_model=cfg.d_in,
            n_ctx=context,
            d_head=d_head,
            n_heads=max(1, cfg.d_in // d_head),
            d_mlp=4 * cfg.d_in,
            d_vocab=LM_VOCAB,
            act_fn="gelu",
            normalization_type="LN",
            device=cfg.device,
            seed=cfg.seed,
        )
    )


def _time_run(run: Callable[[], None], seed: int, device: torch.device) -> float:
    """Wall time of one training run, every run from the same random state."""
    gc.collect()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # SAELens compares the dataset's rows with the training *tokens*; the rows here
        # hold every token a run reads, so its "multiple epochs" warning is wrong.
        warnings.filterwarnings("ignore", "The training dataset contains fewer samples")
        synchronize_device(device)
        start = time.perf_counter()
        run()
        synchronize_device(device)
        return time.perf_counter() - start


def _lm_forward(
    cfg: BenchConfig, model: HookedTransformer, tokens: torch.Tensor, hook: str
) -> torch.Tensor:
    """The activations SAELens's activation store takes from one forward pass over
    ``tokens``: only the hook cached, the pass stopped at its layer."""
    device = torch.device(cfg.device)
    with (
        torch.no_grad(),
        torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"
        ),
    ):
        _, cache = model.run_with_cache(
            tokens, names_filter=[hook], stop_at_layer=cfg.lm_layers, prepend_bos=False
        )
    return cache[hook].reshape(-1, cfg.d_in).float()


def _lm_activations(
    cfg: BenchConfig, model: HookedTransformer, tokens: torch.Tensor, hook: str
) -> torch.Tensor:
    """One batch (``cfg.batch`` rows) of the model's activations at ``hook``."""
    return _lm_forward(cfg, model, tokens, hook)[: cfg.batch]


def _lm_forward_vs_sae_step(
    cfg: BenchConfig,
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook: str,
    x: torch.Tensor,
    sae: GatedTrainingSAE,
) -> dict[str, Any]:
    """Median times of the model forward pass SAELens's activation store runs for one
    batch and of one training step of ``sae`` on the batch ``x``, interleaved (after a
    warm-up). The step is timed in the mode ``sparse_step="auto"`` settles on.

    The forward pass covers ``tokens`` (at least one batch's worth); its time is scaled to
    exactly ``cfg.batch`` tokens for the ratio.
    """
    device = torch.device(cfg.device)
    trainer = _trainer(cfg, sae)
    for _ in range(1 + PROBE_STEPS):  # auto decides before the timing
        trainer.step(x)
    forward_times: list[float] = []
    step_times: list[float] = []
    for round_index in range(cfg.repeats + 1):
        gc.collect()
        forward_s, _ = _measure(lambda: _lm_forward(cfg, model, tokens, hook), device)
        step_s, _ = _measure(lambda: trainer.step(x), device)
        if round_index > 0:  # the first round is warm-up
            forward_times.append(forward_s)
            step_times.append(step_s)
    forward_s = statistics.median(forward_times)
    step_s = statistics.median(step_times)
    per_batch = forward_s * cfg.batch / tokens.numel()
    return {
        "lm_forward_seconds": per_batch,
        "sae_step_seconds": step_s,
        "lm_forward_vs_sae_step": per_batch / step_s,
        "step_mode": _decided_mode(sae),
    }


# The slowest ops of each profiled step that the summary lists.
PROFILE_TOP_OPS = 12


def _profile_steps(
    trainers: dict[str, SAETrainer[Any, Any]],
    names: list[str],
    x: torch.Tensor,
    path: Path,
) -> dict[str, Any]:
    """One training step of each of ``names`` under ``torch.profiler``: every op's self
    time (on the GPU where the batch is on one) into ``path``, the slowest ops' times in
    milliseconds in the result. A profiler that fails or records no time (a GPU without
    CUPTI) is reported as ``profile_error``; the timings before it are kept."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    tables: list[str] = []
    slowest: dict[str, list[list[Any]]] = {}
    for name in names:
        synchronize_device(x.device)
        try:
            with profile(activities=activities) as profiler:
                trainers[name].step(x)
                synchronize_device(x.device)
        except RuntimeError as error:
            return {"profile_error": f"{name}: {error}"}
        ops = profiler.key_averages()
        # Ops as PyTorch calls them, each with its kernels' time on a GPU (the kernels
        # also have rows of their own, which would list each hot spot twice).
        calls = [op for op in ops if op.device_type == DeviceType.CPU]
        ranked = sorted(calls, key=lambda op: -getattr(op, key))[:PROFILE_TOP_OPS]
        if not ranked or getattr(ranked[0], key) <= 0:
            return {"profile_error": f"{name}: the profiler recorded no {key}"}
        slowest[name] = [[op.key, round(getattr(op, key) / 1e3, 3)] for op in ranked]
        tables.append(
            f"===== {name}: one training step, ops by {key}\n"
            + ops.table(sort_by=key, row_limit=-1)
        )
    path.write_text("\n\n".join(tables) + "\n")
    return {"profile": str(path), "profile_top_ms": slowest}


def _config_json(cfg: BenchConfig) -> dict[str, Any]:
    """``cfg`` as JSON values (paths as strings)."""
    profile = None if cfg.profile is None else str(cfg.profile)
    return {**asdict(cfg), "plot": str(cfg.plot), "profile": profile}


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

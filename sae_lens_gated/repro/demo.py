"""``sae-lens-gated demo``: the paper-recipe gated SAE against a compute-matched baseline.

Trains the gated SAE and SAELens's standard SAE at 1.5x the width (the paper's
compute-matched baseline) at two sparsity levels each, on the embedded synthetic default
(offline; features known, so recovery can be scored) or on a language model's activations,
prints a side-by-side table, writes ``demo.png`` and ``demo_results.json``, and saves the
gated SAE in SAELens format.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_lens_gated.repro.experiments import (
    BASELINE,
    DEFAULT_SYNTHETIC_MODEL,
    PAPER,
    VARIANTS,
    RunResult,
    SourceConfig,
    SyntheticSource,
    TrainingSettings,
    check_coefficients,
    check_counts,
    check_positive,
    evaluate,
    make_source,
    prepare_output_folder,
    train_sae,
)
from sae_lens_gated.repro.plots import plot_demo

__all__ = ["DEFAULT_SYNTHETIC_MODEL", "DemoConfig", "format_table", "run_demo"]


@dataclass
class DemoConfig(SourceConfig):
    """Settings of ``sae-lens-gated demo``, besides the activation source (:class:`SourceConfig`).

    Args:
        out: Folder for the gated SAE (SAELens format), ``demo.png`` and
            ``demo_results.json``.
        steps: Training steps per SAE.
        batch_size: Activations per step.
        gated_l1: Sparsity coefficients of the gated SAEs.
        baseline_l1: Sparsity coefficients of the baseline (a different scale).
        lr: Adam learning rate (betas (0, 0.999), the paper's).
        eval_samples: Held-out synthetic activations for the metrics.
        seed: Seed of every SAE's initialisation and training stream.
        overwrite: Write into ``out`` even if it is a non-empty folder (e.g. a saved SAE),
            replacing its files; without it such a folder is refused before any training.
    """

    out: Path = Path("gated-demo")
    steps: int = 3000
    batch_size: int = 1024
    gated_l1: tuple[float, ...] = (0.5, 1.0)
    baseline_l1: tuple[float, ...] = (0.35, 1.0)
    lr: float = 3e-3
    eval_samples: int = 50_000
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_counts(
            steps=self.steps, batch_size=self.batch_size, eval_samples=self.eval_samples
        )
        check_positive(lr=self.lr)
        check_coefficients("gated_l1", self.gated_l1)
        check_coefficients("baseline_l1", self.baseline_l1)


def run_demo(
    cfg: DemoConfig, override_model: Any = None, override_dataset: Any = None
) -> list[RunResult]:
    """Train and evaluate the demo's SAEs; save the gated one; return their metrics.

    Raises:
        OSError: ``cfg.out`` is a file, or a non-empty folder and ``cfg.overwrite`` is not
            set (checked before any training).
    """
    prepare_output_folder(cfg.out, cfg.overwrite)
    settings = TrainingSettings(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        device=cfg.device,
        sparse_step=cfg.sparse_step,
    )
    source, width = make_source(cfg, cfg.eval_samples, override_model, override_dataset)
    variants = {v.name: v for v in VARIANTS}
    jobs = [(PAPER, l1) for l1 in cfg.gated_l1] + [
        (BASELINE, l1) for l1 in cfg.baseline_l1
    ]
    runs: list[RunResult] = []
    saved: tuple[float, Any] | None = None
    target_l0 = source.true_l0 if isinstance(source, SyntheticSource) else 20.0
    for name, l1 in tqdm(jobs, desc="demo runs"):
        sae, seconds = train_sae(variants[name], l1, cfg.seed, source, width, settings)
        run = evaluate(sae, variants[name], l1, cfg.seed, source, seconds)
        runs.append(run)
        # Save the gated SAE whose L0 is nearest the true L0 (synthetic) or 20 (a model).
        if name == PAPER:
            distance = abs(math.log(max(run.l0, 1e-3)) - math.log(target_l0))
            if saved is None or distance < saved[0]:
                saved = (distance, sae)
    if saved is not None:
        saved[1].save_inference_model(cfg.out)
    plot_demo(runs, cfg.out / "demo.png")
    _write_results(cfg, runs)
    return runs


def format_table(runs: list[RunResult]) -> str:
    """Render the runs as a fixed-width text table."""
    header = (
        f"{'SAE':<32}{'lambda':>7}{'width':>6}{'L0':>7}{'EV':>7}{'gamma':>7}"
        f"{'dead':>6}{'GT MCC':>8}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        mcc = "-" if run.ground_truth_mcc is None else f"{run.ground_truth_mcc:.3f}"
        lines.append(
            f"{run.variant:<32}{run.l1_coefficient:>7g}{run.d_sae:>6}{run.l0:>7.2f}"
            f"{run.explained_variance:>7.3f}{run.relative_reconstruction_bias:>7.3f}"
            f"{run.dead_fraction:>6.0%}{mcc:>8}"
        )
    lines.append(
        "gamma = E|x_hat|^2 / E[x_hat.x]: 1 is unbiased, below 1 is shrinkage. "
        "GT MCC: decoder recovery of the true features."
    )
    return "\n".join(lines)


def _write_results(cfg: DemoConfig, runs: list[RunResult]) -> None:
    payload = {"config": cfg.record(), "results": [asdict(r) for r in runs]}
    (cfg.out / "demo_results.json").write_text(json.dumps(payload, indent=2))

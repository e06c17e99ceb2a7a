"""Train the plugin's Gated SAE on synthetic activations with known ground-truth features.

Everything runs offline: the synthetic model is built from the embedded default
:data:`DEFAULT_SYNTHETIC_MODEL`, and training goes through SAELens's own
``SyntheticSAERunner`` and ``SAETrainer``.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import LoggingConfig
from sae_lens.synthetic import (
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.synthetic.synthetic_sae_runner import (
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)

from sae_lens_gated.metrics import relative_reconstruction_bias
from sae_lens_gated.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

DEFAULT_SYNTHETIC_MODEL = SyntheticModelConfig(
    num_features=256,
    hidden_dim=64,
    bias=False,
    seed=0,
    mean_firing_magnitudes=1.0,
    std_firing_magnitudes=0.1,
    firing_probability=ZipfianFiringProbabilityConfig(
        exponent=0.5, max_prob=0.2, min_prob=0.005
    ),
)
"""Embedded default: 256 unit, non-orthogonal ground-truth directions in 64 dimensions,
Zipfian firing probabilities between 0.5% and 20% (about 4.3 active per input), magnitudes
around 1."""


@dataclass
class DemoConfig:
    """Settings of ``sae-lens-gated demo``.

    Args:
        out: Folder the trained SAE (SAELens format) and ``demo_results.json`` are written to.
        steps: Training steps.
        batch_size: Activations per step.
        d_sae: Dictionary size of the gated SAE.
        l1_coefficient: Sparsity coefficient lambda.
        lr: Adam learning rate (Adam betas are the paper's, (0, 0.999)).
        eval_samples: Fresh synthetic activations used for the final metrics.
        seed: Seed for the SAE initialisation and the synthetic data stream.
        device: Torch device.
        synthetic_model: Ground-truth generator.
    """

    out: Path = Path("gated-demo")
    steps: int = 3000
    batch_size: int = 1024
    d_sae: int = 256
    l1_coefficient: float = 1.0
    lr: float = 3e-3
    eval_samples: int = 50_000
    seed: int = 0
    device: str = "cpu"
    synthetic_model: SyntheticModelConfig = field(
        default_factory=lambda: DEFAULT_SYNTHETIC_MODEL
    )


@dataclass
class DemoRow:
    """Metrics of one trained SAE on held-out synthetic activations.

    Args:
        name: Label of the SAE.
        l0: Mean number of active features per input.
        explained_variance: 1 - E||x - x_hat||^2 / E||x - E x||^2.
        relative_reconstruction_bias: gamma (1 = no shrinkage).
        dead_features: Features that never fired on the evaluation samples.
        ground_truth_mcc: Mean cosine of Hungarian-matched decoder rows and true features.
        ground_truth_f1: Mean F1 of latents as detectors of their matched true feature.
        true_l0: Mean number of active ground-truth features per input.
    """

    name: str
    l0: float
    explained_variance: float
    relative_reconstruction_bias: float
    dead_features: int
    ground_truth_mcc: float
    ground_truth_f1: float
    true_l0: float


def run_demo(cfg: DemoConfig) -> DemoRow:
    """Train the paper-recipe Gated SAE and evaluate it against the ground truth."""
    torch.manual_seed(cfg.seed)
    synthetic_model = SyntheticModel(cfg.synthetic_model, device=cfg.device)
    sae_cfg = GatedTrainingSAEConfig(
        d_in=cfg.synthetic_model.hidden_dim,
        d_sae=cfg.d_sae,
        l1_coefficient=cfg.l1_coefficient,
        l1_warm_up_steps=cfg.steps // 10,
        device=cfg.device,
    )
    runner_cfg: SyntheticSAERunnerConfig[Any] = SyntheticSAERunnerConfig(
        synthetic_model=cfg.synthetic_model,
        sae=sae_cfg,
        training_samples=cfg.steps * cfg.batch_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_warm_up_steps=cfg.steps // 20,
        adam_beta1=0.0,
        adam_beta2=0.999,
        device=cfg.device,
        output_path=str(cfg.out),
        checkpoint_path=None,
        eval_samples=cfg.eval_samples,
        dead_feature_window=max(cfg.steps // 10, 1),
        feature_sampling_window=max(cfg.steps // 10, 1),
        logger=LoggingConfig(log_to_wandb=False),
    )
    result = SyntheticSAERunner(
        runner_cfg,
        override_synthetic_model=synthetic_model,
        override_sae=GatedTrainingSAE(sae_cfg),
    ).run()
    assert result.final_eval is not None  # eval_samples > 0

    with torch.no_grad():
        x = synthetic_model.feature_dict(
            synthetic_model.activation_generator.sample(cfg.eval_samples)
        )
        x_hat = result.sae.decode(result.sae.encode(x))
    final = result.final_eval
    row = DemoRow(
        name="gated (paper recipe)",
        l0=final.sae_l0,
        explained_variance=final.explained_variance,
        relative_reconstruction_bias=relative_reconstruction_bias(x, x_hat),
        dead_features=final.dead_latents,
        ground_truth_mcc=final.mcc,
        ground_truth_f1=final.classification.f1_score,
        true_l0=final.true_l0,
    )
    _write_results(cfg, [row])
    return row


def format_table(rows: list[DemoRow]) -> str:
    """Render demo rows as a fixed-width text table."""
    header = (
        f"{'SAE':<24}{'L0':>7}{'EV':>8}{'gamma':>8}{'dead':>6}{'GT MCC':>8}{'GT F1':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.name:<24}{row.l0:>7.2f}{row.explained_variance:>8.3f}"
            f"{row.relative_reconstruction_bias:>8.3f}{row.dead_features:>6d}"
            f"{row.ground_truth_mcc:>8.3f}{row.ground_truth_f1:>7.2f}"
        )
    if rows:
        lines.append(f"(ground truth: {rows[0].true_l0:.2f} active features per input)")
    return "\n".join(lines)


def _write_results(cfg: DemoConfig, rows: list[DemoRow]) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k != "synthetic_model"},
            "out": str(cfg.out),
            "synthetic_model": cfg.synthetic_model.to_dict(),
        },
        "results": [asdict(row) for row in rows],
    }
    (cfg.out / "demo_results.json").write_text(json.dumps(payload, indent=2))

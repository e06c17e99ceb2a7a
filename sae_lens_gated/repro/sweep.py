"""``sae-lens-gated sweep``: lambda sweeps of the gated SAE, its ablations and a baseline.

Checks the paper's claims on data with known ground truth (or on a language model's
activations): gated SAEs do not shrink (gamma near 1) while the baseline does, more so as
lambda grows; gated SAEs beat a 1.5x wider baseline at matched L0; freezing the decoder in
the auxiliary loss matters; ``r_mag`` tying helps slightly; untied encoders do not help;
without the auxiliary loss the gates close; the combination the authors advise against
(decoder-norm-weighted L1 with a frozen auxiliary decoder) does worse. Results go to ``results.json`` with the claims'
verdicts and the numbers behind them, and to PNG plots.
"""

import json
import math
import platform
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_lens_gated import __version__
from sae_lens_gated.repro.experiments import (
    APRIL,
    BASELINE,
    EVAL_SEED,
    MAGNITUDE_BINS,
    MIXTURE,
    NO_AUX,
    NO_R_MAG,
    PAPER,
    TRAINABLE_AUX,
    UNTIED,
    VARIANTS,
    RunResult,
    SourceConfig,
    TrainingSettings,
    Variant,
    check_coefficients,
    check_counts,
    check_positive,
    is_healthy,
    make_source,
    prepare_output_folder,
    run_grid,
)
from sae_lens_gated.repro.plots import plot_gamma, plot_magnitudes, plot_pareto

GAMMA_BAND = (0.97, 1.03)
BASELINE_GAMMA_MAX = 0.95


@dataclass
class SweepConfig(SourceConfig):
    """Settings of ``sae-lens-gated sweep``, besides the activation source (:class:`SourceConfig`).

    Args:
        out: Output folder (``results.json`` and PNG plots).
        quick: The small grid (one seed, 4-5 lambdas per variant), under 10 minutes on a
            2-core CPU.
        steps: Training steps per run (default 1500 quick, 6000 full).
        seeds: Seeds per lambda (default ``[0]`` quick, ``[0, 1, 2]`` full).
        batch_size: Activations per step.
        lr: Adam learning rate.
        eval_samples: Held-out synthetic activations for the metrics (default 20,000 quick,
            100,000 full).
        variants: Names of the variants to run (default: all).
        l1: Sparsity coefficients for every selected variant, instead of their grids (the
            gated and baseline lambdas are on different scales).
        overwrite: Write into ``out`` even if it is a non-empty folder, replacing its files;
            without it such a folder is refused before any training.
    """

    out: Path = Path("gated-sweep")
    quick: bool = False
    steps: int | None = None
    seeds: tuple[int, ...] | None = None
    batch_size: int = 1024
    lr: float = 3e-3
    eval_samples: int | None = None
    variants: tuple[str, ...] | None = None
    l1: tuple[float, ...] | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_counts(
            steps=self.steps,
            batch_size=self.batch_size,
            eval_samples=self.eval_samples,
        )
        check_positive(lr=self.lr)
        check_coefficients("l1", self.l1)
        if self.seeds is not None and len(self.seeds) == 0:
            raise ValueError("seeds needs at least one value.")
        if self.variants is not None and len(self.variants) == 0:
            raise ValueError("variants needs at least one name.")
        known = {v.name for v in VARIANTS}
        unknown = set(self.variants or ()) - known
        if unknown:
            raise ValueError(
                f"Unknown variant(s) {sorted(unknown)}; known: {sorted(known)}."
            )

    @property
    def resolved_steps(self) -> int:
        return self.steps or (1500 if self.quick else 6000)

    @property
    def resolved_seeds(self) -> list[int]:
        return list(self.seeds or ((0,) if self.quick else (0, 1, 2)))

    @property
    def resolved_eval_samples(self) -> int:
        return self.eval_samples or (20_000 if self.quick else 100_000)


def run_sweep(
    cfg: SweepConfig,
    override_model: Any = None,
    override_dataset: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep, write ``results.json`` and the plots, and return the results.

    Raises:
        OSError: ``cfg.out`` is a file, or a non-empty folder and ``cfg.overwrite`` is not
            set (checked before any training).
    """
    prepare_output_folder(cfg.out, cfg.overwrite)
    settings = TrainingSettings(
        steps=cfg.resolved_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        device=cfg.device,
        sparse_step=cfg.sparse_step,
    )
    source, gated_width = make_source(
        cfg, cfg.resolved_eval_samples, override_model, override_dataset
    )
    variants = [v for v in VARIANTS if cfg.variants is None or v.name in cfg.variants]
    grid = {v.name: _grid(cfg, v) for v in variants}
    runs = list(
        run_grid(
            variants, grid, cfg.resolved_seeds, source, gated_width, settings, progress
        )
    )
    points = aggregate(runs)
    results: dict[str, Any] = {
        "config": _config_record(cfg, gated_width, settings),
        "environment": {
            "sae_lens_gated": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "runs": [asdict(r) for r in runs],
        "points": points,
        "claims": check_claims(points),
        "magnitude_bins": list(MAGNITUDE_BINS),
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    plot_pareto(points, cfg.out / "pareto.png")
    plot_gamma(points, cfg.out / "gamma_vs_lambda.png")
    plot_magnitudes(runs, cfg.out / "activation_magnitudes.png")
    return results


def aggregate(runs: list[RunResult]) -> list[dict[str, Any]]:
    """Mean metrics over seeds for each (variant, lambda), in run order."""
    groups: dict[tuple[str, float], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.variant, run.l1_coefficient)].append(run)
    metrics = (
        "l0",
        "mse",
        "explained_variance",
        "relative_reconstruction_bias",
        "dead_fraction",
    )
    points = []
    for (variant, l1), members in groups.items():
        point: dict[str, Any] = {
            "variant": variant,
            "l1_coefficient": l1,
            "seeds": len(members),
        }
        for name in metrics:
            point[name] = _mean([getattr(r, name) for r in members])
        mccs = [r.ground_truth_mcc for r in members if r.ground_truth_mcc is not None]
        point["ground_truth_mcc"] = _mean(mccs) if mccs else None
        point["healthy"] = is_healthy(point["l0"], point["explained_variance"])
        points.append(point)
    return points


def check_claims(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each checkable claim of the paper: whether it holds here, and the numbers why."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for point in points:
        by_variant[point["variant"]].append(point)
    healthy = {
        name: sorted(
            (p for p in pts if p["healthy"]), key=lambda p: p["l1_coefficient"]
        )
        for name, pts in by_variant.items()
    }
    claims: dict[str, dict[str, Any]] = {}
    if healthy.get(PAPER):
        gammas = [p["relative_reconstruction_bias"] for p in healthy[PAPER]]
        claims["gated_gamma_near_1"] = {
            "claim": f"paper-recipe gated gamma within {list(GAMMA_BAND)} at every healthy lambda",
            "holds": all(GAMMA_BAND[0] <= g <= GAMMA_BAND[1] for g in gammas),
            "gammas": gammas,
        }
    if healthy.get(BASELINE):
        gammas = [p["relative_reconstruction_bias"] for p in healthy[BASELINE]]
        decreasing = all(b < a for a, b in zip(gammas, gammas[1:]))
        claims["baseline_gamma_shrinks"] = {
            "claim": f"baseline gamma below {BASELINE_GAMMA_MAX} and decreasing in lambda",
            "holds": all(g < BASELINE_GAMMA_MAX for g in gammas) and decreasing,
            "gammas": gammas,
            "lambdas": [p["l1_coefficient"] for p in healthy[BASELINE]],
        }
    comparisons = (
        (
            "gated_beats_wider_baseline",
            PAPER,
            BASELINE,
            "paper gated above the 1.5x wider baseline",
        ),
        (
            "frozen_aux_decoder_helps",
            PAPER,
            TRAINABLE_AUX,
            "paper gated above the trainable-aux-decoder ablation",
        ),
        (
            "r_mag_tying_helps",
            PAPER,
            NO_R_MAG,
            "paper gated above the no-r_mag ablation",
        ),
        (
            "untied_encoders_do_not_help",
            PAPER,
            UNTIED,
            "paper gated at or above the untied ablation",
        ),
        (
            "april_update_vs_paper",
            PAPER,
            APRIL,
            "paper gated above the april_update recipe",
        ),
        (
            "discouraged_mixture_hurts",
            PAPER,
            MIXTURE,
            "paper gated above the discouraged mixture (decoder-norm-weighted L1, "
            "frozen aux decoder, free decoder norms)",
        ),
    )
    for key, better, worse, text in comparisons:
        if healthy.get(better) and healthy.get(worse):
            margins = frontier_margins(healthy[better], healthy[worse])
            if margins:
                claims[key] = {
                    "claim": f"{text}: explained variance at matched L0",
                    "holds": all(m["margin"] > 0 for m in margins)
                    if key != "untied_encoders_do_not_help"
                    else _mean([m["margin"] for m in margins]) >= 0,
                    "mean_margin": _mean([m["margin"] for m in margins]),
                    "margins": margins,
                }
    if by_variant.get(NO_AUX):
        l0s = [p["l0"] for p in by_variant[NO_AUX]]
        claims["no_aux_loss_closes_the_gates"] = {
            "claim": "without the auxiliary loss, L0 falls to (near) 0",
            "holds": max(l0s) < 1.0,
            "l0s": l0s,
        }
    return claims


def frontier_margins(
    better: list[dict[str, Any]], worse: list[dict[str, Any]]
) -> list[dict[str, float]]:
    """Explained variance of ``better`` minus ``worse`` at each of ``better``'s L0 values.

    ``worse``'s curve is interpolated linearly in log L0; points outside its L0 range are
    not compared.
    """
    curve = sorted((math.log(p["l0"]), p["explained_variance"]) for p in worse)
    margins = []
    for point in better:
        log_l0 = math.log(point["l0"])
        for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
            if x0 <= log_l0 <= x1:
                at = y0 if x1 == x0 else y0 + (y1 - y0) * (log_l0 - x0) / (x1 - x0)
                margins.append(
                    {
                        "l0": point["l0"],
                        "explained_variance": point["explained_variance"],
                        "other_explained_variance": at,
                        "margin": point["explained_variance"] - at,
                    }
                )
                break
    return margins


def _config_record(
    cfg: SweepConfig, gated_width: int, settings: TrainingSettings
) -> dict[str, Any]:
    record = cfg.record()
    record.update(
        steps=settings.steps,
        seeds=cfg.resolved_seeds,
        eval_samples=cfg.resolved_eval_samples,
        gated_width=gated_width,
        eval_seed=EVAL_SEED,
        grids={v.name: list(_grid(cfg, v)) for v in VARIANTS},
    )
    return record


def _grid(cfg: SweepConfig, variant: Variant) -> tuple[float, ...]:
    if cfg.l1 is not None:
        return tuple(cfg.l1)
    return variant.quick_l1 if cfg.quick else variant.full_l1


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def format_claims(results: dict[str, Any]) -> str:
    """A table of the sweep's points and one line per claim with its verdict."""
    header = f"{'variant':<32}{'lambda':>7}{'L0':>8}{'EV':>7}{'gamma':>7}{'dead':>6}{'MCC':>7}"
    lines = [header, "-" * len(header)]
    for p in results["points"]:
        mcc = "-" if p["ground_truth_mcc"] is None else f"{p['ground_truth_mcc']:.3f}"
        lines.append(
            f"{p['variant']:<32}{p['l1_coefficient']:>7g}{p['l0']:>8.2f}"
            f"{p['explained_variance']:>7.3f}{p['relative_reconstruction_bias']:>7.3f}"
            f"{p['dead_fraction']:>6.0%}{mcc:>7}"
        )
    lines.append("")
    for name, claim in results["claims"].items():
        verdict = "holds" if claim["holds"] else "DOES NOT HOLD"
        detail = ""
        if "mean_margin" in claim:
            detail = f" (mean EV margin {claim['mean_margin']:+.3f})"
        elif "gammas" in claim:
            detail = " (gammas " + ", ".join(f"{g:.3f}" for g in claim["gammas"]) + ")"
        elif "l0s" in claim:
            detail = " (L0 " + ", ".join(f"{v:.2f}" for v in claim["l0s"]) + ")"
        lines.append(f"{name}: {verdict}{detail}")
    lines.append(f"Wrote results.json and plots to {results['config']['out']}")
    return "\n".join(lines)

"""PNG plots of sweep and demo results.

Figures are built with matplotlib's object API (``Figure``), never through pyplot: plotting
needs no display and leaves the process's matplotlib backend, and any open figures, alone.
"""

import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from sae_lens_gated.repro.experiments import (
    APRIL,
    BASELINE,
    MAGNITUDE_BINS,
    MIXTURE,
    NO_AUX,
    NO_R_MAG,
    PAPER,
    TRAINABLE_AUX,
    UNTIED,
    RunResult,
)

_MIN_PLOTTED_L0 = 0.5

# Colour and marker of each variant in every plot.
VARIANT_STYLES: dict[str, dict[str, Any]] = {
    PAPER: {"color": "#1f77b4", "marker": "o"},
    APRIL: {"color": "#17becf", "marker": "s"},
    NO_R_MAG: {"color": "#9467bd", "marker": "^"},
    UNTIED: {"color": "#8c564b", "marker": "v"},
    TRAINABLE_AUX: {"color": "#e377c2", "marker": "D"},
    NO_AUX: {"color": "#7f7f7f", "marker": "x"},
    MIXTURE: {"color": "#bcbd22", "marker": "*"},
    BASELINE: {"color": "#d62728", "marker": "P"},
}


def plot_pareto(points: list[dict[str, Any]], path: Path) -> None:
    """L0 against explained variance, one line per variant (higher and further left wins)."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for name, pts in _by_variant(points).items():
        # Runs whose gates all but closed would stretch the axis to 0.01; list them instead.
        shown = sorted(
            (p for p in pts if p["l0"] >= _MIN_PLOTTED_L0), key=lambda p: p["l0"]
        )
        hidden = len(pts) - len(shown)
        label = name + (
            f" ({hidden} run(s) with L0 < {_MIN_PLOTTED_L0} not shown)"
            if hidden
            else ""
        )
        ax.plot(
            [p["l0"] for p in shown],
            [p["explained_variance"] for p in shown],
            label=label,
            **VARIANT_STYLES.get(name, {}),
        )
    _plain_log_axis(ax)
    ax.set_xlabel("L0 (active features per input)")
    ax.set_ylabel("explained variance")
    ax.set_title("Sparsity-fidelity frontier")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_gamma(points: list[dict[str, Any]], path: Path) -> None:
    """Relative reconstruction bias against lambda: gated variants and the baseline."""
    fig = Figure(figsize=(11, 4.5))
    gated_ax, base_ax = fig.subplots(1, 2)
    for name, pts in _by_variant(points).items():
        ax = base_ax if name == BASELINE else gated_ax
        pts = sorted(
            (p for p in pts if p["healthy"]), key=lambda p: p["l1_coefficient"]
        )
        if pts:
            ax.plot(
                [p["l1_coefficient"] for p in pts],
                [p["relative_reconstruction_bias"] for p in pts],
                label=name,
                **VARIANT_STYLES.get(name, {}),
            )
    for ax, title in ((gated_ax, "gated SAEs"), (base_ax, "baseline, 1.5x wide")):
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        _plain_log_axis(ax)
        ax.set_xlabel("sparsity coefficient lambda")
        ax.set_ylabel("relative reconstruction bias gamma")
        ax.set_title(f"{title}: healthy runs (gamma < 1 is shrinkage)", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_magnitudes(runs: list[RunResult], path: Path) -> None:
    """Histograms of non-zero activations: gated vs baseline, the runs closest in L0."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    _draw_magnitudes(
        ax, runs, "Magnitudes of active features (gated: few tiny activations)"
    )
    _save(fig, path)


def plot_demo(runs: list[RunResult], path: Path) -> None:
    """The demo's figure: its runs on the frontier, and their activation magnitudes."""
    fig = Figure(figsize=(12, 4.5))
    pareto_ax, hist_ax = fig.subplots(1, 2)
    for run in runs:
        style = VARIANT_STYLES.get(run.variant, {})
        pareto_ax.scatter(
            run.l0,
            run.explained_variance,
            color=style.get("color"),
            marker=style.get("marker", "o"),
            s=60,
        )
        pareto_ax.annotate(
            f"{run.variant.split(' (')[0]}\nlambda={run.l1_coefficient:g}, "
            f"gamma={run.relative_reconstruction_bias:.2f}",
            (run.l0, run.explained_variance),
            fontsize=7,
            textcoords="offset points",
            xytext=(6, -10),
        )
    _plain_log_axis(pareto_ax)
    pareto_ax.margins(x=0.3, y=0.15)  # room for the labels
    pareto_ax.set_xlabel("L0 (active features per input)")
    pareto_ax.set_ylabel("explained variance")
    pareto_ax.set_title("Gated vs 1.5x wider baseline")
    pareto_ax.grid(True, alpha=0.3)
    _draw_magnitudes(hist_ax, runs, "Magnitudes of active features")
    _save(fig, path)


# Colours and markers of the density sweep's lines, in order.
_LINE_STYLES = [
    ("#1f77b4", "o"),
    ("#2ca02c", "s"),
    ("#ff7f0e", "*"),
    ("#d62728", "P"),
    ("#7f7f7f", "x"),
    ("#9467bd", "v"),
]


def plot_density_sweep(
    runs: list[dict[str, Any]], path: Path, lines: dict[str, str]
) -> None:
    """Training-step time against the open-gate fraction, for the benchmark's variants.

    Args:
        runs: :func:`~sae_lens_gated.repro.bench.run_benchmark` results, one per density.
        path: The PNG file to write.
        lines: The variants to draw (keys of each run's ``step_seconds``) and their labels.
    """
    runs = sorted(runs, key=lambda run: run["summary"]["gate_density"])
    densities = [100 * run["summary"]["gate_density"] for run in runs]
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for (name, label), (color, marker) in zip(lines.items(), _LINE_STYLES):
        seconds = [run["step_seconds"][name] for run in runs]
        ax.plot(densities, seconds, label=label, color=color, marker=marker)
    limits = [run["summary"]["limit_s"] for run in runs]
    ax.plot(
        densities, limits, "k--", label="limit: encoder matmul + one elementwise pass"
    )
    ax.set_yscale("log")
    _plain_log_axis(ax)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    cfg = runs[0]["config"]
    ax.set_xlabel("open gates (% of batch x d_sae)")
    ax.set_ylabel("training step (s, SAETrainer.step)")
    ax.set_title(
        f"d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, batch {cfg['batch']}, "
        f"{cfg['device']}, {cfg['dtype']}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _draw_magnitudes(ax: Axes, runs: list[RunResult], title: str) -> None:
    # Histograms of the gated and baseline runs closest in L0.
    pair = _closest_pair(runs)
    if pair is not None:
        for run in pair:
            _histogram(ax, run)
        ax.legend(fontsize=8)
    ax.set_xlabel("non-zero feature activation")
    ax.set_ylabel("fraction of non-zero activations")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _closest_pair(runs: list[RunResult]) -> tuple[RunResult, RunResult] | None:
    gated = [r for r in runs if r.variant == PAPER and r.l0 > 0]
    baseline = [r for r in runs if r.variant == BASELINE and r.l0 > 0]
    if not gated or not baseline:
        return None
    return min(
        ((g, b) for g in gated for b in baseline),
        key=lambda pair: abs(math.log(pair[0].l0) - math.log(pair[1].l0)),
    )


def _histogram(ax: Axes, run: RunResult) -> None:
    total = max(1, sum(run.magnitude_histogram))
    centers = [(a + b) / 2 for a, b in zip(MAGNITUDE_BINS, MAGNITUDE_BINS[1:])]
    ax.step(
        centers,
        [c / total for c in run.magnitude_histogram],
        where="mid",
        label=f"{run.variant}, L0={run.l0:.1f}",
        color=VARIANT_STYLES.get(run.variant, {}).get("color"),
    )


def _by_variant(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        grouped.setdefault(point["variant"], []).append(point)
    return grouped


def _plain_log_axis(ax: Axes) -> None:
    """Log x axis labelled 1, 2, 5, 10 ... instead of overlapping powers of ten."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

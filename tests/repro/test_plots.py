import os
import subprocess
import sys
from pathlib import Path

from sae_lens_gated.repro.experiments import VARIANTS
from sae_lens_gated.repro.plots import VARIANT_STYLES

ROOT = Path(__file__).resolve().parents[2]

# Draws every plot of the harness in a fresh process whose backend is "svg", then checks
# that the backend is still "svg" and that pyplot (global figure state) was never loaded.
_SCRIPT = """
import sys
from pathlib import Path

import matplotlib

from sae_lens_gated.repro.experiments import BASELINE, MAGNITUDE_BINS, PAPER, RunResult
from sae_lens_gated.repro.plots import plot_demo, plot_gamma, plot_magnitudes, plot_pareto

out = Path(sys.argv[1])
assert matplotlib.get_backend() == "svg"
histogram = [1] * (len(MAGNITUDE_BINS) - 1)
runs = [
    RunResult(name, "x", l1, 0, 8, l0, 0.1, ev, gamma, 0.0, None, 1.0, histogram)
    for name, l1, l0, ev, gamma in (
        (PAPER, 0.5, 6.0, 0.9, 1.0),
        (PAPER, 1.0, 4.0, 0.85, 1.0),
        (BASELINE, 0.5, 8.0, 0.8, 0.8),
        (BASELINE, 1.0, 0.1, 0.2, 0.6),
    )
]
points = [
    {"variant": r.variant, "l1_coefficient": r.l1_coefficient, "l0": r.l0,
     "explained_variance": r.explained_variance,
     "relative_reconstruction_bias": r.relative_reconstruction_bias,
     "healthy": r.l0 >= 1}
    for r in runs
]
plot_pareto(points, out / "pareto.png")
plot_gamma(points, out / "gamma.png")
plot_magnitudes(runs, out / "magnitudes.png")
plot_demo(runs, out / "demo.png")
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""


def test_plots_write_pngs_and_leave_the_matplotlib_backend_alone(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "svg"},
    )
    assert result.returncode == 0, result.stderr
    for name in ("pareto.png", "gamma.png", "magnitudes.png", "demo.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 10_000, name


def test_every_variant_has_its_own_colour_and_marker():
    assert set(VARIANT_STYLES) == {v.name for v in VARIANTS}
    styles = list(VARIANT_STYLES.values())
    assert len({s["color"] for s in styles}) == len(styles)
    assert len({s["marker"] for s in styles}) == len(styles)

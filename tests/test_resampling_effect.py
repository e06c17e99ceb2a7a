import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import load_module

SCRIPT = Path(__file__).parents[1] / "scripts" / "resampling_effect.py"


@pytest.fixture(scope="module")
def script() -> Any:
    return load_module(SCRIPT)


def test_paired_runs_are_one_run_until_the_first_event(
    script: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "effect"
    args = [
        "--seeds",
        "0",
        "--steps",
        "300",
        "--window",
        "50",
        "--events",
        "100",
        "200",
    ]
    summary = script.main([str(out), *args])
    assert json.loads((out / "results.json").read_text()) == summary
    assert (out / "dead_features.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out.splitlines()
    assert json.loads(stdout[-1]) == summary
    off, on = summary["runs"]
    assert (off["resampling"], on["resampling"]) == (False, True)
    # Same init, same data: the firing record is the same until the first event runs.
    before = [point for point in off["dead_curve"] if point[0] <= 100]
    assert len(before) == 5 and before == on["dead_curve"][:5]
    assert off["dead_curve"] != on["dead_curve"]  # and the events changed the run
    for run in (off, on):
        # The curve's last point is the last window, at the last step.
        assert run["dead_curve"][-1] == [300, run["dead_last_window"]]
        assert 0 <= run["dead_fraction_held_out"] <= 1
    assert (off["n_resampled"], off["last_event_firing_at_end"]) == (0, None)
    assert 0 < on["last_event_resampled"] <= on["n_resampled"]
    assert 0 <= on["last_event_firing_at_end"] <= on["last_event_resampled"]
    row = f"| 0 | on | {on['dead_last_window']} | {on['l0']:.2f} |"
    assert any(line.startswith(row) for line in stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--events", "10", "5"], "--events strictly increasing"),
        (["--steps", "60", "--window", "10", "--events", "60"], "[10, 60)"),
        (["--lr", "0"], "--lr must be positive"),
    ],
)
def test_bad_arguments_exit_2_before_any_training(
    script: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
):
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "never"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "never").exists()


def test_a_non_empty_folder_is_refused(
    script: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"

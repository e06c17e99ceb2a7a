import subprocess
import sys
from pathlib import Path

import pytest

from sae_lens_gated import __version__
from sae_lens_gated.cli import main


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_gated", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "train" in result.stdout


def test_version(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_demo_command_prints_the_table_and_saves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["demo", "--steps", "150", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "gamma" in out and "gated (paper recipe)" in out
    assert (tmp_path / "d" / "cfg.json").exists()
    assert (tmp_path / "d" / "sae_weights.safetensors").exists()


def test_train_command_hands_arguments_to_the_saelens_runner_cli(
    capsys: pytest.CaptureFixture[str],
):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--architecture", "gated", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--recipe",
        "--aux_coefficient",
        "--unit_norm_decoder",
        "--weight_tying",
    ):
        assert flag in help_text


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2

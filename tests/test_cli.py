import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.sae import SAE

from sae_lens_gated import __version__
from sae_lens_gated.cli import main
from tests.helpers import (
    random_dictionary_learning_ae,
    write_dictionary_learning_folder,
)


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_gated", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "train" in result.stdout
    assert "convert" in result.stdout


def test_version(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_demo_command_prints_the_table_and_saves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out_dir = tmp_path / "d"
    args = [
        "demo",
        "--steps",
        "60",
        "--out",
        str(out_dir),
        "--gated-l1",
        "1",
        "--baseline-l1",
        "1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "gamma" in out
        and "gated (paper)" in out
        and "baseline (standard, 1.5x wide)" in out
    )
    for name in (
        "cfg.json",
        "sae_weights.safetensors",
        "demo.png",
        "demo_results.json",
    ):
        assert (out_dir / name).exists(), name


def test_sweep_command_prints_claims_and_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    args = ["sweep", "--quick", "--steps", "30", "--out", str(tmp_path / "s")]
    args += ["--variants", "gated (paper)", "gated, no aux loss"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no_aux_loss_closes_the_gates" in out
    assert (tmp_path / "s" / "results.json").exists()


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--hook", "blocks.0.hook_resid_post"], "both --model and --hook"),
        (["sweep", "--variants", "gated (imaginary)"], "Unknown variant(s)"),
        (["bench", "--repeats", "0"], "must all be >= 1"),
    ],
)
def test_invalid_settings_exit_with_a_usage_error_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_convert_dictionary_learning_folder_to_jumprelu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ae = random_dictionary_learning_ae(seed=11)
    write_dictionary_learning_folder(tmp_path / "sweep" / "trainer_0", ae)
    dst = tmp_path / "jumprelu"

    code = main(
        ["convert", str(tmp_path / "sweep"), str(dst), "--to", "jumprelu"]
        + ["--folder", "trainer_0"]
    )

    assert code == 0
    assert capsys.readouterr().out == (
        f"Wrote jumprelu SAE (d_in=16, d_sae=48) to {dst}: "
        "cfg.json, sae_weights.safetensors\n"
    )
    jumprelu = SAE.load_from_disk(dst)
    assert type(jumprelu) is JumpReLUSAE
    x = torch.randn(100, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            jumprelu.encode(x), ae.encode(x), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(jumprelu(x), ae(x), rtol=1e-5, atol=1e-5)


def test_convert_between_saelens_and_dictionary_learning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ae = random_dictionary_learning_ae(seed=12)
    write_dictionary_learning_folder(tmp_path / "dl", ae)
    assert (
        main(["convert", str(tmp_path / "dl"), str(tmp_path / "sl"), "--to", "saelens"])
        == 0
    )
    args = ["convert", str(tmp_path / "sl"), str(tmp_path / "back"), "--to"]
    assert main([*args, "dictionary_learning", "--dtype", "float64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"Wrote saelens SAE (d_in=16, d_sae=48) to {tmp_path / 'sl'}: "
        "cfg.json, sae_weights.safetensors",
        f"Wrote dictionary_learning SAE (d_in=16, d_sae=48) to {tmp_path / 'back'}: "
        "ae.pt, config.json",
    ]
    back = torch.load(tmp_path / "back" / "ae.pt", weights_only=True)
    assert back["encoder.weight"].dtype == torch.float64
    torch.testing.assert_close(back["encoder.weight"], ae.encoder.weight.double())
    torch.testing.assert_close(back["r_mag"], ae.r_mag.double())


def test_convert_errors_are_one_line_and_a_non_zero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    write_dictionary_learning_folder(tmp_path / "dl", random_dictionary_learning_ae())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "cfg.json").write_text("{}")

    assert (
        main(
            [
                "convert",
                str(tmp_path / "dl"),
                str(tmp_path / "taken"),
                "--to",
                "saelens",
            ]
        )
        == 1
    )
    assert (
        main(
            ["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "saelens"]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = captured.err.splitlines()
    assert errors[0].startswith("sae-lens-gated convert: error: Refusing to write to ")
    assert errors[1].startswith("sae-lens-gated convert: error: ")
    assert "is not a local folder" in errors[1]
    assert (tmp_path / "taken" / "cfg.json").read_text() == "{}"
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "dl"), str(tmp_path / "y"), "--to", "topk"])
    assert exit_info.value.code == 2

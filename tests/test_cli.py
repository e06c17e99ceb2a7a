import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import docstring_parser
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.sae import SAE

from sae_lens_gated import __version__, cli
from sae_lens_gated.cli import main
from sae_lens_gated.repro.bench import BenchConfig
from sae_lens_gated.repro.demo import DemoConfig
from sae_lens_gated.repro.sweep import SweepConfig
from tests.helpers import (
    random_dictionary_learning_ae,
    write_dictionary_learning_folder,
)

SETTINGS = {"demo": DemoConfig, "sweep": SweepConfig, "bench": BenchConfig}


def _field_docs(settings: type[Any]) -> dict[str, str]:
    """The ``Args:`` descriptions of a settings dataclass and its bases."""
    docs: dict[str, str] = {}
    for cls in reversed(settings.__mro__[:-1]):
        for param in docstring_parser.parse(inspect.getdoc(cls) or "").params:
            docs[param.arg_name] = param.description or ""
    return docs


@pytest.mark.parametrize("command", list(SETTINGS))
def test_help_shows_every_setting_with_its_meaning_and_default(
    command: str, capsys: pytest.CaptureFixture[str]
):
    settings = SETTINGS[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    section = capsys.readouterr().out.split("\nsettings:\n")[1]
    entries = {
        entry.split()[0]: " ".join(entry.split())
        for entry in re.split(r"\n  (?=--)", section.strip("\n"))
    }
    docs = _field_docs(settings)
    options = {
        field.name: field
        for field in dataclasses.fields(settings)
        if field.metadata.get("cmd", True)
    }
    assert set(entries) == {"--" + name.replace("_", "-") for name in options}
    # The nested synthetic-model config is the one field that is not an option.
    excluded = {field.name for field in dataclasses.fields(settings)} - set(options)
    assert excluded == (set() if command == "bench" else {"synthetic_model"})
    defaults = settings()
    for name in options:
        entry = entries["--" + name.replace("_", "-")]
        meaning = " ".join(docs[name].replace("``", "").split()[:4])
        assert meaning in entry, (name, entry)
        assert entry.endswith(f"(default: {getattr(defaults, name)})"), (name, entry)


def _capture_settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the commands' work by recording the settings they were given."""
    seen: dict[str, Any] = {}

    def record(command: str, result: Any) -> Any:
        def run(settings: Any) -> Any:
            seen[command] = settings
            return result

        return run

    monkeypatch.setattr(cli, "run_demo", record("demo", []))
    monkeypatch.setattr(cli, "run_sweep", record("sweep", {}))
    monkeypatch.setattr(cli, "format_claims", str)
    monkeypatch.setattr(cli, "run_benchmark", record("bench", {}))
    monkeypatch.setattr(cli, "format_report", str)
    return seen


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo"], DemoConfig()),
        (["sweep"], SweepConfig()),
        (["bench"], BenchConfig()),
        (
            ["demo", "--out", "o", "--steps", "7", "--batch-size", "9"]
            + ["--gated-l1", "0.1", "0.2", "--baseline-l1", "0.3", "--seed", "4"]
            + ["--device", "cpu", "--model", "m", "--hook", "h", "--dataset", "d"]
            + ["--context-size", "5", "--expansion", "2.5"],
            DemoConfig(
                out=Path("o"),
                steps=7,
                batch_size=9,
                gated_l1=(0.1, 0.2),
                baseline_l1=(0.3,),
                seed=4,
                model="m",
                hook="h",
                dataset="d",
                context_size=5,
                expansion=2.5,
            ),
        ),
        (
            ["sweep", "--out", "s", "--quick", "--steps", "3", "--seeds", "1", "2"]
            + ["--variants", "gated (paper)", "gated, no aux loss", "--l1", "0.5"]
            + ["--device", "cpu"],
            SweepConfig(
                out=Path("s"),
                quick=True,
                steps=3,
                seeds=(1, 2),
                variants=("gated (paper)", "gated, no aux loss"),
                l1=(0.5,),
            ),
        ),
        (
            ["bench", "--d-in", "8", "--d-sae", "16", "--batch", "4", "--device"]
            + ["cpu", "--dtype", "bfloat16", "--repeats", "2", "--seed", "3"],
            BenchConfig(d_in=8, d_sae=16, batch=4, dtype="bfloat16", repeats=2, seed=3),
        ),
    ],
)
def test_options_set_the_settings_fields(
    argv: list[str], expected: Any, monkeypatch: pytest.MonkeyPatch
):
    seen = _capture_settings(monkeypatch)
    assert main(argv) == 0
    assert seen == {argv[0]: expected}


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

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import docstring_parser
import pytest
import sae_lens.llm_sae_training_runner
import sae_lens.multi_sae_training_runner
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.sae import SAE

from sae_lens_gated import __version__, cli
from sae_lens_gated.cli import main
from sae_lens_gated.distributed.collectives import DEFAULT_TIMEOUT_S
from sae_lens_gated.repro.bench import BenchConfig
from sae_lens_gated.repro.demo import DemoConfig
from sae_lens_gated.repro.sweep import SweepConfig
from tests.helpers import (
    random_dictionary_learning_ae,
    tiny_model,
    tiny_token_dataset,
    write_activation_cache,
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


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``sae-lens-gated ARGV``."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert isinstance(code, int)
    return code, captured.out, captured.err


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commands whose work started (training, benchmarking, loading), which is
    replaced by nothing; a usage error must leave this empty."""
    started: list[str] = []

    def start(name: str, result: Any) -> Any:
        def run(*_: Any, **__: Any) -> Any:
            started.append(name)
            return result

        return run

    monkeypatch.setattr(cli, "run_demo", start("demo", []))
    monkeypatch.setattr(cli, "run_sweep", start("sweep", {}))
    monkeypatch.setattr(cli, "format_claims", str)
    monkeypatch.setattr(cli, "run_benchmark", start("bench", {}))
    monkeypatch.setattr(cli, "format_report", str)
    monkeypatch.setattr(cli, "load_gated_sae", start("convert", None))
    monkeypatch.setattr(cli, "run_training", start("train", None))
    monkeypatch.setattr(cli, "MultiSAETrainingRunner", start("train sweep", None))
    monkeypatch.setattr(
        cli, "CachedMultiSAETrainingRunner", start("train sweep from a cache", None)
    )
    return started


def _assert_usage_error(
    code: int, out: str, err: str, command: str, *fragments: str
) -> None:
    assert code == 2
    assert out == ""
    (line,) = err.splitlines()  # one line, no usage block, no traceback
    assert line.startswith(f"sae-lens-gated {command}: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["demo", "--hook", "blocks.0.hook_resid_post"], ["both --model and --hook"]),
        (["demo", "--steps", "0"], ["steps", "at least 1", "0"]),
        (["demo", "--steps", "-5"], ["steps", "-5"]),
        (["demo", "--batch-size", "0"], ["batch_size", "at least 1"]),
        (["demo", "--gated-l1", "-1"], ["gated_l1", "-1.0"]),
        (["demo", "--gated-l1", "0.5", "nan"], ["gated_l1", "nan"]),
        (["demo", "--baseline-l1", "inf"], ["baseline_l1", "inf"]),
        (["demo", "--lr", "0"], ["lr", "above 0"]),
        (["demo", "--eval-samples", "0"], ["eval_samples"]),
        (["demo", "--steps", "ten"], ["--steps", "invalid int value: 'ten'"]),
        (["demo", "--device", "foo"], ["Unknown device 'foo'"]),
        (["demo", "--device", "cuda"], ["'cuda' is not available"]),
        (["demo", "--device", "cuda:7"], ["'cuda:7' is not available"]),
        (["sweep", "--variants", "gated (imaginary)"], ["Unknown variant(s)"]),
        (["sweep", "--steps", "0"], ["steps", "at least 1"]),
        (["sweep", "--batch-size", "0"], ["batch_size"]),
        (["sweep", "--l1", "-0.5"], ["l1", "-0.5"]),
        (["sweep", "--l1", "nan"], ["l1", "nan"]),
        (["sweep", "--seeds"], ["seeds needs at least one value"]),
        (["sweep", "--device", "cuda:7"], ["'cuda:7' is not available"]),
        (["bench", "--repeats", "0"], ["repeats", "at least 1"]),
        (["bench", "--d-sae", "0"], ["d_sae", "at least 1"]),
        (["bench", "--device", "foo"], ["Unknown device 'foo'"]),
        (["bench", "--device", "cuda"], ["'cuda' is not available"]),
        (["bench", "--dtype", "float16"], ["--dtype", "invalid choice"]),
        (["convert", "a", "b", "--to", "saelens", "--device", "foo"], ["'foo'"]),
        (["convert", "a", "b", "--to", "topk"], ["--to", "invalid choice"]),
    ],
)
def test_invalid_settings_are_one_usage_error_line_before_any_work(
    argv: list[str],
    fragments: list[str],
    work: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    # The CUDA cases are of a machine without a GPU, whatever machine runs them.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _assert_usage_error(*_run(argv, capsys), argv[0], *fragments)
    assert work == []


@pytest.mark.parametrize("command", ["demo", "sweep"])
def test_an_existing_non_empty_out_folder_is_refused_before_training(
    command: str,
    tmp_path: Path,
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "cfg.json").write_text('{"d_in": 3}')
    (saved / "sae_weights.safetensors").write_bytes(b"weights")

    code, out, err = _run([command, "--out", str(saved)], capsys)

    _assert_usage_error(code, out, err, command, str(saved), "--overwrite")
    assert work == []
    assert sorted(p.name for p in saved.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert (saved / "cfg.json").read_text() == '{"d_in": 3}'
    assert (saved / "sae_weights.safetensors").read_bytes() == b"weights"

    assert _run([command, "--out", str(saved), "--overwrite"], capsys)[0] == 0
    assert work == [command]


def test_the_readme_demo_run_twice_refuses_the_second_time(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.chdir(tmp_path)
    assert _run(["demo"], capsys)[0] == 0  # creates ./gated-demo (training replaced)
    (tmp_path / "gated-demo" / "cfg.json").write_text("{}")  # as the first run saves

    code, out, err = _run(["demo"], capsys)

    _assert_usage_error(code, out, err, "demo", "gated-demo", "--overwrite")
    assert work == ["demo"]


@pytest.mark.parametrize("command", ["demo", "sweep"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_out_path_that_is_a_file_is_refused_before_training(
    command: str,
    overwrite: list[str],
    tmp_path: Path,
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    code, out, err = _run([command, "--out", str(taken), *overwrite], capsys)
    _assert_usage_error(code, out, err, command, str(taken))
    assert work == []
    assert taken.read_text() == "mine"


def test_an_error_during_the_work_is_one_line_and_exit_code_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    def out_of_memory(*_: Any, **__: Any) -> Any:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(cli, "run_sweep", out_of_memory)
    code, out, err = _run(["sweep", "--out", str(tmp_path / "s")], capsys)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "sae-lens-gated sweep: error: RuntimeError: CUDA out of memory. Tried to "
        "allocate 2 GiB"
    ]


def test_a_usage_error_is_one_line_from_the_installed_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_gated", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "sae-lens-gated demo: error: steps must be at least 1, got 0."
    ]


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--recipe", "bogus"], ["--recipe", "invalid choice: 'bogus'"]),
        (["--aux_coefficient", "-1"], ["aux_coefficient", "-1"]),
        (["--l1_coefficient", "nan"], ["l1_coefficient", "nan"]),
        (["--d_sae", "many"], ["--d_sae", "invalid int value: 'many'"]),
        (["--no_such_field", "1"], ["unrecognized arguments: --no_such_field 1"]),
        (["--resample_pool_device", "gpu"], ["resample_pool_device", "'gpu'"]),
    ],
)
def test_train_rejects_an_invalid_field_before_loading_any_model(
    argv: list[str],
    fragments: list[str],
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    code, out, err = _run(["train", "--architecture", "gated", *argv], capsys)
    _assert_usage_error(code, out, err, "train", *fragments)
    assert work == []


def test_train_runs_the_runner_with_the_parsed_config_and_reports_its_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    configs: list[Any] = []

    def failing_run(cfg: Any, mode: str, timeout_s: float) -> None:
        configs.append(cfg)
        assert (mode, timeout_s) == ("data", DEFAULT_TIMEOUT_S)
        raise OSError("model gpt2 not found (offline)")

    monkeypatch.setattr(cli, "run_training", failing_run)
    argv = ["train", "--architecture", "gated", "--recipe", "april_update"]
    code, out, err = _run([*argv, "--d_in", "16", "--d_sae", "64"], capsys)
    assert (code, out) == (1, "")
    assert err == "sae-lens-gated train: error: model gpt2 not found (offline)\n"
    (cfg,) = configs
    assert cfg.sae.architecture() == "gated"
    assert (cfg.sae.recipe, cfg.sae.d_in, cfg.sae.d_sae) == ("april_update", 16, 64)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "cpu"),
        (["--resample_pool_device", "None"], None),
        (["--resample_pool_device", "cuda:1"], "cuda:1"),
    ],
)
def test_train_sets_where_the_resampling_pool_is_kept(
    argv: list[str],
    expected: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    configs: list[Any] = []
    monkeypatch.setattr(cli, "run_training", lambda cfg, *_: configs.append(cfg))
    code, _, _ = _run(["train", "--architecture", "gated", *argv], capsys)
    assert code == 0
    (cfg,) = configs
    assert cfg.sae.resample_pool_device == expected


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


def test_convert_refuses_a_taken_destination_before_loading(
    tmp_path: Path, work: list[str], capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "cfg.json").write_text("{}")
    (tmp_path / "file").write_text("mine")
    for dst in ("taken", "file"):
        code, out, err = _run(
            ["convert", "src", str(tmp_path / dst), "--to", "saelens"], capsys
        )
        _assert_usage_error(code, out, err, "convert", "Refusing to write to")
    assert work == []
    assert (tmp_path / "taken" / "cfg.json").read_text() == "{}"
    assert (tmp_path / "file").read_text() == "mine"


def test_convert_maps_any_refusal_of_the_destination_to_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    # Whatever OSError the library's destination check raises (a link, no permission...).
    def unwritable(path: Path) -> None:
        raise PermissionError(f"Refusing to write to {path}: the folder is read-only.")

    monkeypatch.setattr(cli, "check_new_folder", unwritable)
    code, out, err = _run(
        ["convert", "src", str(tmp_path / "d"), "--to", "jumprelu"], capsys
    )
    _assert_usage_error(code, out, err, "convert", "read-only")
    assert work == []


def test_convert_loading_errors_are_one_line_and_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, out, err = _run(
        ["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "saelens"],
        capsys,
    )
    assert (code, out) == (1, "")
    (line,) = err.splitlines()
    assert line.startswith("sae-lens-gated convert: error: ")
    assert "is not a local folder" in line
    assert not (tmp_path / "x").exists()


def test_tests_run_in_an_empty_folder_outside_the_checkout():
    # README's two commands run in one clone: the demo leaves ./gated-demo behind, which
    # the CLI tests' default `--out` must not find.
    assert list(Path.cwd().iterdir()) == []
    assert not Path.cwd().resolve().is_relative_to(Path(__file__).resolve().parents[1])


# ---- train: a sweep from one activation stream ---------------------------------------------


@pytest.fixture
def lm_batches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """Both SAELens runners load the tiny model (no hub); records the number of token
    sequences of each forward pass the activation stores ask of it."""
    batches: list[int] = []

    def load_model(*_: Any, **__: Any) -> Any:
        model = tiny_model()
        run_with_cache = model.run_with_cache

        def counted(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            batches.append(tokens.shape[0])
            return run_with_cache(tokens, *args, **kwargs)

        model.run_with_cache = counted
        return model

    monkeypatch.setattr(sae_lens.llm_sae_training_runner, "load_model", load_model)
    monkeypatch.setattr(sae_lens.multi_sae_training_runner, "load_model", load_model)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return batches


def _token_dataset_folder(path: Path) -> Path:
    """The tiny token dataset as a local JSON-lines dataset (what --dataset_path reads)."""
    path.mkdir()
    rows = tiny_token_dataset()["tokens"]
    (path / "train.jsonl").write_text(
        "".join(json.dumps({"tokens": row}) + "\n" for row in rows)
    )
    return path


def _train_args(tmp_path: Path, out: str) -> list[str]:
    return [
        "train",
        "--architecture",
        "gated",
        "--d_in",
        "32",
        "--model_name",
        "tiny-random",
        "--hook_name",
        "blocks.1.hook_resid_post",
        "--dataset_path",
        str(_token_dataset_folder(tmp_path / f"data-{out}")),
        "--is_dataset_tokenized",
        "true",
        "--streaming",
        "false",
        "--context_size",
        "16",
        "--prepend_bos",
        "false",
        "--training_tokens",
        str(64 * 60),
        "--train_batch_size_tokens",
        "64",
        "--store_batch_size_prompts",
        "8",
        "--n_batches_in_buffer",
        "8",
        "--lr",
        "1e-2",
        "--log_to_wandb",
        "false",
        "--checkpoint_path",
        str(tmp_path / f"ckpt-{out}"),
        "--output_path",
        str(tmp_path / out),
    ]


def _l0(sae: SAE[Any], x: torch.Tensor) -> float:
    return float((sae.encode(x) > 0).float().sum(-1).mean())


def test_train_sweeps_every_lambda_and_width_from_one_activation_stream(
    tmp_path: Path, lm_batches: list[int], capsys: pytest.CaptureFixture[str]
):
    sweep = [
        *_train_args(tmp_path, "sweep"),
        "--l1_coefficient",
        "0.1",
        "3",
        "--d_sae",
        "64",
        "96",
    ]
    code, out, err = _run(sweep, capsys)
    assert code == 0, err
    names = ["d_sae-64_l1-0.1", "d_sae-96_l1-0.1", "d_sae-64_l1-3.0", "d_sae-96_l1-3.0"]
    assert out.splitlines()[-1] == (
        f"Trained 4 SAEs from one activation stream, saved to {tmp_path / 'sweep'}: "
        + ", ".join(names)
    )
    sweep_batches = list(lm_batches)
    lm_batches.clear()
    # One SAE alone costs the language model as much as the four together.
    single = [*_train_args(tmp_path, "single"), "--l1_coefficient", "0.1"]
    assert _run([*single, "--d_sae", "64"], capsys)[0] == 0
    assert sweep_batches == lm_batches and sum(lm_batches) > 0

    saes = {name: SAE.load_from_disk(tmp_path / "sweep" / name) for name in names}
    x = torch.randn(512, 32) * 3
    for name, sae in saes.items():
        assert type(sae).__name__ == "GatedSAE"
        assert sae.cfg.d_sae == int(name.split("_")[1].removeprefix("sae-"))
        assert float((sae.W_dec.norm(dim=1) - 1).abs().max()) < 1e-5
    for width in (64, 96):  # a higher lambda, a sparser SAE
        low, high = saes[f"d_sae-{width}_l1-0.1"], saes[f"d_sae-{width}_l1-3.0"]
        assert _l0(high, x) < _l0(low, x)
    runner_cfg = json.loads((tmp_path / "sweep" / "runner_cfg.json").read_text())
    assert {n: c["l1_coefficient"] for n, c in runner_cfg["saes"].items()} == {
        n: float(n.rsplit("-", 1)[1]) for n in names
    }
    single_alone = SAE.load_from_disk(tmp_path / "single")
    assert single_alone.cfg.d_sae == 64


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--l1_coefficient", "1", "2", "--lr", "1e-4", "3e-4"], ["--lr takes one"]),
        (["--d_sae", "64", "0"], ["--d_sae 0", "at least 1"]),
        (["--d_sae", "64", "1e40"], ["--d_sae", "invalid int value: '1e40'"]),
        (["--d_sae", "64", str(1 << 40)], ["do not fit on cpu", "GiB"]),
        (["--l1_coefficient", "0.5", "0.50"], ["same folder 'd_sae-1024_l1-0.5'"]),
        (["--l1_coefficient", "1", "--l1_coefficient", "2"], ["given twice"]),
        (
            ["--l1_coefficient", "1", "2", "--use_cached_activations", "true"],
            ["no activation cache at"],
        ),
    ],
)
def test_a_bad_sweep_is_one_usage_error_line_before_any_work(
    argv: list[str],
    fragments: list[str],
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    code, out, err = _run(["train", "--architecture", "gated", *argv], capsys)
    _assert_usage_error(code, out, err, "train", *fragments)
    assert work == []


def test_a_sweep_into_a_non_empty_output_folder_is_refused_untouched(
    tmp_path: Path, work: list[str], capsys: pytest.CaptureFixture[str]
):
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    (out_folder / "sae_weights.safetensors").write_bytes(b"earlier run")
    argv = ["train", "--architecture", "gated", "--output_path", str(out_folder)]
    code, out, err = _run([*argv, "--l1_coefficient", "1", "2"], capsys)
    _assert_usage_error(code, out, err, "train", "--output_path", "not an empty")
    assert work == []
    assert (out_folder / "sae_weights.safetensors").read_bytes() == b"earlier run"


def test_a_sweep_under_torchrun_is_refused(
    monkeypatch: pytest.MonkeyPatch, work: list[str], capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", "--architecture", "gated", "--l1_coefficient", "1", "2"]
    code, out, err = _run(argv, capsys)
    _assert_usage_error(code, out, err, "train", "without torchrun")
    assert work == []


def test_train_help_says_which_options_take_several_values(
    capsys: pytest.CaptureFixture[str],
):
    argv0 = sys.argv[0]
    code, out, _ = _run(["train", "--architecture", "gated", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: sae-lens-gated train [-h]")
    assert sys.argv[0] == argv0
    assert "[--l1_coefficient float [float ...]]" in " ".join(out.split())
    assert "[--d_sae int [int ...]]" in out
    lines = out.splitlines()
    for option in ("--l1_coefficient", "--d_sae"):
        start = next(
            i for i, line in enumerate(lines) if line.startswith(f"  {option} ")
        )
        block = " ".join(" ".join(lines[start : start + 7]).split())
        assert "Several values: one SAE per value" in block, option
        assert "MultiSAETrainingRunner" in block, option
    assert "--lr" in out and out.count("Several values") == 2


def test_train_refuses_cached_activations_that_do_not_fit_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    work: list[str],
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    cache = write_activation_cache(tmp_path / "cache", monkeypatch, n_rows=40)
    capsys.readouterr()  # the cache's progress bars
    argv = ["train", "--architecture", "gated", "--d_in", "32", "--context_size", "16"]
    argv += ["--use_cached_activations", "true", "--cached_activations_path"]
    for path, hook, fragment in (
        (tmp_path / "nowhere", "blocks.0.hook_resid_post", "no activation cache at"),
        (cache, "blocks.1.hook_resid_post", "not the hook of this run"),
        (cache, "blocks.0.hook_resid_post", "too small for this run"),
    ):
        code, out, err = _run([*argv, str(path), "--hook_name", hook], capsys)
        _assert_usage_error(code, out, err, "train", fragment)
    assert work == []


def test_train_sweeps_from_cached_activations_without_running_the_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lm_batches: list[int],
    capsys: pytest.CaptureFixture[str],
):
    cache = write_activation_cache(tmp_path / "cache", monkeypatch)
    lm_batches.clear()
    argv = _train_args(tmp_path, "sweep")
    argv[argv.index("--hook_name") + 1] = "blocks.0.hook_resid_post"
    argv += [
        "--use_cached_activations",
        "true",
        "--cached_activations_path",
        str(cache),
    ]
    code, out, err = _run([*argv, "--l1_coefficient", "0.1", "3"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == (
        f"Trained 2 SAEs from one activation stream, saved to {tmp_path / 'sweep'}: "
        "d_sae-1024_l1-0.1, d_sae-1024_l1-3.0"
    )
    assert lm_batches == []  # every activation came from the cache
    x = torch.randn(512, 32) * 3
    low, high = (
        SAE.load_from_disk(tmp_path / "sweep" / f"d_sae-1024_l1-{l1}")
        for l1 in ("0.1", "3.0")
    )
    assert _l0(high, x) < _l0(low, x)

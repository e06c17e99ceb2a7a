import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens.saes.gated_sae as builtin
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    get_sae_class,
    get_sae_training_class,
)
from sae_lens.saes.sae import SAE, TrainingSAE, TrainingSAEConfig

import sae_lens_gated
from sae_lens_gated import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
)
from tests.helpers import tiny_model, tiny_runner_dict, tiny_token_dataset


@pytest.fixture(autouse=True)
def _registered_after_each_test():  # pyright: ignore[reportUnusedFunction]
    yield
    sae_lens_gated.register()


def test_import_registers_the_plugin_classes():
    assert sae_lens_gated.is_registered()
    assert get_sae_training_class("gated") == (GatedTrainingSAE, GatedTrainingSAEConfig)
    assert get_sae_class("gated") == (GatedSAE, GatedSAEConfig)
    assert issubclass(GatedSAE, builtin.GatedSAE)
    assert issubclass(GatedSAEConfig, builtin.GatedSAEConfig)
    assert issubclass(GatedTrainingSAE, builtin.GatedTrainingSAE)
    assert issubclass(GatedTrainingSAEConfig, builtin.GatedTrainingSAEConfig)


def test_unregister_restores_the_exact_builtin_entries_and_both_are_idempotent():
    sae_lens_gated.unregister()
    sae_lens_gated.unregister()
    assert not sae_lens_gated.is_registered()
    inference_cls, inference_cfg = SAE_CLASS_REGISTRY["gated"]
    training_cls, training_cfg = SAE_TRAINING_CLASS_REGISTRY["gated"]
    assert inference_cls is builtin.GatedSAE and inference_cfg is builtin.GatedSAEConfig
    assert training_cls is builtin.GatedTrainingSAE
    assert training_cfg is builtin.GatedTrainingSAEConfig
    sae_lens_gated.register()
    sae_lens_gated.register()
    assert sae_lens_gated.is_registered()
    sae_lens_gated.unregister()
    assert SAE_TRAINING_CLASS_REGISTRY["gated"][0] is builtin.GatedTrainingSAE


def test_plugin_classes_keep_working_while_unregistered(tmp_path: Path):
    sae_lens_gated.unregister()
    cfg = GatedTrainingSAEConfig.from_dict(
        {"architecture": "gated", "d_in": 4, "d_sae": 8}
    )
    sae = GatedTrainingSAE(cfg)
    sae.save_model(tmp_path)
    assert type(GatedTrainingSAE.load_from_disk(tmp_path)) is GatedTrainingSAE
    assert type(TrainingSAE.load_from_disk(tmp_path)) is builtin.GatedTrainingSAE


def test_saelens_dict_configs_resolve_to_the_plugin(tmp_path: Path):
    cfg = TrainingSAEConfig.from_dict(
        {"architecture": "gated", "d_in": 8, "d_sae": 16, "recipe": "april_update"}
    )
    assert type(cfg) is GatedTrainingSAEConfig and cfg.recipe == "april_update"
    runner_cfg = LanguageModelSAERunnerConfig.from_dict(tiny_runner_dict(tmp_path))
    assert type(runner_cfg.sae) is GatedTrainingSAEConfig
    sae = SAE.from_dict({"architecture": "gated", "d_in": 8, "d_sae": 16})
    assert type(sae) is GatedSAE


def test_runner_cli_parser_offers_the_plugin_fields():
    cfg = _parse_cfg_args(
        [
            "--architecture",
            "gated",
            "--d_in",
            "32",
            "--d_sae",
            "64",
            "--recipe",
            "april_update",
            "--aux_coefficient",
            "0.5",
            "--weight_tying",
            "none",
            "--freeze_decoder_in_aux",
            "true",
            "--resample_steps",
            "30000",
            "60000",
            "--resample_window",
            "20000",
        ]
    )
    assert type(cfg.sae) is GatedTrainingSAEConfig
    assert cfg.sae.recipe == "april_update"
    assert cfg.sae.aux_coefficient == 0.5
    assert cfg.sae.weight_tying == "none"
    assert cfg.sae.freeze_decoder_in_aux is True
    assert cfg.sae.l1_scale_by_decoder_norm is True  # april_update default
    assert cfg.sae.resample_steps == [30000, 60000]
    assert cfg.sae.resample_window == 20000


def test_runner_given_a_builtin_config_object_trains_the_plugin(tmp_path: Path):
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=builtin.GatedTrainingSAEConfig(d_in=32, d_sae=64),
        **{
            k: v
            for k, v in tiny_runner_dict(tmp_path).items()
            if k not in ("sae", "logger")
        },
    )
    runner = LanguageModelSAETrainingRunner(
        runner_cfg, override_model=tiny_model(), override_dataset=tiny_token_dataset()
    )
    assert type(runner.sae) is GatedTrainingSAE
    assert runner.sae.cfg.unit_norm_decoder is True


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


def test_import_logs_one_info_line_and_env_var_opts_out():
    code = (
        "import logging; logging.basicConfig(level=logging.INFO); import sae_lens_gated;"
        "print('registered', sae_lens_gated.is_registered())"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "registered True" in result.stdout
    plugin_lines = [
        line for line in result.stderr.splitlines() if "sae_lens_gated" in line
    ]
    assert len(plugin_lines) == 1 and plugin_lines[0].startswith("INFO")

    result = _run_python(code, SAE_LENS_GATED_NO_AUTOREGISTER="1")
    assert result.returncode == 0, result.stderr
    assert "registered False" in result.stdout
    assert "sae_lens_gated" not in result.stderr


def test_register_logs_at_info(caplog: pytest.LogCaptureFixture):
    sae_lens_gated.unregister()
    with caplog.at_level(logging.INFO, logger="sae_lens_gated"):
        sae_lens_gated.register()
        sae_lens_gated.register()
    assert len(caplog.records) == 1

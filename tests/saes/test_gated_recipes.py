import logging
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE as BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as BuiltinGatedTrainingSAEConfig,
)

from sae_lens_gated import GatedConfigError, GatedTrainingSAE, GatedTrainingSAEConfig
from tests.helpers import (
    build_gated_training_cfg,
    tiny_model,
    tiny_runner_dict,
    tiny_token_dataset,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resample_window": 20.0}, "resample_window must be an integer, got 20.0"),
        ({"resample_window": True}, "resample_window must be an integer, got True"),
        ({"resample_pool_size": 1e3}, "resample_pool_size must be an integer"),
        ({"resample_every": 12_500.5}, "resample_every must be an integer"),
        (
            {"resample_steps": [20.5], "resample_window": 10},
            r"resample_steps\[0\] must be an integer, got 20.5",
        ),
        (
            {"resample_steps": [25_000, False]},
            r"resample_steps\[1\] must be an integer, got False",
        ),
        (
            {"resample_steps": 25_000},
            r"resample_steps must be a list of integers, e.g. \[25000\], got 25000",
        ),
        ({"l1_coefficient": "1.0"}, "l1_coefficient must be a number, got '1.0'"),
        ({"aux_coefficient": None}, "aux_coefficient must be a number, got None"),
        ({"l1_warm_up_steps": 1.5}, "l1_warm_up_steps must be an integer"),
        (
            {"unit_norm_decoder": "no"},
            "unit_norm_decoder must be true or false, got 'no'",
        ),
        ({"clip_grad_norm": "no"}, "clip_grad_norm must be true or false"),
        ({"resample_dead": 1}, "resample_dead must be true or false, got 1"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input must be true or false"),
        ({"decoder_init_norm": float("nan")}, "decoder_init_norm must be finite"),
        ({"decoder_init_norm": float("inf")}, "decoder_init_norm must be finite"),
        ({"decoder_init_norm": -0.1}, "decoder_init_norm must be > 0.0"),
        ({"decoder_init_norm": "0.1"}, "decoder_init_norm must be a number"),
        ({"d_sae": 0}, "d_sae must be >= 1"),
        (
            {"resample_pool_device": "gpu"},
            "resample_pool_device must be a device name such as 'cpu' or 'cuda', or "
            "None, got 'gpu'",
        ),
        ({"resample_pool_device": 0}, "resample_pool_device must be a device name"),
        ({"d_in": 16.0}, "d_in must be an integer"),
        ({"recipe": 3}, "Unknown recipe 3"),
    ],
)
def test_fields_of_the_wrong_type_are_refused_naming_the_field(
    kwargs: dict[str, Any], message: str
):
    with pytest.raises(GatedConfigError, match=message):
        build_gated_training_cfg(**kwargs)


def test_config_errors_are_both_type_and_value_errors():
    for caught in (TypeError, ValueError):
        with pytest.raises(caught):
            build_gated_training_cfg(resample_window=1.5)


def test_dict_configs_from_json_are_checked_too():
    cfg = build_gated_training_cfg(resample_every=12_500)
    as_json: dict[str, Any] = {**cfg.to_dict(), "resample_every": "12500"}
    with pytest.raises(GatedConfigError, match="resample_every must be an integer"):
        GatedTrainingSAEConfig.from_dict(as_json)


def test_decoder_init_norm_none_keeps_saelens_meaning():
    torch.manual_seed(0)
    builtin = BuiltinGatedTrainingSAE(
        BuiltinGatedTrainingSAEConfig(d_in=16, d_sae=48, decoder_init_norm=None)
    )
    torch.manual_seed(0)
    plugin = GatedTrainingSAE(
        build_gated_training_cfg(recipe="april_update", decoder_init_norm=None)
    )
    assert plugin.cfg.decoder_init_norm is None
    # SAELens's unscaled init: rows keep their random norms, which are not all equal.
    torch.testing.assert_close(plugin.W_dec, builtin.W_dec, rtol=0, atol=0)
    assert plugin.W_dec.norm(dim=1).std() > 1e-3
    # With the unit-norm decoder every row starts at norm 1 whatever was asked.
    paper = GatedTrainingSAE(build_gated_training_cfg(decoder_init_norm=None))
    assert paper.cfg.decoder_init_norm == 1.0
    torch.testing.assert_close(paper.W_dec.norm(dim=1), torch.ones(48))


def test_a_chosen_init_norm_is_kept_without_the_constraint_and_warned_about_with_it(
    caplog: pytest.LogCaptureFixture,
):
    april = GatedTrainingSAE(
        build_gated_training_cfg(recipe="april_update", decoder_init_norm=0.5)
    )
    torch.testing.assert_close(april.W_dec.norm(dim=1), torch.full((48,), 0.5))
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        build_gated_training_cfg()  # SAELens's default 0.1: replaced silently
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="sae_lens_gated"):
        build_gated_training_cfg(decoder_init_norm=0.5)
    assert "decoder_init_norm=0.5 is ignored" in caplog.text


def _builtin_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and "built-in GatedTrainingSAEConfig" in r.message
    ]


def test_a_builtin_config_object_in_the_runner_warns_once(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
):
    fields = tiny_runner_dict(tmp_path)
    fields.pop("sae")
    fields["logger"] = LoggingConfig(**fields["logger"])
    cfg = LanguageModelSAERunnerConfig(
        sae=BuiltinGatedTrainingSAEConfig(d_in=32, d_sae=64), **fields
    )
    with caplog.at_level(logging.WARNING):
        runner = LanguageModelSAETrainingRunner(
            cfg, override_model=tiny_model(), override_dataset=tiny_token_dataset()
        )
    assert type(runner.sae) is GatedTrainingSAE
    assert runner.sae.cfg.recipe == "paper"
    (message,) = _builtin_warnings(caplog)
    assert "recipe='april_update'" in message and "unregister()" in message


def test_plugin_configs_and_dict_configs_do_not_warn(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING):
        cfg = LanguageModelSAERunnerConfig.from_dict(tiny_runner_dict(tmp_path))
        LanguageModelSAETrainingRunner(
            cfg, override_model=tiny_model(), override_dataset=tiny_token_dataset()
        )
        GatedTrainingSAE(build_gated_training_cfg())
        GatedTrainingSAEConfig.from_dict(build_gated_training_cfg().to_dict())
    assert _builtin_warnings(caplog) == []

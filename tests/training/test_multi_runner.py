import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_gated import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.training import multi_runner
from sae_lens_gated.training.multi_runner import (
    CachedMultiSAETrainingRunner,
    check_memory,
    is_sweep,
    multi_config,
    multi_runner_config,
    sae_folder_name,
    split_sweep_arguments,
    sweep_sae_configs,
    training_bytes,
)
from tests.helpers import (
    tiny_model,
    tiny_runner_dict,
    tiny_token_dataset,
    write_activation_cache,
)


@pytest.mark.parametrize(
    ("args", "kept", "values"),
    [
        (
            ["--lr", "1e-3", "--l1_coefficient", "0.5", "1", "2", "--seed", "3"],
            ["--lr", "1e-3", "--l1_coefficient", "0.5", "--seed", "3"],
            {"--l1_coefficient": [0.5, 1.0, 2.0]},
        ),
        (
            ["--d_sae", "64", "128", "--l1_coefficient=0.25", "4"],
            ["--d_sae", "64", "--l1_coefficient", "0.25"],
            {"--d_sae": [64, 128], "--l1_coefficient": [0.25, 4.0]},
        ),
        (["--d_sae", "64"], ["--d_sae", "64"], {"--d_sae": [64]}),
        (["--lr", "1e-3"], ["--lr", "1e-3"], {}),
    ],
)
def test_sweep_values_are_taken_out_of_the_runner_arguments(
    args: list[str], kept: list[str], values: dict[str, list[float]]
):
    assert split_sweep_arguments(args) == (kept, values)
    assert is_sweep(values) == any(len(v) > 1 for v in values.values())
    for option, numbers in values.items():
        kind = int if option == "--d_sae" else float
        assert all(type(n) is kind for n in numbers)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--l1_coefficient", "1", "--l1_coefficient", "2"], "given twice"),
        (["--d_sae", "--lr", "1"], "--d_sae needs at least one value"),
        (["--d_sae", "64", "1.5"], "--d_sae: invalid int value: '1.5'"),
        (["--d_sae", "64", "0"], "--d_sae 0: a width must be at least 1"),
        (["--l1_coefficient", "1", "-2"], "--l1_coefficient -2: must be a finite"),
        (["--l1_coefficient", "1", "inf"], "--l1_coefficient inf: must be a finite"),
        (["--l1_coefficient", "x"], "invalid float value: 'x'"),
    ],
)
def test_bad_sweep_values_are_refused_by_name(args: list[str], message: str):
    with pytest.raises(ValueError, match=message):
        split_sweep_arguments(args)


def _sae(d_sae: int = 64, **kwargs: Any) -> GatedTrainingSAEConfig:
    return GatedTrainingSAEConfig(d_in=32, d_sae=d_sae, l1_coefficient=0.5, **kwargs)


def test_every_combination_gets_its_config_and_its_own_folder():
    base = _sae(recipe="april_update", l1_warm_up_steps=7)
    configs = sweep_sae_configs(
        base, {"--l1_coefficient": [0.5, 2.0], "--d_sae": [64, 96]}
    )
    assert list(configs) == [
        "d_sae-64_l1-0.5",
        "d_sae-96_l1-0.5",
        "d_sae-64_l1-2.0",
        "d_sae-96_l1-2.0",
    ]
    for name, cfg in configs.items():
        assert isinstance(cfg, GatedTrainingSAEConfig)
        assert sae_folder_name(cfg) == name
        # Everything but the swept fields is the base config's.
        assert (cfg.recipe, cfg.l1_warm_up_steps, cfg.d_in) == ("april_update", 7, 32)
        assert name == f"d_sae-{cfg.d_sae}_l1-{cfg.l1_coefficient!r}"
    assert base.d_sae == 64 and base.l1_coefficient == 0.5  # not modified


def test_two_sweep_saes_with_one_folder_are_refused():
    with pytest.raises(ValueError, match=r"same folder 'd_sae-64_l1-0.5'"):
        sweep_sae_configs(_sae(), {"--l1_coefficient": [0.5, 1.0, 0.5]})


def test_a_width_narrower_than_the_active_count_is_refused_by_its_values():
    topk = TopKTrainingSAEConfig(d_in=32, d_sae=128, k=100)
    with pytest.raises(ValueError, match=r"--d_sae 64: 64 features cannot hold k=100"):
        sweep_sae_configs(topk, {"--d_sae": [128, 64]})
    assert list(sweep_sae_configs(topk, {"--d_sae": [128, 100]})) == [
        "d_sae-128",
        "d_sae-100",
    ]


def test_training_memory_counts_both_matrices_with_gradients_and_adam_moments():
    assert training_bytes(_sae()) == 4 * 2 * 32 * 64 * 4  # float32
    assert training_bytes(_sae(dtype="bfloat16")) == 4 * 2 * 32 * 64 * 2


def test_a_sweep_that_cannot_fit_is_refused_with_both_sizes(
    monkeypatch: pytest.MonkeyPatch,
):
    configs: list[TrainingSAEConfig] = [_sae(d_sae=1 << 20), _sae(d_sae=1 << 19)]
    needed = 4 * 2 * 32 * (3 << 19) * 4  # 1.5 GiB
    monkeypatch.setattr(multi_runner, "available_bytes", lambda _device: needed - 1)
    with pytest.raises(ValueError, match=r"--d_sae 524288 1048576.*1\.5 GiB.*1\.5 GiB"):
        check_memory(configs, "cpu")
    monkeypatch.setattr(multi_runner, "available_bytes", lambda _device: needed)
    check_memory(configs, "cpu")
    monkeypatch.setattr(multi_runner, "available_bytes", lambda _device: None)
    check_memory(configs, "cpu")  # unknown: not refused


def test_the_cpu_reports_its_available_memory():
    free = multi_runner.available_bytes("cpu")
    assert free is not None and 2**20 < free < 2**50


def _runner_cfg(tmp_path: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(tmp_path, **overrides)
    )


def test_the_multi_config_carries_the_runner_settings(tmp_path: Path):
    cfg = _runner_cfg(
        tmp_path, lr=3e-3, context_size=16, seed=5, lr_scheduler_name="cosineannealing"
    )
    multi = multi_runner_config(cfg, {"--l1_coefficient": [0.5, 1.0]})
    assert list(multi.saes) == ["d_sae-128_l1-0.5", "d_sae-128_l1-1.0"]
    assert multi.hook_names_per_sae == dict.fromkeys(multi.saes, cfg.hook_name)
    for field in (
        "model_name",
        "lr",
        "lr_end",
        "lr_scheduler_name",
        "context_size",
        "seed",
        "training_tokens",
        "train_batch_size_tokens",
        "n_batches_in_buffer",
        "store_batch_size_prompts",
        "dead_feature_window",
        "output_path",
        "device",
        "dtype",
    ):
        assert getattr(multi, field) == getattr(cfg, field), field
    # The single config's checkpoint folder (from the CLI, with its run id): no second id.
    assert multi.checkpoint_path == cfg.checkpoint_path
    # The run is named after the sweep unless the user named it.
    assert multi.logger.run_name is not None and "N2" in multi.logger.run_name
    named = multi_runner_config(
        _runner_cfg(tmp_path, logger={"run_name": "mine"}),
        {"--l1_coefficient": [0.5, 1.0]},
        run_name_given=True,
    )
    assert named.logger.run_name == "mine"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("from_pretrained_path", "some/sae"),
        ("compile_sae", True),
    ],
)
def test_settings_the_multi_runner_lacks_are_refused(
    tmp_path: Path, setting: str, value: Any
):
    cfg = _runner_cfg(tmp_path, **{setting: value})
    with pytest.raises(ValueError, match=f"--{setting} is not supported in a sweep"):
        multi_runner_config(cfg, {"--l1_coefficient": [0.5, 1.0]})


def test_an_output_folder_that_is_not_empty_is_refused_untouched(tmp_path: Path):
    output = tmp_path / "output"
    output.mkdir()
    (output / "cfg.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--output_path: Refusing to write"):
        multi_runner_config(_runner_cfg(tmp_path), {"--d_sae": [64, 128]})
    assert [p.name for p in output.iterdir()] == ["cfg.json"]
    assert (output / "cfg.json").read_text() == "{}"


# ---- the multi runner from an activation cache --------------------------------------------


def test_the_multi_runner_trains_from_cached_activations_as_single_runs_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    cache = write_activation_cache(tmp_path / "cache", monkeypatch)
    settings: dict[str, Any] = {
        "sae": {"dtype": "float64"},
        "dtype": "float64",
        "use_cached_activations": True,
        "cached_activations_path": str(cache),
        "output_path": None,
    }
    cfg = _runner_cfg(tmp_path, **settings)
    start = GatedTrainingSAE(
        GatedTrainingSAEConfig(d_in=32, d_sae=128, l1_coefficient=0.5, dtype="float64")
    )
    initial = start.state_dict()

    def new_sae(sae_cfg: Any) -> GatedTrainingSAE:
        sae = GatedTrainingSAE(sae_cfg)
        sae.load_state_dict(initial)
        return sae

    sweep = sweep_sae_configs(cfg.sae, {"--l1_coefficient": [0.5, 3.0]})
    runner = CachedMultiSAETrainingRunner(
        multi_config(cfg, sweep),
        cfg,
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
        override_saes={name: new_sae(c) for name, c in sweep.items()},
    )
    torch.manual_seed(0)  # the mixing buffer's shuffles
    together = runner.run()
    for name, sae_cfg in sweep.items():
        single = LanguageModelSAETrainingRunner(
            dataclasses.replace(cfg, sae=sae_cfg),
            override_model=tiny_model(),
            override_dataset=tiny_token_dataset(),
            override_sae=new_sae(sae_cfg),
        )
        torch.manual_seed(0)
        alone = single.run()
        for key, value in alone.state_dict().items():
            assert not torch.equal(value, initial[key]), (name, key)
            torch.testing.assert_close(
                together[name].state_dict()[key], value, atol=1e-12, rtol=0
            )
    low, high = together.values()
    assert not torch.equal(low.W_dec, high.W_dec)  # two lambdas, two SAEs


def test_the_multi_runner_from_cached_activations_needs_a_cache_of_its_hook(
    tmp_path: Path,
):
    cfg = _runner_cfg(tmp_path)
    multi = multi_config(cfg, {"a": _sae()})
    with pytest.raises(ValueError, match="needs a config with use_cached_activations"):
        CachedMultiSAETrainingRunner(multi, cfg, override_model=tiny_model())

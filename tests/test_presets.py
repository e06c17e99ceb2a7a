from pathlib import Path

from sae_lens import LanguageModelSAERunnerConfig

from sae_lens_gated import GatedTrainingSAEConfig, paper_runner_overrides


def test_paper_runner_overrides_are_the_paper_values():
    overrides = paper_runner_overrides()
    assert overrides == {
        "adam_beta1": 0.0,
        "adam_beta2": 0.999,
        "lr": 3e-4,
        "lr_warm_up_steps": 1000,
        "lr_scheduler_name": "constant",
        "lr_decay_steps": 0,
        "train_batch_size_tokens": 4096,
    }
    overrides["lr"] = 1.0
    assert paper_runner_overrides()["lr"] == 3e-4  # a fresh dict each call


def test_paper_runner_overrides_build_a_runner_config_and_trainer_config(
    tmp_path: Path,
):
    cfg = LanguageModelSAERunnerConfig(
        sae=GatedTrainingSAEConfig(d_in=64, d_sae=256),
        checkpoint_path=str(tmp_path),
        n_batches_in_buffer=64,
        **paper_runner_overrides(),
    )
    trainer_cfg = cfg.to_sae_trainer_config()
    assert (trainer_cfg.adam_beta1, trainer_cfg.adam_beta2) == (0.0, 0.999)
    assert trainer_cfg.lr == 3e-4 and trainer_cfg.lr_warm_up_steps == 1000
    assert trainer_cfg.train_batch_size_samples == 4096

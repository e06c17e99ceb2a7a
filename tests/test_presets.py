import warnings
from pathlib import Path
from typing import Any

import pytest
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_gated import (
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    paper_runner_overrides,
)


def _paper_trainer(tmp_path: Path, steps: int) -> SAETrainer[Any, Any]:
    cfg = LanguageModelSAERunnerConfig(
        sae=GatedTrainingSAEConfig(d_in=16, d_sae=32),
        checkpoint_path=str(tmp_path),
        n_batches_in_buffer=64,
        training_tokens=4096 * steps,
        **paper_runner_overrides(),
    )
    sae = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=16, d_sae=32))
    return SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))


def test_paper_overrides_give_adam_betas_0_and_0999_and_batches_of_4096(
    tmp_path: Path,
):
    trainer = _paper_trainer(tmp_path, steps=1200)
    (group,) = trainer.optimizer.param_groups
    assert type(trainer.optimizer).__name__ == "Adam"
    assert group["betas"] == (0.0, 0.999)
    assert trainer.cfg.train_batch_size_samples == 4096
    assert trainer.cfg.total_training_steps == 1200


def test_paper_overrides_warm_the_learning_rate_up_over_1000_steps_then_hold_it(
    tmp_path: Path,
):
    trainer = _paper_trainer(tmp_path, steps=1200)
    lrs = []
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(1200):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.lr_scheduler.step()
    # Linear from 3e-4 / 1000 at the first step to 3e-4 at step 1000, constant after.
    for step in (0, 1, 499, 998, 999):
        assert lrs[step] == pytest.approx(3e-4 * (step + 1) / 1000, rel=1e-9), step
    assert all(lr == pytest.approx(3e-4, rel=1e-9) for lr in lrs[999:])
    assert all(a < b for a, b in zip(lrs[:999], lrs[1:1000]))


def test_paper_runner_overrides_are_a_fresh_dict_each_call():
    overrides = paper_runner_overrides()
    overrides["lr"] = 1.0
    assert paper_runner_overrides()["lr"] == 3e-4

"""SAELens's own LanguageModelSAETrainingRunner training the plugin, offline."""

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
)
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from sae_lens_gated import GatedSAE, GatedTrainingSAE
from tests.helpers import tiny_model, tiny_runner_dict, tiny_token_dataset


def _run(cfg: LanguageModelSAERunnerConfig[Any]) -> Any:
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=tiny_token_dataset()
    )
    assert type(runner.sae) is GatedTrainingSAE
    return runner.run()


def _max_norm_error(W_dec: torch.Tensor) -> float:
    return float((W_dec.detach().norm(dim=1) - 1).abs().max())


def test_runner_trains_the_plugin_from_a_dict_config_with_offline_wandb(
    tmp_path: Path, monkeypatch: Any
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            tmp_path,
            n_checkpoints=1,
            logger={
                "log_to_wandb": True,
                "wandb_log_frequency": 5,
                "eval_every_n_wandb_logs": 4,
            },
        )
    )
    sae = _run(cfg)
    assert _max_norm_error(sae.W_dec) <= 1e-5
    output = Path(cfg.output_path or "")
    saved = json.loads((output / "cfg.json").read_text())
    assert saved["architecture"] == "gated"
    assert saved["metadata"]["training_architecture_details"]["recipe"] == "paper"
    loaded = SAE.load_from_disk(output)
    assert type(loaded) is GatedSAE
    assert _max_norm_error(loaded.W_dec) <= 1e-5
    x = torch.randn(20, 32)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_runner_trains_the_plugin_from_cli_arguments(tmp_path: Path):
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
            "--l1_coefficient",
            "0.3",
            "--model_name",
            "tiny-random",
            "--hook_name",
            "blocks.1.hook_resid_post",
            "--is_dataset_tokenized",
            "true",
            "--streaming",
            "false",
            "--context_size",
            "16",
            "--prepend_bos",
            "false",
            "--training_tokens",
            str(64 * 20),
            "--train_batch_size_tokens",
            "64",
            "--store_batch_size_prompts",
            "8",
            "--n_batches_in_buffer",
            "8",
            "--n_eval_batches",
            "1",
            "--log_to_wandb",
            "false",
            "--checkpoint_path",
            str(tmp_path / "ckpt"),
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    sae = _run(cfg)
    assert sae.cfg.recipe == "april_update"
    norms = sae.W_dec.detach().norm(dim=1)
    assert (norms - 1).abs().max() > 0.5  # no constraint in april_update: rows near 0.1
    assert (tmp_path / "out" / "cfg.json").exists()


def test_unit_norm_holds_after_load_and_on_resume_from_a_checkpoint(tmp_path: Path):
    first = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(tmp_path, n_checkpoints=1, training_tokens=64 * 40)
    )
    _run(first)
    checkpoints = sorted(Path(first.checkpoint_path or "").iterdir())
    assert checkpoints
    mid = checkpoints[0]
    restored = GatedTrainingSAE.load_from_disk(mid)
    assert _max_norm_error(restored.W_dec) <= 1e-5

    resumed = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            tmp_path,
            training_tokens=64 * 40,
            resume_from_checkpoint=str(mid),
            output_path=str(tmp_path / "resumed"),
        )
    )
    sae = _run(resumed)
    assert _max_norm_error(sae.W_dec) <= 1e-5
    assert not torch.equal(sae.W_dec, restored.W_dec)

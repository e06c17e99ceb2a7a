"""SAELens's own LanguageModelSAETrainingRunner training the plugin, offline."""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
)
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from sae_lens_gated import GatedSAE, GatedTrainingSAE
from tests.helpers import (
    DEVICES,
    history_of,
    max_norm_error,
    tiny_model,
    tiny_runner_dict,
    tiny_token_dataset,
)


def _runner(cfg: LanguageModelSAERunnerConfig[Any]) -> Any:
    """SAELens's runner over the tiny model (on the config's device), training the plugin."""
    runner = LanguageModelSAETrainingRunner(
        cfg,
        override_model=tiny_model().to(cfg.device),
        override_dataset=tiny_token_dataset(),
    )
    assert type(runner.sae) is GatedTrainingSAE
    return runner


def _run(cfg: LanguageModelSAERunnerConfig[Any]) -> Any:
    return _runner(cfg).run()


@pytest.mark.usefixtures("offline_wandb")
def test_runner_trains_the_plugin_from_a_dict_config_with_offline_wandb(tmp_path: Path):
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
    assert max_norm_error(sae.W_dec) <= 1e-5
    output = Path(cfg.output_path or "")
    saved = json.loads((output / "cfg.json").read_text())
    assert saved["architecture"] == "gated"
    assert saved["metadata"]["training_architecture_details"]["recipe"] == "paper"
    loaded = SAE.load_from_disk(output)
    assert type(loaded) is GatedSAE
    assert max_norm_error(loaded.W_dec) <= 1e-5
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
    assert max_norm_error(restored.W_dec) <= 1e-5

    resumed = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            tmp_path,
            training_tokens=64 * 40,
            resume_from_checkpoint=str(mid),
            output_path=str(tmp_path / "resumed"),
        )
    )
    sae = _run(resumed)
    assert max_norm_error(sae.W_dec) <= 1e-5
    assert not torch.equal(sae.W_dec, restored.W_dec)


_RESAMPLING = {
    "resample_every": 20,
    "resample_window": 10,
    "resample_pool_size": 256,
    "resample_lr_warmup_steps": 5,
    "l1_coefficient": 20.0,  # with lr 1e-2, enough to kill a few features of the tiny model
}


@pytest.mark.usefixtures("offline_wandb")
def test_gated_metrics_reach_the_offline_wandb_run(
    tmp_path: Path, wandb_log_calls: list[dict[str, Any]]
):
    cfg = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            tmp_path,
            sae=_RESAMPLING,
            lr=1e-2,
            training_tokens=64 * 60,
            logger={
                "log_to_wandb": True,
                "wandb_log_frequency": 5,
                "eval_every_n_wandb_logs": 4,
            },
        )
    )
    sae = _run(cfg)
    assert (
        sae.conventions.resampler is not None
        and sae.conventions.resampler.n_events == 3
    )
    assert list(tmp_path.glob("wandb/offline-run-*"))
    history = history_of(wandb_log_calls)
    for key in (
        "losses/mse_loss",
        "losses/l1_loss",
        "losses/auxiliary_reconstruction_loss",
        "metrics/relative_reconstruction_bias",
        "metrics/gate_l0",
        "metrics/l0",
        "metrics/resampling/n_resampled",
        "metrics/resampling/n_events",
    ):
        values = [float(v) for v in history.get(key, [])]
        assert values and all(math.isfinite(v) for v in values), key
    assert len(history["losses/l1_loss"]) == 12  # every 5 steps
    # The resampling counters are logged at the trainer's logging steps, with its step.
    resampling_steps = [
        c["_step"] for c in wandb_log_calls if "metrics/resampling/n_events" in c
    ]
    loss_steps = [c["_step"] for c in wandb_log_calls if "losses/l1_loss" in c]
    assert resampling_steps == loss_steps
    assert history["metrics/resampling/n_events"][-1] == 3
    assert (
        history["metrics/resampling/n_resampled"][-1]
        == sae.conventions.resampler.n_resampled
    )
    assert sae.conventions.resampler.n_resampled > 0
    gammas = history["metrics/relative_reconstruction_bias"]
    assert all(math.isfinite(v) for v in gammas) and len(set(gammas)) > 1
    assert all(
        g >= l0 for g, l0 in zip(history["metrics/gate_l0"], history["metrics/l0"])
    )
    for key in (
        "weights/r_mag",
        "weights/b_gate",
        "weights/b_mag",
        "weights/W_dec_norms",
    ):
        histograms = history.get(key, [])
        assert len(histograms) == 3, key
        assert all(isinstance(h, wandb.Histogram) for h in histograms), key
        assert sum(histograms[-1].histogram) == 128, key


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_the_sae_that_float32_trains(tmp_path: Path, device: str):
    # SAELens's autocast=True, as users train on GPUs: bf16 forward passes over float32
    # weights. Same start, same stream: the two SAEs end up as sparse and as faithful.
    measured: dict[bool, tuple[float, float]] = {}
    held_out: torch.Tensor | None = None
    for autocast in (False, True):
        torch.manual_seed(0)
        cfg = LanguageModelSAERunnerConfig.from_dict(
            tiny_runner_dict(
                tmp_path / str(autocast),
                sae={"l1_coefficient": 0.3},
                lr=3e-3,
                training_tokens=64 * 300,
                autocast=autocast,
                device=device,
            )
        )
        runner = _runner(cfg)
        sae = runner.sae
        dtypes: set[torch.dtype] = set()
        forward = sae.training_forward_pass

        def recorded(step_input: Any, forward: Any = forward) -> Any:
            output = forward(step_input)
            dtypes.add(output.feature_acts.dtype)
            return output

        sae.training_forward_pass = recorded  # type: ignore[method-assign]
        runner.run()
        assert dtypes == {torch.bfloat16 if autocast else torch.float32}
        assert sae.W_dec.dtype == torch.float32 and sae.W_dec.device.type == device
        assert max_norm_error(sae.W_dec) <= 1e-5
        if held_out is None:
            store = runner.activations_store
            held_out = torch.cat([store.next_batch() for _ in range(8)])
        x = held_out
        with torch.no_grad():
            unexplained = (sae(x) - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(
                2
            ).sum(-1).mean()
            l0 = (sae.encode(x) > 0).float().sum(-1).mean()
        measured[autocast] = (float(unexplained), float(l0))
    (fvu, l0), (fvu_bf16, l0_bf16) = measured[False], measured[True]
    # On the CPU: 0.0374 and 0.0375 unexplained, L0 30.0 and 29.8.
    assert fvu < 0.1
    assert fvu_bf16 == pytest.approx(fvu, rel=0.05)
    assert l0_bf16 == pytest.approx(l0, rel=0.05)


def _resampled_in_checkpoint(checkpoint: Path) -> int:
    from safetensors.torch import load_file

    return int(
        load_file(checkpoint / "gated_resampler_state.safetensors")["n_resampled"]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_runner_resamples_and_resumes_from_a_checkpoint(tmp_path: Path, device: str):
    # On CUDA: the model, the activation store and the SAE on the GPU, the resampling
    # pool in host memory (the default), as users train.
    first = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            tmp_path,
            sae=_RESAMPLING,
            lr=1e-2,
            training_tokens=64 * 50,
            n_checkpoints=1,
            device=device,
        )
    )
    sae = _run(first)
    assert sae.W_dec.device.type == device
    assert sae.conventions.resampler is not None
    assert sae.conventions.resampler.n_events == 2
    assert sae.conventions.resampler.n_resampled > 0
    mid = sorted(
        Path(first.checkpoint_path or "").iterdir(), key=lambda p: int(p.name)
    )[0]
    assert (mid / "gated_resampler_state.safetensors").exists()

    resumed_cfg = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            tmp_path,
            sae=_RESAMPLING,
            lr=1e-2,
            training_tokens=64 * 70,
            resume_from_checkpoint=str(mid),
            output_path=str(tmp_path / "resumed"),
            device=device,
        )
    )
    resumed = _run(resumed_cfg)
    assert resumed.W_dec.device.type == device
    assert resumed.conventions.resampler is not None
    # 26 steps before the checkpoint, 44 after: events at steps 20, 40 and 60.
    assert resumed.conventions.resampler.completed_steps == 70
    assert resumed.conventions.resampler.n_events == 3
    assert resumed.conventions.resampler.n_resampled >= _resampled_in_checkpoint(mid)
    assert max_norm_error(resumed.W_dec) <= 1e-5

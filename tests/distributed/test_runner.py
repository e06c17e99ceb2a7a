"""SAELens's own runner on two gloo processes, with a tiny random TransformerLens model."""

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig
from safetensors.torch import load_file

import sae_lens_gated
from sae_lens_gated.cli import main
from sae_lens_gated.distributed import DistributedTrainingError, init_distributed
from sae_lens_gated.distributed.runner import (
    DistributedRunner,
    rank_dataset,
    trainer_estimates_normalization,
)
from tests.distributed.spawn import run_on_ranks
from tests.helpers import tiny_model, tiny_runner_dict, tiny_token_dataset

STEPS = 40  # tiny_runner_dict: 64 * 40 tokens in batches of 64
# n_checkpoints=1: SAELens checkpoints after the step that passes half of each process's
# 32 * 40 samples, the 21st.
CHECKPOINT = str(32 * 21)


def _runner(tmp: str, mode: str, **overrides: Any) -> DistributedRunner:
    ranks = init_distributed(timeout_s=60)
    cfg = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(Path(tmp), **overrides)
    )
    return DistributedRunner(
        cfg,
        mode=mode,  # type: ignore[arg-type]
        ranks=ranks,
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
    )


def _train_data_parallel(rank: int, tmp: str) -> dict[str, Any]:
    del rank
    runner = _runner(
        tmp,
        "data",
        n_checkpoints=1,
        sae={"normalize_activations": "expected_average_only_in"},
    )
    local_batches: list[torch.Tensor] = []

    def record(tensor: torch.Tensor, *, hook: Any) -> None:
        del hook
        local_batches.append(tensor.detach().clone())

    runner.sae.hook_sae_input.add_hook(record)
    sae = runner.run()
    return {
        "state": {k: v.clone() for k, v in sae.state_dict().items()},
        "first_batch": local_batches[0],
        "batch_rows": local_batches[0].shape[0],
        "steps": sae.conventions.resampler.completed_steps,  # type: ignore[union-attr]
    }


def test_data_parallel_runner_gives_each_process_its_own_tokens_and_one_sae(
    tmp_path: Path,
):
    out = run_on_ranks(_train_data_parallel, str(tmp_path))
    # Each process reads its half of the dataset: half of every batch of 64 tokens.
    assert out[0]["batch_rows"] == out[1]["batch_rows"] == 32
    assert not torch.equal(out[0]["first_batch"], out[1]["first_batch"])
    assert out[0]["steps"] == out[1]["steps"] == STEPS
    # Identical replicas, also after folding the normalization factor into the weights:
    # both processes estimated it from the same global batches.
    for name, value in out[0]["state"].items():
        assert torch.equal(out[1]["state"][name], value), name

    output = tmp_path / "output"
    sae_lens_gated.unregister()
    try:
        vanilla = SAE.load_from_disk(output)
    finally:
        sae_lens_gated.register()
    for name, value in out[0]["state"].items():
        torch.testing.assert_close(vanilla.state_dict()[name], value, rtol=0, atol=0)
    saved = json.loads((output / "runner_cfg.json").read_text())
    assert saved["train_batch_size_tokens"] == 64  # the whole run's, not a process's
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [CHECKPOINT]
    assert (checkpoints / CHECKPOINT / "trainer_state.pt").exists()


def _train_latent(rank: int, tmp: str, resume: str | None) -> dict[str, Any]:
    del rank
    overrides: dict[str, Any] = {"n_checkpoints": 1}
    if resume is not None:
        overrides["resume_from_checkpoint"] = resume
        overrides["output_path"] = str(Path(tmp) / "resumed")
    runner = _runner(tmp, "latent", **overrides)
    sae = runner.run()
    return {
        "b_dec": sae.b_dec.detach().clone(),
        "d_sae": sae.cfg.d_sae,
        "steps": sae.conventions.resampler.completed_steps,  # type: ignore[union-attr]
        "l0": sae.cfg.metadata.l0,
    }


def test_latent_sharded_runner_saves_one_ordinary_sae_and_resumes(tmp_path: Path):
    out = run_on_ranks(_train_latent, str(tmp_path), None)
    assert out[0]["d_sae"] == out[1]["d_sae"] == 64
    assert torch.equal(out[0]["b_dec"], out[1]["b_dec"])
    assert out[0]["steps"] == STEPS

    output = tmp_path / "output"
    cfg = json.loads((output / "cfg.json").read_text())
    assert cfg["d_sae"] == 128
    # The whole SAE's mean L0: the sum of the two shares'.
    assert cfg["metadata"]["l0"] == pytest.approx(out[0]["l0"] + out[1]["l0"])
    assert load_file(output / "sparsity.safetensors")["sparsity"].shape == (128,)
    sae_lens_gated.unregister()
    try:
        vanilla = SAE.load_from_disk(output)
    finally:
        sae_lens_gated.register()
    assert vanilla.W_enc.shape == (32, 128)

    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [CHECKPOINT, "rank1"]
    first, second = checkpoints / CHECKPOINT, checkpoints / "rank1" / CHECKPOINT
    assert json.loads((first / "cfg.json").read_text())["d_sae"] == 128
    assert load_file(first / "sparsity.safetensors")["sparsity"].shape == (128,)
    # The second process's part: its optimizer state, data position, and its own
    # resampler and sparse-step policy states.
    assert sorted(p.name for p in second.iterdir()) == [
        "activation_scaler.json",
        "activations_store_state.safetensors",
        "gated_resampler_state.safetensors",
        "gated_sparse_step_state.json",
        "runner_cfg.json",
        "sparsity.safetensors",
        "trainer_state.pt",
    ]

    resumed = run_on_ranks(_train_latent, str(tmp_path), str(first))
    # The resampler's step count came back from the checkpoint: it ran all STEPS.
    assert resumed[0]["steps"] == resumed[1]["steps"] == STEPS
    assert torch.equal(resumed[0]["b_dec"], resumed[1]["b_dec"])
    assert (tmp_path / "resumed" / "sae_weights.safetensors").exists()


def _crash_while_saving(rank: int, tmp: str) -> Any:
    runner = _runner(tmp, "latent", n_checkpoints=1)
    if rank == 1:
        # Crash once the first process has written the whole SAE and its trainer state,
        # before the parts of the checkpoint are complete.
        runner.save_checkpoint = lambda checkpoint_path: os._exit(1)  # type: ignore[method-assign]  # noqa: ARG005
    start = time.monotonic()
    try:
        runner.run()
    except DistributedTrainingError as error:
        return str(error), time.monotonic() - start
    return None


def test_a_crash_during_a_checkpoint_leaves_no_partial_checkpoint(tmp_path: Path):
    out = run_on_ranks(_crash_while_saving, str(tmp_path), expect_errors=True)
    assert out[1] is None  # crashed
    message, seconds = out[0]
    assert message.startswith("gathering the feature sparsity failed on rank 0 of 2")
    assert seconds < 30  # the peer's closed connection, not the 60 s timeout
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(
        p for p in checkpoints.rglob("*") if p.is_file()
    )
    assert not (tmp_path / "output").exists()


def _cli(rank: int, tmp: str, dataset: str, mode: str) -> int:
    del rank
    import sae_lens.llm_sae_training_runner as saelens_runner

    # The runner loads its model by name; the tiny random model stands in offline.
    saelens_runner.load_model = lambda *args, **kwargs: tiny_model()  # type: ignore[assignment]  # noqa: ARG005
    return main(
        [
            "train",
            "--distributed",
            mode,
            "--architecture",
            "gated",
            "--d_in",
            "32",
            "--d_sae",
            "64",
            "--model_name",
            "tiny-random",
            "--hook_name",
            "blocks.0.hook_resid_post",
            "--dataset_path",
            dataset,
            "--is_dataset_tokenized",
            "true",
            "--streaming",
            "false",
            "--context_size",
            "16",
            "--prepend_bos",
            "false",
            "--training_tokens",
            str(64 * 10),
            "--train_batch_size_tokens",
            "64",
            "--store_batch_size_prompts",
            "8",
            "--n_batches_in_buffer",
            "8",
            "--log_to_wandb",
            "false",
            "--checkpoint_path",
            str(Path(tmp) / "ckpt"),
            "--output_path",
            str(Path(tmp) / f"out-{mode}"),
        ]
    )


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_train_command_under_torchrun_trains_one_sae_on_every_process(
    tmp_path: Path, mode: str
):
    dataset = tmp_path / "tokens"
    dataset.mkdir()
    tiny_token_dataset().to_parquet(str(dataset / "train.parquet"))
    assert run_on_ranks(_cli, str(tmp_path), str(dataset), mode) == {0: 0, 1: 0}
    assert (
        json.loads((tmp_path / f"out-{mode}" / "cfg.json").read_text())["d_sae"] == 64
    )


def test_train_command_in_one_process_is_saelens_runner(
    monkeypatch: pytest.MonkeyPatch,
):
    import sae_lens_gated.distributed.runner as plugin_runner

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runs: list[Any] = []

    class Runner:
        def __init__(self, cfg: Any) -> None:
            runs.append(cfg)

        def run(self) -> None:
            runs.append("ran")

    monkeypatch.setattr(plugin_runner, "LanguageModelSAETrainingRunner", Runner)
    assert main(["train", "--architecture", "gated", "--d_sae", "64"]) == 0
    cfg, ran = runs
    assert ran == "ran"
    assert type(cfg.sae).__name__ == "GatedTrainingSAEConfig" and cfg.sae.d_sae == 64


def test_bad_distributed_options_are_usage_errors(capsys: pytest.CaptureFixture[str]):
    code = main(["train", "--distributed", "tensor", "--architecture", "gated"])
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("sae-lens-gated train: error: ")
    assert "invalid choice: 'tensor'" in line
    code = main(["train", "--distributed-timeout", "0", "--architecture", "gated"])
    assert code == 2
    assert "--distributed-timeout must be positive" in capsys.readouterr().err


def _dataset_share(rank: int) -> list[list[int]]:
    del rank
    ranks = init_distributed(timeout_s=60)
    cfg = LanguageModelSAERunnerConfig.from_dict(tiny_runner_dict(Path("unused")))
    share = rank_dataset(cfg, ranks, tiny_token_dataset(n_rows=10))
    return [row["tokens"] for row in share]  # type: ignore[index]


def test_each_process_reads_its_own_contiguous_block_of_the_dataset():
    rows = tiny_token_dataset(n_rows=10)["tokens"]
    out = run_on_ranks(_dataset_share)
    assert out[0] == rows[:5]
    assert out[1] == rows[5:]


def test_the_normalization_batches_are_gathered_when_saelens_estimates_it(
    monkeypatch: pytest.MonkeyPatch,
):
    import sae_lens

    cfg = LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            Path("unused"), sae={"normalize_activations": "expected_average_only_in"}
        )
    )
    assert trainer_estimates_normalization(cfg)
    cfg.resume_from_checkpoint = "a checkpoint"
    monkeypatch.setattr(sae_lens, "__version__", "6.54.12")
    assert not trainer_estimates_normalization(cfg)  # keeps the checkpoint's estimate
    monkeypatch.setattr(sae_lens, "__version__", "6.50.0")
    assert trainer_estimates_normalization(cfg)  # estimates again
    cfg.sae.normalize_activations = "none"
    assert not trainer_estimates_normalization(cfg)

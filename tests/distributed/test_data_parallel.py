"""Data-parallel training on two gloo processes against one process with the global batch."""

from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_gated.distributed import (
    DistributedTrainingError,
    enable_data_parallel,
    init_distributed,
)
from sae_lens_gated.training.batch_guard import NonFiniteBatchError
from tests.distributed.common import (
    BATCH,
    CHECKPOINT,
    EVENT,
    SETTINGS,
    STEPS,
    Rows,
    assert_states_close,
    fresh_sae,
    global_batches,
    pool_of,
    reference_run,
    state_of,
    trainer_for,
)
from tests.distributed.spawn import run_on_ranks
from tests.helpers import CUDA

HALF = BATCH // 2


def _replica(rank: int, **overrides: Any) -> tuple[Any, Rows]:
    ranks = init_distributed(timeout_s=60)
    sae = fresh_sae(**overrides)
    if rank == 1:  # the first process's weights win: start this one elsewhere
        with torch.no_grad():
            sae.W_enc.add_(1.0)
    enable_data_parallel(sae, ranks)
    rows = slice(rank * HALF, (rank + 1) * HALF)
    return sae, Rows(global_batches(), rows)


def _train(rank: int, overrides: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    sae, data = _replica(rank, **overrides)
    trainer_for(sae, data, HALF).fit()
    resampler = sae.conventions.resampler
    assert resampler is not None and resampler.last_event is not None
    result: dict[str, Any] = {
        "device": sae.W_dec.device.type,
        "state": state_of(sae),
        "resampled": resampler.last_event.resampled.cpu(),
    }

    # The same run stopped at CHECKPOINT and resumed by both processes from the first
    # process's checkpoint. Only the first process keeps the pool.
    sae, data = _replica(rank, **overrides)
    trainer = trainer_for(sae, data, HALF, steps=CHECKPOINT)
    trainer.fit()
    result["pool_at_checkpoint"] = pool_of(sae)
    folder = Path(checkpoint)
    if rank == 0:
        trainer.cfg.checkpoint_path = str(folder.parent)
        trainer.save_checkpoint(folder.name)
    sae.conventions.parallel.ranks.barrier("waiting for the checkpoint")  # type: ignore[union-attr]
    sae, _ = _replica(rank, **overrides)
    data = Rows(
        global_batches(), slice(rank * HALF, (rank + 1) * HALF), skip=CHECKPOINT
    )
    trainer = trainer_for(sae, data, HALF)
    trainer.load_trainer_state(folder)
    sae.load_weights_from_checkpoint(folder)
    result["pool_resumed"] = pool_of(sae)
    trainer.fit()
    result["resumed"] = state_of(sae)
    return result


@pytest.mark.parametrize(
    ("clip_grad_norm", "device"),
    [
        (True, "cpu"),
        (False, "cpu"),
        # Both processes on the one GPU, their collectives through gloo on the CPU.
        pytest.param(False, "cuda", marks=CUDA),
    ],
)
def test_two_processes_with_half_batches_match_one_process_with_the_batch(
    tmp_path: Path, clip_grad_norm: bool, device: str
):
    reference, max_grad_norm = reference_run(
        clip_grad_norm=clip_grad_norm, device=device
    )
    # SAELens clips to norm 1: above it, clipping (and, without clip_grad_norm, the clip
    # undo, whose hooks must run after the averaging ones) changes the steps.
    assert max_grad_norm > 2.0
    resampler = reference.conventions.resampler
    assert resampler is not None and resampler.last_event is not None
    assert resampler.last_event.step == EVENT
    expected_resampled = resampler.last_event.resampled.cpu()
    assert expected_resampled.numel() >= 5

    out = run_on_ranks(
        _train,
        {"clip_grad_norm": clip_grad_norm, "device": device},
        str(tmp_path / "checkpoints" / str(CHECKPOINT)),
        device=device,
    )

    expected = state_of(reference)
    pool_size = SETTINGS["resample_pool_size"]
    assert pool_size > 2 * BATCH
    for key in ("pool_at_checkpoint", "pool_resumed"):  # 2 steps of BATCH rows pooled
        assert out[0][key] == (2 * BATCH, pool_size), key
        assert out[1][key] == (2 * BATCH, None), key
    for rank in (0, 1):
        assert out[rank]["device"] == device
        assert_states_close(out[rank]["state"], expected)
        assert torch.equal(out[rank]["resampled"], expected_resampled)
        assert_states_close(out[rank]["resumed"], expected)
    for name, value in out[0]["state"].items():  # the replicas are bit-identical
        assert torch.equal(out[1]["state"][name], value), name
        assert torch.equal(out[1]["resumed"][name], out[0]["resumed"][name]), name


def _bad_batch_on_one_rank(rank: int) -> dict[str, Any]:
    sae, data = _replica(rank)
    trainer = trainer_for(sae, data, HALF, steps=5)
    for _ in range(2):
        trainer.step(next(data))
    before = state_of(sae)
    batch = next(data)
    if rank == 1:
        batch[0, 0] = float("nan")
    try:
        trainer.step(batch)
    except (NonFiniteBatchError, DistributedTrainingError) as error:
        return {
            "error": (type(error).__name__, str(error)),
            "before": before,
            "after": state_of(sae),
        }
    return {"error": None}


def test_a_non_finite_batch_on_one_process_stops_every_process_before_any_update():
    out = run_on_ranks(_bad_batch_on_one_rank)
    # On the CPU the batch guard refuses the batch in the forward pass; the other process
    # then finds no partner for the gradient average.
    assert out[1]["error"][0] == "NonFiniteBatchError"
    assert "1 NaN" in out[1]["error"][1]
    assert out[0]["error"][0] == "DistributedTrainingError"
    assert "averaging the gradient of" in out[0]["error"][1]
    for rank in (0, 1):
        for name, value in out[rank]["before"].items():
            assert torch.equal(out[rank]["after"][name], value), name


def _steps_of_rank(rank: int) -> int:
    sae, data = _replica(rank)
    trainer = trainer_for(sae, data, HALF, steps=STEPS)
    trainer.fit()
    return trainer.n_training_steps


def test_each_process_counts_the_global_steps():
    # Each process sees STEPS batches of HALF rows: SAELens's schedules run in steps.
    assert run_on_ranks(_steps_of_rank) == {0: STEPS, 1: STEPS}

"""Latent-sharded training on two gloo processes against one process holding every feature."""

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sae_lens import SAE

import sae_lens_gated
from sae_lens_gated.distributed import init_distributed, shard_latents
from sae_lens_gated.distributed.latent_sharded import (
    LatentShardedResampling,
    check_shardable,
    clip_grad_norm_across_shards,
    is_rank_checkpoint_part,
    rank_checkpoint_folder,
    whole_checkpoint_folder,
)
from sae_lens_gated.training.conventions import RESAMPLER_STATE_FILENAME
from sae_lens_gated.training.sparse_policy import SPARSE_POLICY_STATE_FILENAME
from tests.distributed.common import (
    BATCH,
    CHECKPOINT,
    SETTINGS,
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
from tests.helpers import CUDA, DEVICES, build_gated_training_cfg, step_input

HALF_FEATURES = SETTINGS["d_sae"] // 2


def _shard(rank: int, gather_batch: bool = False, **overrides: Any) -> Any:
    ranks = init_distributed(timeout_s=60)
    whole = fresh_sae(**overrides)
    return shard_latents(
        whole if rank == 0 else None, whole.cfg, ranks, gather_batch=gather_batch
    )


def _data(rank: int, gather_batch: bool, skip: int = 0) -> tuple[Rows, int]:
    # gather_batch: each process reads its half of the rows, the SAE gathers them.
    rows = BATCH // 2 if gather_batch else BATCH
    start = rank * rows if gather_batch else 0
    return Rows(global_batches(), slice(start, start + rows), skip=skip), rows


def _train(
    rank: int, overrides: dict[str, Any], gather_batch: bool, folder: str
) -> dict[str, Any]:
    sae = _shard(rank, gather_batch, **overrides)
    data, rows = _data(rank, gather_batch)
    trainer = trainer_for(sae, data, rows)
    trainer.fit()
    resampler = sae.conventions.resampler
    assert resampler is not None and resampler.last_event is not None
    result: dict[str, Any] = {
        "device": sae.W_dec.device.type,
        "whole": sae.gather_state_dict(),
        "local": state_of(sae),
        "d_sae": sae.cfg.d_sae,
        "firing_stats": tuple(trainer.act_freq_scores.shape),
        "resampled": resampler.last_event.resampled.cpu(),
    }
    sae.save_inference_model(Path(folder) / "inference")

    # Stopped at CHECKPOINT and resumed: the whole SAE and the resampler's state (its
    # pool on the first process only) from the first process's folder, each process's
    # optimizer state from its own.
    sae = _shard(rank, gather_batch, **overrides)
    data, rows = _data(rank, gather_batch)
    trainer = trainer_for(sae, data, rows, steps=CHECKPOINT)
    trainer.fit()
    checkpoint = rank_checkpoint_folder(
        Path(folder) / "checkpoints" / str(CHECKPOINT), rank
    )
    trainer.cfg.checkpoint_path = str(checkpoint.parent)
    trainer.save_checkpoint(checkpoint.name)
    result["saved_local"] = state_of(sae)
    result["pool_at_checkpoint"] = pool_of(sae)
    result["saved_policy"] = sae.conventions.sparse_policy.state_dict()

    sae = _shard(rank, gather_batch, **overrides)
    sae.load_weights_from_checkpoint(
        checkpoint
    )  # this process's part of the checkpoint
    result["loaded_local"] = state_of(sae)
    result["loaded_policy"] = sae.conventions.sparse_policy.state_dict()
    data, rows = _data(rank, gather_batch, skip=CHECKPOINT)
    trainer = trainer_for(sae, data, rows)
    trainer.load_trainer_state(checkpoint)
    result["pool_resumed"] = pool_of(sae)
    trainer.fit()
    result["resumed"] = sae.gather_state_dict()
    # The kind of step the shards took: sparse activations of this process's rows.
    data, _ = _data(rank, gather_batch)
    result["planned_sparse"] = sae.conventions.sparse_step()
    step = sae.training_forward_pass(step_input(next(data).to(sae.W_dec.device)))
    result["sparse_acts"] = step.feature_acts.is_sparse
    result["acts_shape"] = tuple(step.feature_acts.shape)

    # A checkpoint from before each process saved its own state: the first process's.
    if rank == 1:
        for name in (RESAMPLER_STATE_FILENAME, SPARSE_POLICY_STATE_FILENAME):
            (checkpoint / name).unlink(missing_ok=True)  # none with "always"
    sae = _shard(rank, gather_batch, **overrides)
    sae.load_weights_from_checkpoint(checkpoint)
    result["older_checkpoint_policy"] = sae.conventions.sparse_policy.state_dict()
    return result


@pytest.mark.parametrize(
    ("clip_grad_norm", "gather_batch", "sparse_step", "device"),
    [
        (True, False, "auto", "cpu"),
        (False, True, "auto", "cpu"),
        (True, True, "always", "cpu"),
        # Both processes on the one GPU, their collectives through gloo on the CPU.
        pytest.param(True, True, "auto", "cuda", marks=CUDA),
    ],
)
def test_two_shards_match_one_process_holding_every_feature(
    tmp_path: Path,
    clip_grad_norm: bool,
    gather_batch: bool,
    sparse_step: str,
    device: str,
):
    # "always": sparse steps on both shards against dense steps in one process.
    reference_step = "never" if sparse_step == "always" else sparse_step
    reference, max_grad_norm = reference_run(
        clip_grad_norm=clip_grad_norm, sparse_step=reference_step, device=device
    )
    # Above norm 1 SAELens clips; each shard alone would clip by its own smaller norm.
    assert max_grad_norm > 2.0
    assert reference.conventions.resampler is not None
    event = reference.conventions.resampler.last_event
    assert event is not None and event.resampled.numel() >= 5
    # Both shards lose features at the event, so each rewrites some of its own.
    assert (event.resampled < HALF_FEATURES).any()
    assert (event.resampled >= HALF_FEATURES).any()

    out = run_on_ranks(
        _train,
        {
            "clip_grad_norm": clip_grad_norm,
            "sparse_step": sparse_step,
            "device": device,
        },
        gather_batch,
        str(tmp_path),
        device=device,
    )

    expected = state_of(reference)
    # With "auto" each shard's policy saw every step, and its own gates' density.
    assert out[1]["older_checkpoint_policy"] == out[0]["saved_policy"]
    for rank in (0, 1):
        steps = 0 if sparse_step == "always" else CHECKPOINT
        assert out[rank]["saved_policy"]["steps"] == steps
    if sparse_step == "auto":
        assert out[0]["saved_policy"]["density"] != out[1]["saved_policy"]["density"]
    pool_size = SETTINGS["resample_pool_size"]
    for key in ("pool_at_checkpoint", "pool_resumed"):  # 2 global batches pooled
        assert out[0][key] == (2 * BATCH, pool_size), key
        assert out[1][key] == (2 * BATCH, None), key
    assert_states_close(out[0]["whole"], expected)
    assert_states_close(out[0]["resumed"], expected)
    assert out[1]["whole"] is None
    for rank in (0, 1):
        assert out[rank]["device"] == device
        # Each shard takes the kind of step its own policy chose: with "auto", timed on
        # this machine once few of its gates were open (on the first shard, by the end).
        assert out[rank]["sparse_acts"] is out[rank]["planned_sparse"]
        if sparse_step == "always":
            assert out[rank]["sparse_acts"]
        # Each shard's policy resumes from its own state, as it was at the checkpoint.
        assert out[rank]["loaded_policy"] == out[rank]["saved_policy"]
        rows = BATCH // 2 if gather_batch else BATCH
        assert out[rank]["acts_shape"] == (rows, HALF_FEATURES)
        assert out[rank]["d_sae"] == HALF_FEATURES
        assert out[rank]["firing_stats"] == (HALF_FEATURES,)
        assert torch.equal(out[rank]["resampled"], event.resampled.cpu())
        shard = slice(rank * HALF_FEATURES, (rank + 1) * HALF_FEATURES)
        local = out[rank]["local"]
        assert torch.equal(local["W_enc"], out[0]["whole"]["W_enc"][:, shard])
        assert torch.equal(local["W_dec"], out[0]["whole"]["W_dec"][shard])
        assert torch.equal(local["b_dec"], out[0]["whole"]["b_dec"])
        for name, value in out[rank]["saved_local"].items():
            assert torch.equal(out[rank]["loaded_local"][name], value), name

    # One ordinary SAELens folder, which SAELens alone loads at the whole width.
    folder = tmp_path / "inference"
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert json.loads((folder / "cfg.json").read_text())["d_sae"] == SETTINGS["d_sae"]
    sae_lens_gated.unregister()
    try:
        vanilla = SAE.load_from_disk(folder, dtype="float64")
        assert type(vanilla).__module__.startswith("sae_lens.")
    finally:
        sae_lens_gated.register()
    x = torch.randn(32, SETTINGS["d_in"], dtype=torch.float64)
    with torch.no_grad():
        expected_out = reference(x.to(device)).cpu()
        torch.testing.assert_close(vanilla(x), expected_out, rtol=0, atol=1e-10)
    assert not (
        tmp_path / "checkpoints" / "rank1" / str(CHECKPOINT) / "sae_weights.safetensors"
    ).exists()
    assert (
        tmp_path / "checkpoints" / "rank1" / str(CHECKPOINT) / "trainer_state.pt"
    ).exists()


def _train_with_hook(rank: int) -> dict[str, torch.Tensor] | None:
    sae = _shard(rank)
    # A hook on the activations makes the shards decode outside the fused function.
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 1.0)  # type: ignore[misc]  # noqa: ARG005
    data, rows = _data(rank, gather_batch=False)
    trainer_for(sae, data, rows).fit()
    return sae.gather_state_dict()


def test_hooked_shards_decode_outside_the_fused_function_and_still_match():
    reference, _ = reference_run()
    out = run_on_ranks(_train_with_hook)
    assert out[0] is not None
    assert_states_close(out[0], state_of(reference))


def _load_wrong_width(rank: int, folder: str) -> str:
    ranks = init_distributed(timeout_s=60)
    cfg = build_gated_training_cfg(**{**SETTINGS, "d_sae": 64})
    sae = shard_latents(fresh_sae(d_sae=64) if rank == 0 else None, cfg, ranks)
    try:
        sae.load_weights_from_checkpoint(folder)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_loading_a_checkpoint_of_another_width_is_refused(tmp_path: Path):
    fresh_sae().save_model(tmp_path)
    messages = run_on_ranks(_load_wrong_width, str(tmp_path))
    for message in messages.values():
        assert "has 128 features, expected d_sae=64" in message


def _clip(rank: int) -> dict[str, Any]:
    ranks = init_distributed(timeout_s=60)
    # Whole gradient: sharded (3, 0) | (0, 4) and replicated (12): norm 13.
    sharded = torch.nn.Parameter(torch.zeros(2))
    sharded.grad = torch.tensor([3.0, 0.0]) if rank == 0 else torch.tensor([0.0, 4.0])
    replicated = torch.nn.Parameter(torch.zeros(1))
    replicated.grad = torch.tensor([12.0])
    norm = clip_grad_norm_across_shards([sharded], [replicated], ranks, max_norm=1.0)
    return {"norm": float(norm), "sharded": sharded.grad, "replicated": replicated.grad}


def test_clipping_uses_the_whole_models_norm_counting_replicated_gradients_once():
    out = run_on_ranks(_clip)
    coefficient = 1.0 / (13.0 + 1e-6)
    for rank, expected in ((0, [3.0, 0.0]), (1, [0.0, 4.0])):
        assert out[rank]["norm"] == pytest.approx(13.0)
        torch.testing.assert_close(
            out[rank]["sharded"], torch.tensor(expected) * coefficient
        )
        torch.testing.assert_close(
            out[rank]["replicated"], torch.tensor([12.0]) * coefficient
        )


class _OtherShard:
    """Ranks whose all-reduce adds a second process's statistics: its two features,
    norms 5 and 6, are both alive."""

    def all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        del what
        other = torch.tensor([11.0, 2.0, 11.0, 2.0], dtype=tensor.dtype)
        return tensor.add_(other.to(tensor.device))


@pytest.mark.parametrize("device", DEVICES)
def test_the_mean_alive_norm_is_over_every_shard(device: str):
    collectives = LatentShardedResampling(_OtherShard(), slice(0, 4))  # type: ignore[arg-type]
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    alive = torch.tensor([True, False, True, False], device=device)
    # (1 + 3 + 5 + 6) / 4 alive features.
    mean = collectives.masked_mean(values, alive)
    assert mean.device == values.device and mean.dtype == torch.float32
    assert float(mean) == 3.75
    # None alive here: the other process's, (5 + 6) / 2.
    none_here = collectives.masked_mean(values, torch.zeros_like(alive))
    assert float(none_here) == 5.5

    # None alive anywhere: the mean of all, (1 + 2 + 3 + 4 + 11) / 6.
    class NoneAliveThere(_OtherShard):
        def all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
            del what
            other = torch.tensor([0.0, 0.0, 11.0, 2.0], dtype=tensor.dtype)
            return tensor.add_(other.to(tensor.device))

    collectives = LatentShardedResampling(NoneAliveThere(), slice(0, 4))  # type: ignore[arg-type]
    nothing = collectives.masked_mean(values, torch.zeros_like(alive))
    assert float(nothing) == pytest.approx(21.0 / 6)


def test_the_mean_alive_norm_stays_on_the_values_device():
    # The meta device stands in for a GPU on this CPU: a statistic made on the CPU
    # cannot be stacked with the others there, as on CUDA.
    collectives = LatentShardedResampling(_OtherShard(), slice(0, 4))  # type: ignore[arg-type]
    values = torch.ones(4, device="meta")
    mean = collectives.masked_mean(
        values, torch.ones(4, dtype=torch.bool, device="meta")
    )
    assert mean.device.type == "meta"


def test_checkpoint_folders_of_each_process():
    first = Path("run") / "checkpoints" / "4096"
    assert rank_checkpoint_folder(first, 0) == first
    assert rank_checkpoint_folder(first, 3) == Path("run/checkpoints/rank3/4096")
    for rank in (0, 3):
        folder = rank_checkpoint_folder(first, rank)
        assert whole_checkpoint_folder(folder, rank) == first
        assert is_rank_checkpoint_part(folder, rank)
    # Staged before being renamed into place, as the distributed runner does.
    assert is_rank_checkpoint_part(Path("run/checkpoints/rank3/.incomplete/4096"), 3)
    # Process 3 saving into the first process's folder, or another's part, is not its part.
    assert not is_rank_checkpoint_part(first, 3)
    assert not is_rank_checkpoint_part(rank_checkpoint_folder(first, 2), 3)


@pytest.mark.parametrize(
    ("kwargs", "world", "message"),
    [
        ({"d_sae": 100}, 3, "d_sae=100 is not divisible by the 3 processes"),
        ({"architecture_untied": True}, 2, "supports architecture 'gated'"),
    ],
)
def test_unshardable_configs_are_refused(
    kwargs: dict[str, Any], world: int, message: str
):
    if kwargs.pop("architecture_untied", False):
        cfg: Any = sae_lens_gated.GatedUntiedTrainingSAEConfig(d_in=16, d_sae=48)
    else:
        cfg = build_gated_training_cfg(**kwargs)
    with pytest.raises(ValueError, match=message):
        check_shardable(cfg, SimpleNamespace(world_size=world))  # type: ignore[arg-type]

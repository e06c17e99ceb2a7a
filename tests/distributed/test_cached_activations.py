"""Data-parallel and latent-sharded training from SAELens's activation cache, on two gloo
processes."""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

from sae_lens_gated import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.distributed import init_distributed
from sae_lens_gated.distributed.runner import DistributedRunner, rank_cache_rows
from tests.distributed.spawn import run_on_ranks
from tests.helpers import (
    tiny_model,
    tiny_runner_dict,
    tiny_token_dataset,
    write_activation_cache,
)

N_ROWS = 400  # the cache: the tiny model's activations over 400 sequences of 16 tokens


@pytest.fixture
def activation_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return write_activation_cache(tmp_path / "cache", monkeypatch, n_rows=N_ROWS)


def _cfg(tmp: str, cache: str, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    return LanguageModelSAERunnerConfig.from_dict(
        tiny_runner_dict(
            Path(tmp),
            use_cached_activations=True,
            cached_activations_path=cache,
            **overrides,
        )
    )


def test_cached_activations_rows_are_dealt_out_in_whole_batches_in_turn():
    assert rank_cache_rows(10, 2, 0, 2) == [0, 1, 4, 5]
    assert rank_cache_rows(10, 2, 1, 2) == [2, 3, 6, 7]  # rows 8, 9: one batch, 2 ranks
    assert rank_cache_rows(10, 3, 0, 1) == list(range(9))  # as SAELens reads it alone
    for world in (1, 2, 3):
        shares = [rank_cache_rows(100, 4, r, world) for r in range(world)]
        every = sorted(row for share in shares for row in share)
        assert every == list(range(len(every))) and len(every) > 100 - 4 * world


def _rows_read_in_an_epoch(rank: int, tmp: str, cache: str, mode: str) -> list[int]:
    """The cache rows this process's store reads until SAELens's epoch ends, identified by
    their token ids (the rows of the tiny token dataset)."""
    del rank
    runner = DistributedRunner(
        _cfg(tmp, cache, store_batch_size_prompts=4),
        mode=mode,  # type: ignore[arg-type]
        ranks=init_distributed(timeout_s=60),
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
    )
    token_rows = {
        tuple(row): i for i, row in enumerate(tiny_token_dataset(N_ROWS)["tokens"])
    }
    read: list[int] = []
    store = runner.activations_store
    while True:
        try:
            _, token_ids = store.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            return read
        assert token_ids is not None
        for row in token_ids.reshape(-1, 16).tolist():
            read.append(token_rows[tuple(row)])


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_parallel_processes_read_every_cached_activations_row_once_per_epoch(
    tmp_path: Path, activation_cache: Path, mode: str
):
    assert len(set(map(tuple, tiny_token_dataset(N_ROWS)["tokens"]))) == N_ROWS
    out = run_on_ranks(
        _rows_read_in_an_epoch, str(tmp_path), str(activation_cache), mode
    )
    assert len(out[0]) == len(out[1]) == N_ROWS // 2
    assert sorted(out[0] + out[1]) == list(range(N_ROWS))  # none twice, none skipped
    # Dealt in turn in batches of 4 sequences: the order one process reads them in.
    assert out[0][:8] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert out[1][:8] == [4, 5, 6, 7, 12, 13, 14, 15]


def _start() -> GatedTrainingSAE:
    torch.manual_seed(7)
    return GatedTrainingSAE(
        GatedTrainingSAEConfig(d_in=32, d_sae=128, l1_coefficient=0.5, dtype="float64")
    )


# Every global batch of 64 tokens is 4 sequences: with 2 processes, 2 each, read as one
# cache batch of 2; with the mixing buffer passing activations through in order (mixing
# fraction 0), both runs train on the same global batches.
IN_ORDER: dict[str, Any] = {
    "sae": {"dtype": "float64"},
    "dtype": "float64",
    "store_batch_size_prompts": 2,
    "activations_mixing_fraction": 0.0,
}


def _train_parallel(rank: int, tmp: str, cache: str, mode: str) -> None:
    del rank
    DistributedRunner(
        _cfg(tmp, cache, **IN_ORDER),
        mode=mode,  # type: ignore[arg-type]
        ranks=init_distributed(timeout_s=60),
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
        override_sae=_start(),
    ).run()


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_parallel_training_from_cached_activations_equals_one_process(
    tmp_path: Path, activation_cache: Path, mode: str
):
    one = LanguageModelSAETrainingRunner(
        _cfg(str(tmp_path / "one"), str(activation_cache), **IN_ORDER),
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
        override_sae=_start(),
    ).run()
    run_on_ranks(_train_parallel, str(tmp_path / "two"), str(activation_cache), mode)
    # The whole SAE the first process saved.
    two = SAE.load_from_disk(tmp_path / "two" / "output", dtype="float64")
    initial = _start().state_dict()
    for name, value in one.state_dict().items():
        assert not torch.equal(value, initial[name]), name  # it trained
        torch.testing.assert_close(two.state_dict()[name], value, atol=1e-10, rtol=0)

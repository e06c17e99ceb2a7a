"""The resampling pool of a distributed run: kept by the first process, scored by all."""

from typing import Any

import pytest
import torch

from sae_lens_gated.distributed import init_distributed
from sae_lens_gated.distributed.data_parallel import DataParallelResampling
from sae_lens_gated.distributed.latent_sharded import LatentShardedResampling
from tests.distributed.spawn import run_on_ranks

WORLD = 3


def _collectives(mode: str) -> DataParallelResampling | LatentShardedResampling:
    ranks = init_distributed(timeout_s=60)
    if mode == "data":
        return DataParallelResampling(ranks)
    return LatentShardedResampling(ranks, slice(ranks.rank, ranks.rank + 1))


def _score_the_pool(rank: int, mode: str) -> dict[Any, Any]:
    collectives = _collectives(mode)
    out: dict[Any, Any] = {"keeps_pool": collectives.keeps_pool()}
    for rows in (5, 1, 6):
        # The first process keeps the pool: 2 rows past the pooled ones, never scored.
        pool = torch.arange(rows + 2, dtype=torch.float64)[:, None].repeat(1, 3)
        kept = pool if rank == 0 else None
        n_chunks, chunks = collectives.pool_chunks(kept, rows, 1)
        received = [chunk.clone() for chunk in chunks]  # as the resampler takes them
        scores = torch.cat([c[:, 0] * 10 + 1 for c in received])
        losses = collectives.gather_scores(scores, rows)
        taken = collectives.take_rows(kept, torch.tensor([rows - 1, 0, rows - 1]))
        out[rows] = {
            "n_chunks": n_chunks,
            "chunks": [c[:, 0].tolist() for c in received],
            "whole_rows": all(bool((c == c[:, :1]).all()) for c in received),
            "losses": losses.tolist(),
            "taken": taken,
        }
    return out


# Per mode and pool size: the chunks each process scores, one row at most per chunk. In
# data mode each process takes a contiguous share (empty chunks keep the sends in step);
# in latent mode every process takes every row.
EXPECTED_CHUNKS = {
    "data": {
        5: [[[0], [1]], [[2], [3]], [[4], []]],
        1: [[[0]], [[]], [[]]],
        6: [[[0], [1]], [[2], [3]], [[4], [5]]],
    },
    "latent": {rows: [[[i] for i in range(rows)]] * WORLD for rows in (5, 1, 6)},
}


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_the_first_process_keeps_the_pool_and_every_process_gets_every_loss(
    mode: str,
):
    out = run_on_ranks(_score_the_pool, mode, world_size=WORLD)
    assert [out[rank]["keeps_pool"] for rank in range(WORLD)] == [True, False, False]
    for rows, expected in EXPECTED_CHUNKS[mode].items():
        for rank in range(WORLD):
            got = out[rank][rows]
            assert got["chunks"] == expected[rank], (rank, rows)
            assert got["n_chunks"] == len(expected[rank])
            assert got["whole_rows"]
            # Data mode gathers every process's losses in the pool's order; in latent
            # mode each process scored every row itself.
            assert got["losses"] == [10.0 * i + 1 for i in range(rows)], (rank, rows)
            # The chosen rows, from the first process, in the pool's dtype.
            assert got["taken"].dtype == torch.float64
            assert got["taken"].tolist() == [
                [rows - 1.0] * 3,
                [0.0] * 3,
                [rows - 1.0] * 3,
            ]


def _without_a_pool(rank: int) -> Any:
    del rank
    return _collectives("data").pool_layout(None)


def test_a_first_process_without_a_pool_is_an_error_everywhere():
    out = run_on_ranks(_without_a_pool, world_size=2, expect_errors=True)
    for rank in (0, 1):
        assert out[rank][:2] == ("error", "RuntimeError")
        assert "first process keeps the resampling pool, but has none" in out[rank][2]

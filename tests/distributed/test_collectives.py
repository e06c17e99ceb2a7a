"""The collectives of a distributed run, and what happens when a process fails."""

import os
import time
from typing import Any

import pytest
import torch

from sae_lens_gated.distributed import (
    DistributedTrainingError,
    Ranks,
    init_distributed,
    launched_with_several_processes,
)
from sae_lens_gated.distributed.collectives import scale_gradient, sum_across_ranks
from tests.distributed.spawn import run_on_ranks


def _collectives(rank: int) -> dict[str, Any]:
    ranks = init_distributed(timeout_s=60)
    mine = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
    out: dict[str, Any] = {"rank": ranks.rank, "world": ranks.world_size}
    out["sum"] = ranks.all_reduce(mine.clone(), "test", op="sum")
    out["max"] = ranks.all_reduce(mine.clone(), "test", op="max")
    out["min"] = ranks.all_reduce(mine.clone(), "test", op="min")
    out["gathered"] = ranks.all_gather(mine, "test")
    out["broadcast"] = ranks.broadcast(mine.clone(), "test")
    out["object"] = ranks.broadcast_object({"from": rank}, "test")
    out["gather"] = ranks.gather(mine, "test")
    chunks = (
        [torch.tensor([7.0, 8.0]), torch.tensor([9.0, 10.0])] if rank == 0 else None
    )
    out["scatter"] = ranks.scatter(chunks, torch.zeros(2), "test")

    x = torch.tensor([rank + 1.0], requires_grad=True)
    total = sum_across_ranks(2 * x, ranks, "test")  # 2 * (1 + 2) = 6 everywhere
    (3 * total).backward()
    out["total"], out["x_grad"] = total.detach(), x.grad
    w = torch.ones(3, requires_grad=True)
    scale_gradient(w, 0.25).sum().backward()
    out["w_grad"] = w.grad
    return out


def test_collectives_on_two_processes():
    out = run_on_ranks(_collectives)
    for rank in (0, 1):
        result = out[rank]
        assert (result["rank"], result["world"]) == (rank, 2)
        assert result["sum"].tolist() == [3.0, 30.0]
        assert result["max"].tolist() == [2.0, 20.0]
        assert result["min"].tolist() == [1.0, 10.0]
        assert result["gathered"].tolist() == [1.0, 10.0, 2.0, 20.0]
        assert result["broadcast"].tolist() == [1.0, 10.0]
        assert result["object"] == {"from": 0}
        assert result["total"].tolist() == [6.0]
        # The sum's gradient reaches each part unchanged: d(3 * 2 * x_rank) / dx_rank.
        assert result["x_grad"].tolist() == [6.0]
        assert result["w_grad"].tolist() == [0.25, 0.25, 0.25]
    assert [t.tolist() for t in out[0]["gather"]] == [[1.0, 10.0], [2.0, 20.0]]
    assert out[1]["gather"] is None
    assert out[0]["scatter"].tolist() == [7.0, 8.0]
    assert out[1]["scatter"].tolist() == [9.0, 10.0]


def _crash_or_hang(rank: int, crash: bool) -> Any:
    ranks = init_distributed(timeout_s=3)
    ranks.barrier("starting")
    if rank == 1:
        if crash:
            os._exit(3)
        time.sleep(4.5)  # alive, but never joins the collective
        return None
    start = time.monotonic()
    try:
        ranks.all_reduce(torch.ones(4), "summing the test values")
    except DistributedTrainingError as error:
        return str(error), time.monotonic() - start
    return None


@pytest.mark.parametrize("crash", [True, False])
def test_a_crashed_or_silent_process_stops_the_others_within_the_timeout(crash: bool):
    out = run_on_ranks(_crash_or_hang, crash, expect_errors=True)
    message, seconds = out[0]
    assert message.startswith("summing the test values failed on rank 0 of 2: another")
    assert "within 3 s" in message
    assert seconds < 6.0
    if crash:
        assert out[1] is None  # died without a result


def test_init_outside_torchrun_names_what_is_missing(monkeypatch: pytest.MonkeyPatch):
    for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(variable, raising=False)
    assert not launched_with_several_processes()
    with pytest.raises(
        DistributedTrainingError, match="RANK, WORLD_SIZE, MASTER_ADDR not set"
    ):
        init_distributed()
    with pytest.raises(DistributedTrainingError, match="not initialized"):
        Ranks()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_with_several_processes()


def _backend_where_cuda_is_available(rank: int) -> tuple[str, str]:
    del rank
    # As on a GPU machine: init_distributed() alone would pick NCCL and a GPU per process.
    torch.cuda.is_available = lambda: True
    ranks = init_distributed(timeout_s=60)
    return torch.distributed.get_backend(), str(ranks.device)


def test_the_test_processes_join_through_gloo_where_cuda_is_available():
    assert run_on_ranks(_backend_where_cuda_is_available) == {
        0: ("gloo", "cpu"),
        1: ("gloo", "cpu"),
    }

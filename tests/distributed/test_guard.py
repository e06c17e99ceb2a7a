"""Every process stops a step when one process's values are not finite."""

from typing import Any

import torch

from sae_lens_gated import GatedTrainingSAE
from sae_lens_gated.distributed import init_distributed
from sae_lens_gated.distributed.guard import stop_everywhere_if_not_finite
from sae_lens_gated.training.batch_guard import NonFiniteBatchError
from tests.distributed.spawn import run_on_ranks
from tests.helpers import build_gated_training_cfg


def _check(rank: int, bad_rank: int | None) -> Any:
    ranks = init_distributed(timeout_s=60)
    sae = GatedTrainingSAE(build_gated_training_cfg())
    for p in sae.parameters():
        p.grad = torch.ones_like(p)
    if rank == bad_rank:
        sae.W_dec.grad[3, 2] = float("inf")  # type: ignore[index]
    try:
        stop_everywhere_if_not_finite(sae.conventions, ranks, check_gradients=True)
    except NonFiniteBatchError as error:
        return str(error)
    return None


def test_one_process_with_a_non_finite_gradient_stops_every_process():
    out = run_on_ranks(_check, 1)
    assert out[1] is not None and "The gradients of W_dec are not finite" in out[1]
    assert out[0] is not None and out[0].startswith("Another process's training batch")


def test_finite_steps_go_ahead():
    assert run_on_ranks(_check, None) == {0: None, 1: None}

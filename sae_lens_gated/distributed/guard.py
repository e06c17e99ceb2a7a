"""Stop a training step on every process when any process's values are not finite."""

import torch

from sae_lens_gated.distributed.collectives import Ranks
from sae_lens_gated.training.batch_guard import NonFiniteBatchError
from sae_lens_gated.training.conventions import TrainingConventions

_ELSEWHERE = (
    "Another process's training batch, loss or gradients contained NaN or inf values; "
    "the optimizer step was stopped on every process before updating any weights. "
    "Check the activation source."
)


def stop_everywhere_if_not_finite(
    conventions: TrainingConventions, ranks: Ranks, check_gradients: bool
) -> None:
    """Raise ``NonFiniteBatchError`` on every process if the batch guard of any refuses.

    A process alone refusing its step would leave the others waiting in the next
    collective. One flag is reduced per step.

    Args:
        conventions: This process's training conventions (their batch guard).
        ranks: The processes of the run.
        check_gradients: Also check this process's gradients (where processes hold
            different ones; replicas hold the same gradients after averaging).
    """
    guard = conventions.batch_guard
    error: NonFiniteBatchError | None = None
    try:
        guard.raise_if_bad()
        if check_gradients:
            guard.check_gradients(
                [
                    (name, p)
                    for name, p in conventions.sae.named_parameters()
                    if p.grad is not None
                ]
            )
    except NonFiniteBatchError as caught:
        error = caught
    flag = torch.tensor([0.0 if error is None else 1.0])
    ranks.all_reduce(flag, "checking that every process's step is finite", op="max")
    if error is not None:
        raise error
    if flag.item() > 0:
        raise NonFiniteBatchError(_ELSEWHERE)

"""The dead-feature resampler's pool of recent inputs in a run of several processes.

The first process keeps the only copy of the pool, as one process would, and writes it into
its checkpoints; the others only count the rows pooled. At an event the pooled inputs the
other processes score are sent to them in chunks of bounded size, and the inputs the draw
chose are sent to all.
"""

from typing import Any

import torch

from sae_lens_gated.distributed.collectives import Ranks
from sae_lens_gated.training.resampling import DeadFeatureResampler


def copy_first_resampler_state(
    source: DeadFeatureResampler | None,
    target: DeadFeatureResampler,
    ranks: Ranks,
    device: Any,
) -> None:
    """Give every process's ``target`` the first process's ``source`` state. Collective.

    The first process loads the whole state, pool included (nothing to do where ``source``
    is ``target``); the others load it without the pool, which only the first keeps.

    Args:
        source: The state to copy, on the first process (ignored elsewhere; None: keep
            every ``target`` as it is).
        target: This process's resampler, whose collectives say whether it keeps the pool.
        ranks: The processes of the run.
        device: Where ``target`` keeps its per-feature state.
    """
    shared = ranks.broadcast_object(
        source.state_dict(include_pool=False)
        if ranks.is_first and source is not None
        else None,
        "copying the first process's resampler state",
    )
    if ranks.is_first:
        if source is not None and source is not target:
            target.load_state_dict(source.state_dict(), device=device)
    elif shared is not None:
        target.load_state_dict(shared, device=device)


class FirstProcessPool:
    """What the resampler's collectives of both distributed modes share about the pool.

    Args:
        ranks: The processes of the run.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def keeps_pool(self) -> bool:
        return self.ranks.is_first

    def take_rows(
        self, pool: torch.Tensor | None, chosen: torch.Tensor
    ) -> torch.Tensor:
        dtype, d_in = self.pool_layout(pool)
        taken = (
            torch.empty(chosen.numel(), d_in, dtype=dtype)
            if pool is None
            else pool[chosen.to(pool.device)]
        )
        return self.ranks.broadcast(taken, "sending the chosen inputs")

    def pool_layout(self, pool: torch.Tensor | None) -> tuple[torch.dtype, int]:
        """The pool's dtype and width, which the processes that do not keep it lack.
        Collective: ``pool`` is the pool on the first process, None elsewhere."""
        layout = None if pool is None else (pool.dtype, pool.shape[1])
        layout = self.ranks.broadcast_object(layout, "sharing the pool's layout")
        if layout is None:
            raise RuntimeError(
                "The first process keeps the resampling pool, but has none."
            )
        return layout

"""Data-parallel training: every process holds the whole SAE and trains on its own rows.

Each process runs SAELens's unmodified trainer on its own share of the global batch. The
gradients are averaged across processes while the backward pass accumulates them (one
all-reduce per parameter, from a post-accumulate-grad hook), so SAELens's gradient
clipping, the plugin's clip undo and the unit-norm projection all see the gradient of the
global batch, and the replicas take identical optimizer steps. The dead-feature resampler
combines the firing flags of all processes every step, and the first process pools the
global batch for all; at an event each process scores a share of the pool. Every
resampling decision is the same everywhere.

docs/distributed.md says why this is done with hooks rather than ``DistributedDataParallel``,
``replicate`` or FSDP2.
"""

from collections.abc import Iterator

import torch
from torch.utils.hooks import RemovableHandle

from sae_lens_gated.distributed.collectives import Ranks
from sae_lens_gated.distributed.guard import stop_everywhere_if_not_finite
from sae_lens_gated.distributed.pool import (
    FirstProcessPool,
    copy_first_resampler_state,
)
from sae_lens_gated.saes.gated_sae import GatedTrainingSAE
from sae_lens_gated.training.resampling import SINGLE_PROCESS


class DataParallelPlan:
    """Averages gradients across processes and agrees on every step's finiteness.

    Build it with :func:`enable_data_parallel`.

    Args:
        sae: This process's replica.
        ranks: The processes of the run.
    """

    def __init__(self, sae: GatedTrainingSAE, ranks: Ranks) -> None:
        self.sae = sae
        self.ranks = ranks
        self._handles: list[RemovableHandle] = []
        self._names: dict[int, str] = {}

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradient of each of ``params`` as soon as it is accumulated."""
        for handle in self._handles:
            handle.remove()
        names = {id(p): name for name, p in self.sae.named_parameters()}
        self._names = {id(p): names.get(id(p), "a parameter") for p in params}
        self._handles = [
            p.register_post_accumulate_grad_hook(self._average)
            for p in params
            if p.requires_grad
        ]

    @torch.no_grad()
    def _average(self, param: torch.Tensor) -> None:
        assert param.grad is not None
        self.ranks.all_reduce(
            param.grad, f"averaging the gradient of {self._names.get(id(param))}"
        )
        param.grad.div_(self.ranks.world_size)

    def before_step(self) -> None:
        """Stop the step everywhere if any process's batch or loss was not finite."""
        # The gradients are averaged, so every replica's gradient check sees the same values.
        stop_everywhere_if_not_finite(
            self.sae.conventions, self.ranks, check_gradients=False
        )

    def after_step(self) -> None:
        """Nothing: identical gradients gave identical steps."""


class DataParallelResampling(FirstProcessPool):
    """The resampler's collectives when every process holds all features and some rows.

    The first process keeps the pool of recent inputs for all (one copy per run, not one
    per process). At an event it sends each process a contiguous share of the pool, a
    chunk at a time; each scores its share, and the losses are gathered in the pool's
    order, so the draw is the one a single process would make.

    Args:
        ranks: The processes of the run; each holds the same number of rows per step.
    """

    def __init__(self, ranks: Ranks) -> None:
        super().__init__(ranks)
        self._rows_checked = False

    def global_rows(self, rows: int) -> int:
        return rows * self.ranks.world_size

    def gather_rows(self, batch: torch.Tensor) -> torch.Tensor | None:
        if not self._rows_checked:
            rows = self.ranks.all_gather(
                torch.tensor([batch.shape[0]]), "comparing the processes' batch sizes"
            )
            if not bool((rows == rows[0]).all()):
                raise ValueError(
                    f"Data-parallel processes hold different batch sizes {rows.tolist()}: "
                    "each must take the same share of the global batch."
                )
            self._rows_checked = True
        parts = self.ranks.gather(batch, "gathering the resampling pool's inputs")
        return None if parts is None else torch.cat(parts)

    def combine_fired(self, fired: torch.Tensor) -> torch.Tensor:
        flags = fired.to(torch.uint8)
        self.ranks.all_reduce(flags, "combining the features' firing", op="max")
        return flags.bool()

    def local_features(self, d_sae: int) -> slice:
        return slice(0, d_sae)

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The replicas' weights are identical: the local mean is the global one.
        return SINGLE_PROCESS.masked_mean(values, mask)

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ranks.broadcast(tensor.clone(), "agreeing on the resampled inputs")

    def pool_chunks(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> tuple[int, Iterator[torch.Tensor]]:
        share = self._share_rows(rows)
        return -(-share // chunk_rows), self._share(pool, rows, chunk_rows)

    def _share_rows(self, rows: int) -> int:
        """Rows of each process's share of ``rows`` pooled inputs (the last ones shorter)."""
        return -(-rows // self.ranks.world_size)

    def _share(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> Iterator[torch.Tensor]:
        """This process's contiguous share of the rows, sent by the first process one
        chunk at a time (its own share is the head of its pool: ``share <= rows``)."""
        world, rank = self.ranks.world_size, self.ranks.rank
        share = self._share_rows(rows)
        held = min(share, max(rows - rank * share, 0))
        dtype, d_in = self.pool_layout(pool)
        for start in range(0, share, chunk_rows):
            stop = min(start + chunk_rows, share)
            if pool is None:
                chunk, pieces = torch.empty(stop - start, d_in, dtype=dtype), None
            else:
                chunk = pool[start:stop]
                pieces = [
                    _padded_rows(pool, r * share + start, r * share + stop, rows)
                    for r in range(world)
                ]
            self.ranks.scatter(
                pieces, chunk, "sending each process its share of the pool"
            )
            yield chunk[: max(0, min(stop, held) - start)]

    def gather_scores(self, scores: torch.Tensor, rows: int) -> torch.Tensor:
        padded = scores.new_zeros(self._share_rows(rows))
        padded[: scores.shape[0]] = scores
        losses = self.ranks.all_gather(padded, "gathering the pooled inputs' losses")
        return losses[:rows]


def _padded_rows(pool: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """Rows ``start:stop`` of the ``rows`` pooled inputs, zero rows past the end."""
    part = pool[min(start, rows) : min(stop, rows)]
    missing = stop - start - part.shape[0]
    return (
        torch.cat([part, part.new_zeros(missing, pool.shape[1])]) if missing else part
    )


@torch.no_grad()
def enable_data_parallel(
    sae: GatedTrainingSAE, ranks: Ranks | None = None
) -> DataParallelPlan:
    """Make ``sae`` one replica of a data-parallel run. Collective; call before training.

    Copies the first process's weights and resampler state to every process, then hooks
    the gradient averaging and the resampler's collectives into the SAE's training
    conventions. Each process then feeds SAELens's trainer its own share of the global
    batch (the same number of rows everywhere).

    Args:
        sae: This process's training SAE (any gated architecture of the plugin).
        ranks: The processes of the run (default: the default process group).

    Returns:
        The plan now hooked into ``sae.conventions``.
    """
    ranks = ranks or Ranks()
    for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        ranks.broadcast(tensor.data, f"copying the first process's {name}")
    resampler = sae.conventions.resampler
    if resampler is not None:
        resampler.collectives = DataParallelResampling(ranks)
        copy_first_resampler_state(resampler, resampler, ranks, sae.W_dec.device)
    plan = DataParallelPlan(sae, ranks)
    sae.conventions.use_parallel(plan)
    return plan

"""Training one gated SAE on several processes with ``torch.distributed`` (torchrun).

Two modes, both running SAELens's unmodified trainer on every process:

- data-parallel (:func:`enable_data_parallel`): every process holds the whole SAE and
  trains on its own rows; gradients are averaged during the backward pass;
- latent-sharded (:func:`shard_latents`): every process holds ``d_sae / N`` features and
  all of the global batch; partial reconstructions are summed each step.

:class:`DistributedRunner` runs SAELens's ``LanguageModelSAETrainingRunner`` in either mode;
``sae-lens-gated train`` uses it under ``torchrun``. docs/distributed.md explains the design.
"""

from sae_lens_gated.distributed.collectives import (
    DEFAULT_TIMEOUT_S,
    DistributedTrainingError,
    Ranks,
    init_distributed,
    launched_with_several_processes,
)
from sae_lens_gated.distributed.data_parallel import (
    DataParallelPlan,
    enable_data_parallel,
)
from sae_lens_gated.distributed.latent_sharded import (
    LatentShardedGatedTrainingSAE,
    shard_latents,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DataParallelPlan",
    "DistributedTrainingError",
    "LatentShardedGatedTrainingSAE",
    "Ranks",
    "enable_data_parallel",
    "init_distributed",
    "launched_with_several_processes",
    "shard_latents",
]

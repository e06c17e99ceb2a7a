"""Checks of a SAELens activation cache against the run that is to read it.

``CacheActivationsRunner`` writes a model's activations once; a run with
``use_cached_activations=True`` then trains from them. SAELens finds a cache for another
hook or width only when it starts reading, and a cache with too few rows for the run not at
all: its activation store starts over at the first row with a warning, so the SAE trains on
some activations twice. :func:`check_cached_activations` refuses both before any work.
"""

import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.training.activations_store import ActivationsStore
from safetensors.torch import load_file
from typing_extensions import override

# The column SAELens's cache holds beside one column per hook.
_TOKEN_IDS = "token_ids"
# Normalizations for which SAELens's trainer draws batches before training.
_ESTIMATED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")


def load_activation_cache(path: str | Path) -> Dataset:
    """Open the activation cache at ``path`` (memory-mapped: nothing is read yet).

    Raises:
        ValueError: ``path`` is not a folder holding one dataset saved by ``save_to_disk``.
    """
    if not Path(path).is_dir():
        raise ValueError(f"There is no activation cache at {path}: no such folder.")
    try:
        dataset: Any = load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as error:
        raise ValueError(
            f"{path} is not an activation cache written by SAELens's "
            f"CacheActivationsRunner: {error}"
        ) from None
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"{path} holds several splits ({', '.join(dataset)}); an activation cache "
            "is one dataset."
        )
    return dataset


def tokens_needed(cfg: LanguageModelSAERunnerConfig[Any], n_processes: int = 1) -> int:
    """The fewest cached tokens one of ``n_processes`` processes reads in the run ``cfg``.

    Its share of the training tokens, the batches SAELens's trainer draws first to estimate
    the activation normalization, and what the store's mixing buffer still holds when
    training ends.
    """
    local_batch = cfg.train_batch_size_tokens // n_processes
    steps = math.ceil(cfg.training_tokens / cfg.train_batch_size_tokens)
    needed = steps * local_batch
    if cfg.sae.normalize_activations in _ESTIMATED_NORMALIZATIONS:
        needed += cfg.n_batches_for_norm_estimate * local_batch
    # The mixing buffer is sized in sequences of the sliced length (seqpos_slice).
    sliced = len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])
    needed += int(cfg.n_batches_in_buffer * sliced * cfg.activations_mixing_fraction)
    return needed


def check_cached_activations(
    cfg: LanguageModelSAERunnerConfig[Any], n_processes: int = 1
) -> None:
    """Refuse a run whose activation cache does not fit it, before any work.

    Does nothing unless ``cfg.use_cached_activations``. Checks that the cache holds the
    hook ``cfg.hook_name`` with ``(context_size, d_in)`` activations per sequence, and
    enough sequences that none is read twice: SAELens's store reads whole batches of
    ``store_batch_size_prompts`` sequences, and with ``n_processes`` each reads its own
    share of the cache.

    Args:
        cfg: The run's configuration (the whole run's, under torchrun).
        n_processes: The processes of a data-parallel or latent-sharded run.

    Raises:
        ValueError: No cache, a cache of another hook, width or context size, or too few
            sequences; the message names both sides.
    """
    if not cfg.use_cached_activations:
        return
    path = cfg.cached_activations_path
    if path is None:
        raise ValueError("use_cached_activations needs cached_activations_path.")
    cache = load_activation_cache(path)
    hooks = [column for column in cache.column_names if column != _TOKEN_IDS]
    if cfg.hook_name not in hooks:
        raise ValueError(
            f"The activation cache at {path} holds {', '.join(map(repr, hooks))}, not "
            f"the hook of this run, {cfg.hook_name!r} (hook_name)."
        )
    shape = tuple(getattr(cache.features[cfg.hook_name], "shape", ()))
    # SAELens reads cached sequences whole, context_size tokens each (no seqpos_slice).
    context, d_in = cfg.context_size, cfg.sae.d_in
    if shape != (context, d_in):
        raise ValueError(
            f"The activation cache at {path} holds {cfg.hook_name!r} activations of shape "
            f"{shape} per sequence; this run needs (context_size, d_in) = "
            f"({context}, {d_in})."
        )
    prompts = cfg.store_batch_size_prompts
    share = len(cache) // n_processes
    usable = share // prompts * prompts * context
    needed = tokens_needed(cfg, n_processes)
    if usable < needed:
        where = "" if n_processes == 1 else f" for each of {n_processes} processes"
        raise ValueError(
            f"The activation cache at {path} is too small for this run: {len(cache)} "
            f"sequences of {context} tokens give {usable} tokens{where} in whole batches "
            f"of {prompts} sequences (store_batch_size_prompts), and the run reads "
            f"{needed} (training_tokens, the normalization estimate and the mixing "
            "buffer's rest). Cache more activations or train on fewer tokens."
        )


CACHE_ROW_KEY = "cached_activations_next_row"
"""Key of the cache position in the activation store's checkpoint state."""


class CachePositionStore(ActivationsStore):
    """SAELens's activation store that also checkpoints its position in an activation cache.

    SAELens's store checkpoints how many token-dataset sequences it has read, not the next
    row of a cache, so a run resumed from a checkpoint reads the cache from its first row
    again: rows trained on before the checkpoint twice, and as many at the end never. This
    store resumes at the row after the last one read (the activations the mixing buffer held
    at the checkpoint are lost, as SAELens loses them for token datasets).
    """

    @override
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.cached_activation_dataset is not None:
            state[CACHE_ROW_KEY] = torch.tensor(self.current_row_idx)
        return state

    @override
    def load(self, file_path: str) -> None:
        super().load(file_path)
        state = load_file(file_path)
        if self.cached_activation_dataset is not None and CACHE_ROW_KEY in state:
            self.current_row_idx = int(state[CACHE_ROW_KEY])


def keep_cache_position(
    runner: LanguageModelSAETrainingRunner, override_dataset: HfDataset | None = None
) -> None:
    """Give ``runner`` (built, not yet run) a :class:`CachePositionStore` if it trains from
    an activation cache, so that resuming it continues where its checkpoint stopped.

    Args:
        runner: SAELens's runner.
        override_dataset: The token dataset the runner was given, if any.
    """
    cfg = runner.cfg
    if not cfg.use_cached_activations:
        return
    store = CachePositionStore.from_config(
        runner.model, cfg, override_dataset=override_dataset
    )
    runner.activations_store = store
    runner.evaluator.activations_store = store

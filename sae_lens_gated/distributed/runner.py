"""SAELens's own ``LanguageModelSAETrainingRunner`` on every process of a torchrun launch.

:class:`DistributedRunner` subclasses SAELens's runner and overrides only what has to
differ per process: the configuration each process runs with, its share of the token
dataset (``datasets.distributed.split_dataset_by_node``) or of the cached activations, the
SAE it trains (a replica or a share of the features), and where checkpoints and the final
SAE are written. ``run()`` is SAELens's.

- The configuration describes the whole run: ``train_batch_size_tokens`` and
  ``training_tokens`` are global. Each process's activation store yields its
  ``1/N`` of every global batch, from its own rows of the dataset, so the language model's
  work is split in both modes. In latent-sharded mode the SAE gathers the global batch.
- The activation normalization statistics (``normalize_activations``) are estimated from
  the global batches: the store hands every process the gathered batches while SAELens's
  trainer estimates them, so all processes scale by the same factor.
- W&B logging and evaluations run on the first process only (evaluations need the whole
  SAE and are skipped in latent-sharded mode).
- Checkpoints are written to ``<checkpoint_path>/.incomplete`` and renamed into place once
  complete; a run that fails leaves no partial checkpoint. In data-parallel mode the first
  process writes them; in latent-sharded mode it writes the whole SAE and process ``r``
  its optimizer state to ``<checkpoint_path>/rank<r>/<name>``. Resume from the first
  process's folder with the same number of processes.
"""

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import sae_lens
import torch
import torch.distributed as dist
from datasets import Dataset, load_dataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SPARSITY_FILENAME,
    TRAINER_STATE_FILENAME,
)
from sae_lens.llm_sae_training_runner import LLMSaeEvaluator
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.types import DataProvider
from safetensors.torch import load_file, save_file
from transformer_lens.hook_points import HookedRootModule
from typing_extensions import override

from sae_lens_gated.distributed.collectives import (
    DEFAULT_TIMEOUT_S,
    Ranks,
    init_distributed,
    launched_with_several_processes,
)
from sae_lens_gated.distributed.data_parallel import enable_data_parallel
from sae_lens_gated.distributed.latent_sharded import (
    LatentShardedGatedTrainingSAE,
    rank_checkpoint_folder,
    shard_latents,
)
from sae_lens_gated.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.training.cached_activations import (
    CachePositionStore,
    check_cached_activations,
    keep_cache_position,
)

logger = logging.getLogger(__name__)

Mode = Literal["data", "latent"]
MODES: tuple[Mode, ...] = ("data", "latent")

STAGING_FOLDER = ".incomplete"
"""Subfolder of ``checkpoint_path`` where checkpoints are written before they are complete."""

_NORMALIZATIONS_ESTIMATED = ("expected_average_only_in", "covariance_whitening")


class DistributedRunner(LanguageModelSAETrainingRunner):
    """SAELens's training runner as one process of a data-parallel or latent-sharded run.

    Every process builds one with the same ``cfg`` (the whole run's), after
    :func:`~sae_lens_gated.distributed.init_distributed`, and calls ``run()``.

    Args:
        cfg: The whole run's configuration; ``train_batch_size_tokens`` must be divisible by
            the number of processes, and in latent mode ``d_sae`` too.
        mode: ``"data"`` (every process holds the whole SAE) or ``"latent"`` (each holds
            ``d_sae / N`` features; architecture ``"gated"``).
        ranks: The processes of the run (default: the default process group).
        override_dataset: The whole token dataset (each process takes its share).
        override_model: As SAELens's runner.
        override_sae: The whole SAE to start from, on the first process (latent mode) or on
            every process (data mode: the first process's weights are used).
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        mode: Mode = "data",
        ranks: Ranks | None = None,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.ranks = ranks or Ranks()
        self.mode = mode
        self.whole_cfg = cfg
        check_runner_config(cfg, self.ranks, mode)
        check_cached_activations(cfg, self.ranks.world_size)
        # SAELens appends a random id to checkpoint_path: every process uses the first's.
        cfg.checkpoint_path = self.ranks.broadcast_object(
            cfg.checkpoint_path, "agreeing on the checkpoint folder"
        )
        self._temporary_checkpoints: Path | None = None
        local_cfg = self._local_config(cfg)
        dataset = rank_dataset(cfg, self.ranks, override_dataset)
        torch.manual_seed(cfg.seed)
        sae = override_sae
        if mode == "latent":
            sae_cfg = _gated_config(
                TrainingSAEConfig.from_dict(local_cfg.get_training_sae_cfg_dict())
            )
            sae = shard_latents(
                self._whole_sae(override_sae),
                sae_cfg,
                self.ranks,
                gather_batch=True,
            )
        super().__init__(
            local_cfg,
            override_dataset=dataset,
            override_model=override_model,
            override_sae=sae,
        )
        if mode == "data":
            if not isinstance(self.sae, GatedTrainingSAE):
                raise ValueError(
                    "Distributed training needs a plugin gated SAE (architecture 'gated' "
                    f"or 'gated_untied'), not {type(self.sae).__name__}."
                )
            enable_data_parallel(self.sae, self.ranks)
        self.activations_store = self._rank_activations_store(dataset)
        if mode == "latent":
            self.evaluator = SkippedEvaluator(
                model=self.model,
                activations_store=self.activations_store,
                eval_batch_size_prompts=self.cfg.eval_batch_size_prompts,
                n_eval_batches=self.cfg.n_eval_batches,
                model_kwargs=self.cfg.model_kwargs,
            )

    # ---- setup ----------------------------------------------------------------------------

    def _local_config(
        self, cfg: LanguageModelSAERunnerConfig[Any]
    ) -> LanguageModelSAERunnerConfig[Any]:
        ranks, world = self.ranks, self.ranks.world_size
        local = copy.deepcopy(cfg)
        steps = math.ceil(cfg.training_tokens / cfg.train_batch_size_tokens)
        local.train_batch_size_tokens = cfg.train_batch_size_tokens // world
        local.training_tokens = steps * local.train_batch_size_tokens
        local.tokens_per_buffer = (
            local.train_batch_size_tokens
            * local.context_size
            * local.n_batches_in_buffer
        )
        local.device = _rank_device(cfg.device)
        local.llm_device = _rank_device(cfg.llm_device or cfg.device)
        local.act_store_device = _rank_device(cfg.act_store_device or cfg.device)
        if not ranks.is_first:
            local.logger.log_to_wandb = False
        base = cfg.checkpoint_path
        if (
            base is None
            and self.mode == "latent"
            and cfg.logger.log_to_wandb
            and (cfg.n_checkpoints > 0 or cfg.save_final_checkpoint)
        ):
            # The first process saves checkpoints to upload them to W&B; in latent mode
            # every process must take part, so they all get a temporary folder.
            base = ranks.broadcast_object(
                tempfile.mkdtemp(prefix="sae_lens_gated_") if ranks.is_first else "",
                "agreeing on a temporary checkpoint folder",
            )
            self._temporary_checkpoints = Path(base)
        if base is None or (self.mode == "data" and not ranks.is_first):
            local.checkpoint_path = None
        else:
            local.checkpoint_path = str(
                rank_checkpoint_folder(Path(base) / STAGING_FOLDER, ranks.rank)
                if self.mode == "latent"
                else Path(base) / STAGING_FOLDER
            )
        if cfg.resume_from_checkpoint is not None and self.mode == "latent":
            own = rank_checkpoint_folder(cfg.resume_from_checkpoint, ranks.rank)
            if not (own / TRAINER_STATE_FILENAME).exists():
                raise ValueError(
                    f"{own} has no {TRAINER_STATE_FILENAME}: resume a latent-sharded run "
                    f"from the first process's checkpoint folder, with the number of "
                    f"processes that wrote it (this run has {world})."
                )
            local.resume_from_checkpoint = str(own)
        return local

    def _whole_sae(
        self, override_sae: TrainingSAE[Any] | None
    ) -> GatedTrainingSAE | None:
        # The whole SAE exists on the first process only, on the CPU, as SAELens's runner
        # would have built it there.
        if not self.ranks.is_first:
            return None
        if override_sae is not None:
            sae: TrainingSAE[Any] = override_sae
        elif self.whole_cfg.from_pretrained_path is not None:
            sae = TrainingSAE.load_from_disk(self.whole_cfg.from_pretrained_path, "cpu")
        else:
            sae_dict = {**self.whole_cfg.get_training_sae_cfg_dict(), "device": "cpu"}
            sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(sae_dict).to_dict())
        if type(sae) is not GatedTrainingSAE:
            raise ValueError(
                "Latent-sharded training needs the plugin's gated SAE (architecture "
                f"'gated'), not {type(sae).__name__}."
            )
        return sae

    def _rank_activations_store(
        self, dataset: HfDataset | None
    ) -> "RankActivationsStore":
        store = RankActivationsStore.from_config(
            self.model, self.cfg, override_dataset=dataset
        )
        assert isinstance(store, RankActivationsStore)  # from_config builds cls
        store.ranks = self.ranks
        resuming = self.cfg.resume_from_checkpoint is not None
        if (
            self.cfg.sae.normalize_activations in _NORMALIZATIONS_ESTIMATED
            and not resuming
        ):
            store.gathered_batches = self.cfg.n_batches_for_norm_estimate
        if store.cached_activation_dataset is not None:
            store.cached_activation_dataset = rank_cache_share(
                store.cached_activation_dataset,
                self.cfg.store_batch_size_prompts,
                self.ranks,
            )
        return store

    # ---- run, checkpoints, final SAE ------------------------------------------------------

    @override
    def run(self) -> TrainingSAE[Any]:
        try:
            return super().run()
        finally:
            # Checkpoints still in a staging folder are incomplete: a failed run or an
            # interruption stopped them. The first process also removes those of
            # processes that crashed.
            for staging in self._staging_folders():
                shutil.rmtree(staging, ignore_errors=True)
            if self._temporary_checkpoints is not None and self.ranks.is_first:
                shutil.rmtree(self._temporary_checkpoints, ignore_errors=True)

    def _staging_folders(self) -> list[Path]:
        if self.cfg.checkpoint_path is None:
            return []
        own = Path(self.cfg.checkpoint_path)
        if self.mode == "data" or not self.ranks.is_first:
            return [own]
        return [
            rank_checkpoint_folder(own, rank) for rank in range(self.ranks.world_size)
        ]

    @override
    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """Complete the checkpoint SAELens's trainer wrote, then rename it into place."""
        if checkpoint_path is None:
            return
        checkpoint_path = Path(checkpoint_path)
        if sys.exc_info()[0] is not None:
            # SAELens's interruption handler, which saves only the data position, and at a
            # different step on each process: a distributed run keeps its last complete
            # checkpoint instead.
            logger.warning(
                "Interrupted: the last complete checkpoint is kept; %s is not written.",
                checkpoint_path.name,
            )
            return
        super().save_checkpoint(checkpoint_path)
        _write_runner_config(checkpoint_path, self.whole_cfg)
        final = self._final_checkpoint_folder(checkpoint_path)
        if self.mode == "data":
            _rename_into_place(checkpoint_path, final)
            return
        self._write_whole_sparsity(checkpoint_path)
        # Every part is written before any is renamed; the first process's folder, the one
        # to resume from, is renamed last.
        self.ranks.barrier("finishing the checkpoint")
        if not self.ranks.is_first:
            _rename_into_place(checkpoint_path, final)
        self.ranks.barrier("renaming the checkpoint's parts")
        if self.ranks.is_first:
            _rename_into_place(checkpoint_path, final)

    def _final_checkpoint_folder(self, staged: Path) -> Path:
        base = self.whole_cfg.checkpoint_path
        if base is None:
            assert self._temporary_checkpoints is not None
            base = str(self._temporary_checkpoints)
        return rank_checkpoint_folder(Path(base) / staged.name, self.ranks.rank)

    def _write_whole_sparsity(self, folder: Path) -> None:
        # SAELens's trainer wrote the feature sparsity of this process's features.
        sparsity = load_file(folder / SPARSITY_FILENAME)["sparsity"]
        whole = self.ranks.all_gather(sparsity, "gathering the feature sparsity")
        if self.ranks.is_first:
            save_file({"sparsity": whole}, folder / SPARSITY_FILENAME)

    @override
    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        """Write the whole SAE from the first process (gathered in latent mode)."""
        if isinstance(sae, LatentShardedGatedTrainingSAE):
            if log_feature_sparsity is not None:
                log_feature_sparsity = self.ranks.all_gather(
                    log_feature_sparsity, "gathering the feature sparsity"
                )
            whole = sae.gathered()
            if whole is None:
                return
            sae = whole
        if not self.ranks.is_first:
            return
        output = Path(output_path)
        output.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        try:
            super().save_final_sae(sae, str(staged), log_feature_sparsity)
            _write_runner_config(staged, self.whole_cfg)
            output.mkdir(exist_ok=True)
            for file in staged.iterdir():
                os.replace(file, output / file.name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


class RankActivationsStore(CachePositionStore):
    """SAELens's activation store, whose first ``gathered_batches`` batches are global.

    SAELens's trainer estimates the activation normalization from the first batches it
    draws; handing every process the global batches then makes all estimate the same.
    """

    ranks: Ranks | None = None
    gathered_batches: int = 0

    @override
    def get_data_loader(self) -> Iterator[torch.Tensor]:
        return self._gather_first(super().get_data_loader())

    def _gather_first(self, loader: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for _ in range(self.gathered_batches):
            batch = next(loader)
            yield (
                batch
                if self.ranks is None
                else self.ranks.all_gather(
                    batch, "gathering batches for the normalization estimate"
                )
            )
        yield from loader


class SkippedEvaluator(LLMSaeEvaluator[Any]):
    """The runner's evaluator in latent-sharded mode: evaluations need the whole SAE."""

    _warned = False

    @override
    def __call__(
        self,
        sae: Any,
        data_provider: DataProvider,
        activation_scaler: ActivationScaler,
    ) -> dict[str, Any]:
        if not self._warned:
            logger.warning(
                "Evaluations during latent-sharded training are skipped: evaluate the "
                "saved SAE instead."
            )
            self._warned = True
        return {}


def check_runner_config(
    cfg: LanguageModelSAERunnerConfig[Any], ranks: Ranks, mode: Mode
) -> None:
    """Raise a clear ``ValueError`` unless ``cfg`` can run on ``ranks`` in ``mode``."""
    world = ranks.world_size
    if cfg.train_batch_size_tokens % world:
        raise ValueError(
            f"train_batch_size_tokens={cfg.train_batch_size_tokens} is not divisible by "
            f"the {world} processes: each process takes the same share of every batch."
        )
    if mode == "latent" and cfg.sae.d_sae % world:
        raise ValueError(
            f"d_sae={cfg.sae.d_sae} is not divisible by the {world} processes: "
            "latent sharding gives each process the same number of features."
        )


def trainer_estimates_normalization(cfg: LanguageModelSAERunnerConfig[Any]) -> bool:
    """Whether SAELens's trainer draws batches to estimate the activation normalization
    before the first training step of this run."""
    if cfg.sae.normalize_activations not in _NORMALIZATIONS_ESTIMATED:
        return False
    # SAELens before 6.52 estimated again when resuming; from 6.52 it keeps the
    # checkpoint's estimate.
    return cfg.resume_from_checkpoint is None or _saelens_version() < (6, 52)


def _saelens_version() -> tuple[int, ...]:
    release = sae_lens.__version__.split("+")[0].split(".")
    return tuple(int(part) for part in release[:3] if part.isdigit())


def rank_dataset(
    cfg: LanguageModelSAERunnerConfig[Any],
    ranks: Ranks,
    override_dataset: HfDataset | None,
) -> HfDataset | None:
    """This process's share of the token dataset (None with cached activations only).

    Map-style datasets are split into contiguous blocks; streaming datasets by shards when
    their count divides the number of processes, else by taking every ``N``-th example.
    """
    dataset: Any = override_dataset
    if dataset is None:
        if cfg.use_cached_activations and not cfg.dataset_path:
            return None
        options: dict[str, Any] = {"split": "train", "streaming": cfg.streaming}
        if cfg.dataset_trust_remote_code is not None:
            options["trust_remote_code"] = cfg.dataset_trust_remote_code
        # As SAELens's activation store loads it (load_dataset's overloads need literals).
        load: Any = load_dataset
        dataset = load(cfg.dataset_path, **options)
    return split_dataset_by_node(dataset, rank=ranks.rank, world_size=ranks.world_size)


def rank_cache_rows(
    n_rows: int, batch_rows: int, rank: int, world_size: int
) -> list[int]:
    """The rows of an activation cache that process ``rank`` of ``world_size`` reads.

    SAELens's store reads a cache in batches of ``batch_rows`` sequences. The batches are
    dealt out in turn (process ``r`` reads batches ``r``, ``r + N``, ...), so together the
    processes read the cache in the order one process would, each its own rows: over an
    epoch no row is read twice. The last ``n_rows % (batch_rows * N)`` rows, too few for a
    batch on every process, are not read (one process likewise skips its last partial
    batch).
    """
    group = batch_rows * world_size
    return [
        start + i
        for start in range(rank * batch_rows, n_rows // group * group, group)
        for i in range(batch_rows)
    ]


def rank_cache_share(cache: Dataset, batch_rows: int, ranks: Ranks) -> Dataset:
    """This process's rows of the activation cache (:func:`rank_cache_rows`)."""
    rows = rank_cache_rows(len(cache), batch_rows, ranks.rank, ranks.world_size)
    unread = len(cache) - len(rows) * ranks.world_size
    if unread and ranks.is_first:
        logger.warning(
            "The last %d of the %d cached sequences are not read: each of the %d "
            "processes reads whole batches of %d sequences (store_batch_size_prompts).",
            unread,
            len(cache),
            ranks.world_size,
            batch_rows,
        )
    return cache.select(rows)


def _rank_device(device: str) -> str:
    # "cuda" means this process's GPU; an explicit index is the user's choice.
    if device == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def _gated_config(cfg: Any) -> GatedTrainingSAEConfig:
    if not isinstance(cfg, GatedTrainingSAEConfig):
        raise ValueError(
            "Latent-sharded training needs the plugin's gated SAE config (architecture "
            f"'gated'), not {type(cfg).__name__}."
        )
    return cfg


def _write_runner_config(folder: Path, cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    # The whole run's settings (global batch and token counts), not this process's.
    (folder / RUNNER_CFG_FILENAME).write_text(json.dumps(cfg.to_dict()))


def _rename_into_place(staged: Path, final: Path) -> None:
    if final.exists():
        raise FileExistsError(
            f"Checkpoint {final} already exists; the new one is left in {staged}."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)


# ---- sae-lens-gated train ---------------------------------------------------------------


def distributed_arguments() -> argparse.ArgumentParser:
    """The options ``sae-lens-gated train`` adds to SAELens's runner CLI."""
    parser = argparse.ArgumentParser(
        prog="sae-lens-gated train",
        add_help=False,
        exit_on_error=False,
        description="Under torchrun with several processes, train one SAE on all of them.",
    )
    parser.add_argument(
        "--distributed",
        choices=MODES,
        default="data",
        help="data: every process holds the whole SAE and trains on its share of each "
        "batch; latent: each holds d_sae/N features of it (default: data).",
    )
    parser.add_argument(
        "--distributed-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="Stop when another process has not answered for this long.",
    )
    return parser


def run_training(
    cfg: LanguageModelSAERunnerConfig[Any],
    mode: Mode = "data",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Train ``cfg`` with SAELens's runner, on every process of a torchrun launch.

    In a single process (no torchrun, or ``--nproc-per-node 1``) this is SAELens's
    ``LanguageModelSAETrainingRunner(cfg).run()``, whose store also checkpoints its place in
    an activation cache (:func:`~sae_lens_gated.training.cached_activations.
    keep_cache_position`). Under torchrun with several processes each runs a
    :class:`DistributedRunner` in ``mode``.

    Args:
        cfg: The whole run's configuration.
        mode: ``"data"`` or ``"latent"``.
        timeout_s: Stop when another process has not answered for this long.

    Raises:
        DistributedTrainingError: Another process failed or stopped answering.
    """
    if not launched_with_several_processes():
        runner = LanguageModelSAETrainingRunner(cfg=cfg)
        if cfg.use_cached_activations:
            keep_cache_position(runner)
        runner.run()
        return
    try:
        ranks = init_distributed(timeout_s=timeout_s)
        DistributedRunner(cfg, mode=mode, ranks=ranks).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

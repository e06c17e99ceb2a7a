"""A sweep over λ and width from one activation stream, with SAELens's multi runner.

``sae-lens-gated train`` accepts several values for ``--l1_coefficient`` and ``--d_sae``;
then every combination is one SAE of a ``MultiSAETrainingRunner``, which runs the language
model once per batch for all of them. This module turns the runner CLI's arguments into
that runner's config and checks, before any model or dataset is loaded, everything that
would otherwise fail late or overwrite results.
"""

import dataclasses
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import HfDataset
from sae_lens.multi_sae_training_runner import (
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
)
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from transformer_lens.hook_points import HookedRootModule

from sae_lens_gated.conversion import check_new_folder
from sae_lens_gated.training.cached_activations import CachePositionStore

SWEEP_OPTIONS: dict[str, type[float] | type[int]] = {
    "--l1_coefficient": float,
    "--d_sae": int,
}
"""The runner CLI options that accept several values, and the type of each value."""

SWEEP_HELP = (
    "Several values: one SAE per value (per combination when both --l1_coefficient "
    "and --d_sae have several), all trained from one activation stream by SAELens's "
    "MultiSAETrainingRunner and saved to OUTPUT_PATH/d_sae-D_l1-L."
)

# Fields of the single-SAE runner config that MultiSAETrainingRunner has no equivalent for
# (SAELens 6.5x: "V1 limitations"), with the value that means "not used". Cached
# activations are the exception: CachedMultiSAETrainingRunner reads them.
_UNSUPPORTED: dict[str, Any] = {
    "from_pretrained_path": None,
    "compile_sae": False,
}
# Fields the multi runner derives itself, or that have a different meaning there.
_NOT_COPIED = {
    "saes",
    "hook_names",
    "hook_head_indices",
    "evaluator",
    "logger",
    "checkpoint_path",
    "sae_lens_version",
    "sae_lens_training_version",
}


def split_sweep_arguments(
    args: Sequence[str],
) -> tuple[list[str], dict[str, list[int | float]]]:
    """Take the values of the sweep options out of runner CLI arguments.

    Args:
        args: The arguments of ``sae-lens-gated train`` (without the distributed options).

    Returns:
        The arguments with each sweep option followed by its first value only (what SAELens's
        parser accepts), and the values of every sweep option given, in order.

    Raises:
        ValueError: A sweep option given twice or without a value, or a value that is not a
            number of its type.
    """
    kept: list[str] = []
    values: dict[str, list[int | float]] = {}
    i = 0
    while i < len(args):
        option, _, inline = args[i].partition("=")
        if option not in SWEEP_OPTIONS:
            kept.append(args[i])
            i += 1
            continue
        if option in values:
            raise ValueError(
                f"{option} is given twice: list all its values after one {option}."
            )
        tokens = [inline] if inline else []
        i += 1
        while i < len(args) and not _is_option(args[i]):
            tokens.append(args[i])
            i += 1
        if not tokens:
            raise ValueError(f"{option} needs at least one value.")
        values[option] = [_parse_value(option, token) for token in tokens]
        kept += [option, tokens[0]]
    return kept, values


def _is_option(token: str) -> bool:
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value (refused later, by the config)


def _parse_value(option: str, token: str) -> int | float:
    kind = SWEEP_OPTIONS[option]
    try:
        value = kind(token)
    except ValueError:
        # argparse's wording, as for the options SAELens parses
        raise ValueError(
            f"{option}: invalid {kind.__name__} value: {token!r}"
        ) from None
    if kind is int and value < 1:
        raise ValueError(f"{option} {token}: a width must be at least 1.")
    if kind is float and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{option} {token}: must be a finite number >= 0.")
    return value


def is_sweep(values: dict[str, list[int | float]]) -> bool:
    """Whether some sweep option was given several values."""
    return any(len(v) > 1 for v in values.values())


def sae_folder_name(sae_cfg: TrainingSAEConfig) -> str:
    """The name of an SAE of a sweep: its output subfolder and its W&B prefix."""
    name = f"d_sae-{sae_cfg.d_sae}"
    l1 = getattr(sae_cfg, "l1_coefficient", None)
    return name if l1 is None else f"{name}_l1-{float(l1)!r}"


def sweep_sae_configs(
    sae_cfg: TrainingSAEConfig, values: dict[str, list[int | float]]
) -> dict[str, TrainingSAEConfig]:
    """One SAE config per combination of the sweep values, by folder name.

    Raises:
        ValueError: A combination the SAE config refuses, or two combinations that would get
            the same folder (the same values, written twice).
    """
    fields = [option.removeprefix("--") for option in values]
    configs: dict[str, TrainingSAEConfig] = {}
    for combination in itertools.product(*values.values()):
        settings = dict(zip(fields, combination))
        given = " ".join(f"--{k} {v}" for k, v in settings.items())
        try:
            cfg = dataclasses.replace(sae_cfg, **settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{given}: {error}") from None
        for active in ("k", "target_l0"):  # TopK-style and JumpReLU SAEs
            count = getattr(cfg, active, None)
            if isinstance(count, int | float) and count > cfg.d_sae:
                raise ValueError(
                    f"{given}: {cfg.d_sae} features cannot hold {active}={count} "
                    "active ones."
                )
        name = sae_folder_name(cfg)
        if name in configs:
            raise ValueError(
                f"Two SAEs of the sweep would be saved to the same folder {name!r} "
                f"({given} is listed twice)."
            )
        configs[name] = cfg
    return configs


def multi_runner_config(
    cfg: LanguageModelSAERunnerConfig[Any],
    values: dict[str, list[int | float]],
    run_name_given: bool = False,
) -> MultiSAETrainingRunnerConfig:
    """The ``MultiSAETrainingRunner`` config of a sweep, checked before any work.

    Args:
        cfg: The runner config SAELens's CLI parsed (with the first value of each sweep
            option).
        values: The sweep values (:func:`split_sweep_arguments`).
        run_name_given: Whether the user chose the W&B run name (otherwise the multi
            runner names the run after the sweep, not after its first SAE).

    Raises:
        ValueError: A setting the multi runner does not support, a refused combination, two
            SAEs with the same folder, or weights that cannot fit in the device's memory.
        OSError: The output folder exists and is not empty, or cannot be created.
    """
    for name, unused in _UNSUPPORTED.items():
        if getattr(cfg, name, unused) != unused:
            raise ValueError(
                f"--{name} is not supported in a sweep (several --l1_coefficient or "
                "--d_sae values): SAELens's MultiSAETrainingRunner, which trains it, "
                "has no such setting."
            )
    saes = sweep_sae_configs(cfg.sae, values)
    check_memory(list(saes.values()), cfg.device)
    if cfg.output_path is not None:
        try:
            check_new_folder(cfg.output_path)
        except OSError as error:
            raise type(error)(f"--output_path: {error}") from None
    return multi_config(cfg, saes, run_name_given)


def multi_config(
    cfg: LanguageModelSAERunnerConfig[Any],
    saes: dict[str, TrainingSAEConfig],
    run_name_given: bool = False,
) -> MultiSAETrainingRunnerConfig:
    """The ``MultiSAETrainingRunner`` config that trains ``saes`` as ``cfg`` trains one
    SAE: the same model, hook, data, optimizer, logging and folders.

    Args:
        cfg: A single-SAE runner config (its ``sae`` is not used).
        saes: The SAEs' configs, by name (output subfolder and W&B prefix).
        run_name_given: Keep ``cfg``'s W&B run name (otherwise the multi runner names the
            run after its SAEs).
    """
    multi_fields = {f.name for f in dataclasses.fields(MultiSAETrainingRunnerConfig)}
    copied = {
        name: getattr(cfg, name)
        for name in multi_fields - _NOT_COPIED
        if not name.startswith("_") and hasattr(cfg, name)
    }
    logger = dataclasses.replace(
        cfg.logger, run_name=cfg.logger.run_name if run_name_given else None
    )
    multi = MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names=cfg.hook_name,
        hook_head_indices=cfg.hook_head_index,
        logger=logger,
        **copied,
    )
    # Both configs append a run id to checkpoint_path: keep the single config's one.
    multi.checkpoint_path = cfg.checkpoint_path
    return multi


def training_bytes(sae_cfg: TrainingSAEConfig) -> int:
    """A lower bound on an SAE's training memory: its two ``d_in x d_sae`` matrices with
    their gradients and two Adam moments (activations and scratch come on top)."""
    element = torch.empty((), dtype=getattr(torch, sae_cfg.dtype)).element_size()
    return 4 * 2 * sae_cfg.d_in * sae_cfg.d_sae * element


def available_bytes(device: str) -> int | None:
    """Free memory of ``device`` (None where it cannot be read)."""
    target = torch.device(device)
    if target.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(target)[0]
    if target.type == "cpu":
        return _cpu_available_bytes()
    return None


def _cpu_available_bytes() -> int | None:
    # MemAvailable counts the page cache the kernel would give back; free pages do not.
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(saes: list[TrainingSAEConfig], device: str) -> None:
    """Refuse a sweep whose SAEs' weights and optimizer state alone exceed free memory.

    Raises:
        ValueError: They do; the message names the widths and the two sizes.
    """
    free = available_bytes(device)
    needed = sum(training_bytes(cfg) for cfg in saes)
    if free is None or needed <= free:
        return
    widths = sorted({cfg.d_sae for cfg in saes})
    raise ValueError(
        f"The {len(saes)} SAEs of the sweep (--d_sae {' '.join(map(str, widths))}) do not "
        f"fit on {device}: their weights, gradients and Adam moments alone need "
        f"{needed / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB is free."
    )


class _CachedMultiHookStore(CachePositionStore):
    """SAELens's activation store over a cache, serving one hook's batches the way the
    multi runner asks for them (a dict by hook name)."""

    def get_multi_hook_data_loader(self) -> Iterator[dict[str, torch.Tensor]]:
        return ({self.hook_name: batch} for batch in self.get_data_loader())


class CachedMultiSAETrainingRunner(MultiSAETrainingRunner):
    """SAELens's ``MultiSAETrainingRunner`` training from an activation cache.

    SAELens's multi runner always runs the model (it has no ``use_cached_activations``);
    this one swaps its activation store for SAELens's store over the cache of
    ``cached_cfg``, the single-SAE config the sweep was built from. Every SAE reads the
    cache's one hook. The model and token dataset remain for the evaluations.

    Args:
        cfg: The multi runner's config (:func:`multi_config`).
        cached_cfg: A single-SAE runner config with ``use_cached_activations`` and the
            same hook.
        override_dataset: As SAELens's runner.
        override_model: As SAELens's runner.
        override_saes: As SAELens's runner.
    """

    def __init__(
        self,
        cfg: MultiSAETrainingRunnerConfig,
        cached_cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_saes: dict[str, TrainingSAE[Any]] | None = None,
    ) -> None:
        hooks = set(cfg.hook_names_per_sae.values())
        if not cached_cfg.use_cached_activations or hooks != {cached_cfg.hook_name}:
            raise ValueError(
                "CachedMultiSAETrainingRunner needs a config with use_cached_activations "
                f"for the hook of every SAE ({', '.join(sorted(hooks))})."
            )
        super().__init__(cfg, override_dataset, override_model, override_saes)
        store = _CachedMultiHookStore.from_config(
            self.model, cached_cfg, override_dataset=override_dataset
        )
        self.activations_store = store
        self.evaluator.activations_store = store

"""Training recipes of the gated SAE, and how its configs are checked and built.

A recipe gives the defaults of the config fields that decide how the gated SAE is trained
(the paper's recipe or the authors' April 2024 update). Every field is checked for its type and range when the config is built, from Python, a
``cfg.json`` or a command line, so a wrong value fails with a message that names the field
instead of misbehaving later (``resample_steps=[20.5]`` would never fire, ``"no"`` would be
true). Combinations the paper's authors advise against are logged as warnings that say what
goes wrong.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

from sae_lens.saes.sae import SAEConfig, SAEMetadata, TrainingSAEConfig
from sae_lens.util import filter_valid_dataclass_fields

from sae_lens_gated.validation import (
    GatedConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_list,
    check_optional_bool,
    check_optional_device,
)

logger = logging.getLogger(__name__)

Recipe = Literal["paper", "april_update"]
WeightTying = Literal["r_mag", "none"]
SparseStep = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class GatedRecipe:
    """Values a training recipe gives the config fields that are left unset (``None``).

    Args:
        freeze_decoder_in_aux: Stop gradients from the auxiliary loss into ``W_dec`` and the
            decoder-side ``b_dec``.
        l1_scale_by_decoder_norm: Weight each feature's sparsity penalty by its decoder row norm.
        unit_norm_decoder: Keep every ``W_dec`` row at exactly unit norm during training.
        resample_dead: Resample dead features at scheduled steps.
    """

    freeze_decoder_in_aux: bool
    l1_scale_by_decoder_norm: bool
    unit_norm_decoder: bool
    resample_dead: bool


RECIPES: dict[str, GatedRecipe] = {
    # Paper §3.2.2, App. D.1 and App. G.
    "paper": GatedRecipe(
        freeze_decoder_in_aux=True,
        l1_scale_by_decoder_norm=False,
        unit_norm_decoder=True,
        resample_dead=True,
    ),
    # The authors' April 2024 follow-up (a norm-weighted penalty instead of the unit-norm
    # constraint, decoder trainable in both terms); this is what SAELens's built-in trains.
    "april_update": GatedRecipe(
        freeze_decoder_in_aux=False,
        l1_scale_by_decoder_norm=True,
        unit_norm_decoder=False,
        resample_dead=False,
    ),
}

# Bricken et al. 2023 ("Neuron Resampling"): events at these steps, 12,500-step window.
DEFAULT_RESAMPLE_STEPS = (25_000, 50_000, 75_000, 100_000)

WEIGHT_TYING_OPTIONS = ("r_mag", "none")
SPARSE_STEP_OPTIONS = ("auto", "always", "never")
# SAELens's own default for decoder_init_norm, which a unit-norm decoder overrides silently.
SAELENS_DECODER_INIT_NORM = next(
    f.default for f in fields(TrainingSAEConfig) if f.name == "decoder_init_norm"
)


def check_training_config(cfg: Any, recipes: Mapping[str, GatedRecipe]) -> None:
    """Check every field's type and range (before recipe defaults are applied).

    Args:
        cfg: The config being built.
        recipes: The known recipes, by name.
    """
    check_int("d_in", cfg.d_in, minimum=1)
    check_int("d_sae", cfg.d_sae, minimum=1)
    check_choice("recipe", cfg.recipe, recipes)
    check_choice("weight_tying", cfg.weight_tying, WEIGHT_TYING_OPTIONS)
    check_choice("sparse_step", cfg.sparse_step, SPARSE_STEP_OPTIONS)
    check_float("l1_coefficient", cfg.l1_coefficient, minimum=0.0)
    check_float("aux_coefficient", cfg.aux_coefficient, minimum=0.0)
    check_int("l1_warm_up_steps", cfg.l1_warm_up_steps, minimum=0)
    if cfg.decoder_init_norm is not None:
        check_float(
            "decoder_init_norm", cfg.decoder_init_norm, minimum=0.0, strictly_above=True
        )
    check_bool("apply_b_dec_to_input", cfg.apply_b_dec_to_input)
    check_bool("clip_grad_norm", cfg.clip_grad_norm)
    check_bool("fused_optimizer", cfg.fused_optimizer)
    for name in (
        "freeze_decoder_in_aux",
        "l1_scale_by_decoder_norm",
        "unit_norm_decoder",
        "resample_dead",
    ):
        check_optional_bool(name, getattr(cfg, name))
    _check_resampling(cfg)


def warn_if_init_norm_ignored(decoder_init_norm: float | None) -> None:
    """Warn when a unit-norm decoder overrides an explicitly chosen ``decoder_init_norm``."""
    if decoder_init_norm not in (None, SAELENS_DECODER_INIT_NORM, 1.0):
        logger.warning(
            "decoder_init_norm=%s is ignored: unit_norm_decoder=True keeps decoder rows at "
            "norm 1, so they are initialized at norm 1.",
            decoder_init_norm,
        )


def _check_resampling(cfg: Any) -> None:
    check_int("resample_window", cfg.resample_window, minimum=1)
    check_int("resample_pool_size", cfg.resample_pool_size, minimum=1)
    check_optional_device("resample_pool_device", cfg.resample_pool_device)
    check_int("resample_lr_warmup_steps", cfg.resample_lr_warmup_steps, minimum=0)
    check_float(
        "resample_encoder_scale",
        cfg.resample_encoder_scale,
        minimum=0.0,
        strictly_above=True,
    )
    if cfg.resample_every is not None:
        check_int("resample_every", cfg.resample_every, minimum=1)
    if cfg.resample_steps is not None:
        check_int_list("resample_steps", cfg.resample_steps, minimum=1)
    if cfg.resample_steps is not None and cfg.resample_every is not None:
        raise GatedConfigError("Set resample_steps or resample_every, not both.")


def check_resampling_schedule(cfg: Any) -> None:
    """Check that every event comes a full window after the start and the previous one.

    Args:
        cfg: A config whose fields passed :func:`check_training_config` and whose recipe
            defaults (the default event steps) have been applied.
    """
    window = cfg.resample_window
    if cfg.resample_steps is not None:
        steps = cfg.resample_steps
        if not steps or any(b <= a for a, b in zip(steps, steps[1:])):
            raise GatedConfigError(
                f"resample_steps must be a non-empty, strictly increasing list, got {steps}."
            )
        gaps = [steps[0]] + [b - a for a, b in zip(steps, steps[1:])]
        if min(gaps) < window:
            raise GatedConfigError(
                f"resample_steps {steps} puts an event less than resample_window="
                f"{window} steps after the start of training or after the previous "
                "event; a feature can only be judged dead after a full window."
            )
    if cfg.resample_every is not None and cfg.resample_every < window:
        raise GatedConfigError(
            f"resample_every={cfg.resample_every} is shorter than resample_window="
            f"{window}; a feature can only be judged dead after a full window."
        )


def warn_if_from_builtin_config(cfg: Any) -> None:
    """Warn when ``cfg`` was rebuilt from a SAELens built-in gated config.

    SAELens records a training config's own fields in
    ``metadata.training_architecture_details``; a built-in config's record has no
    ``recipe``. Rebuilding such a config while the plugin is registered (SAELens's runner
    does this with a ``GatedTrainingSAEConfig`` object) gives the plugin's paper recipe.
    """
    details = getattr(cfg.metadata, "training_architecture_details", None)
    if isinstance(details, dict) and details and "recipe" not in details:
        logger.warning(
            "A SAELens built-in GatedTrainingSAEConfig was given while sae_lens_gated is "
            "registered: it trains the plugin's paper recipe (unit-norm decoder, plain L1, "
            "frozen auxiliary decoder, resampling), not the built-in gated SAE. For the "
            "built-in's behaviour use recipe='april_update', or call "
            "sae_lens_gated.unregister() before building the config."
        )


def warn_about_discouraged_combinations(cfg: Any) -> None:
    """Log what goes wrong with the combinations the authors advise against.

    Args:
        cfg: A config whose recipe defaults have been applied.
    """
    if (
        cfg.l1_scale_by_decoder_norm
        and cfg.freeze_decoder_in_aux
        and not cfg.unit_norm_decoder
    ):
        logger.warning(
            "Discouraged combination: l1_scale_by_decoder_norm=True with "
            "freeze_decoder_in_aux=True and a free decoder norm. The sparsity penalty "
            "shrinks decoder rows that the auxiliary loss cannot defend (its decoder is "
            "frozen), and the penalty on each gate shrinks with its row, so gates stay "
            "open: on transformer activations (d_sae 1536, lambda=1) it opened 1,251 gates "
            "where the paper recipe opens 165, at 3x the unexplained variance. Freeze the "
            "decoder in both terms (the paper recipe) or in neither (april_update)."
        )
    if not cfg.l1_scale_by_decoder_norm and not cfg.unit_norm_decoder:
        logger.warning(
            "Discouraged combination: l1_scale_by_decoder_norm=False with "
            "unit_norm_decoder=False. The plain L1 penalty can then be reduced by "
            "shrinking encoder outputs while growing decoder norms."
        )
    if cfg.resample_dead and not cfg.unit_norm_decoder:
        logger.warning(
            "Discouraged combination: resample_dead=True with unit_norm_decoder=False. "
            "Resampled decoder rows get unit norm while the other rows keep theirs."
        )


T_CONFIG = TypeVar("T_CONFIG", bound=SAEConfig)


def upgrade_config(cfg: SAEConfig, target: type[T_CONFIG]) -> T_CONFIG:
    """Rebuild a config (e.g. a built-in gated config) as ``target``, keeping shared fields."""
    if isinstance(cfg, target):
        return cfg
    return config_from_dict(target, cfg.to_dict())


def config_from_dict(target: type[T_CONFIG], config_dict: dict[str, Any]) -> T_CONFIG:
    """Build ``target`` from a config dict, whatever SAELens's registry says ``"gated"`` is."""
    architecture = config_dict.get("architecture", target.architecture())
    if architecture != target.architecture():
        raise ValueError(
            f"Config says architecture={architecture!r}, but {target.__name__} is for "
            f"{target.architecture()!r}."
        )
    valid = filter_valid_dataclass_fields(config_dict, target)
    if "metadata" in config_dict:
        valid["metadata"] = SAEMetadata(**config_dict["metadata"])
    return target(**valid)

"""Gated SAE of Rajamanoharan et al. 2024 (arXiv 2404.16014), trained as the paper specifies.

The classes here subclass SAELens's built-in gated classes, so every ``isinstance`` and
``issubclass`` check inside SAELens accepts them, and they save the same six tensors
(``W_enc``, ``W_dec``, ``b_dec``, ``b_gate``, ``b_mag``, ``r_mag``) under ``"architecture":
"gated"``, so vanilla SAELens loads what they write.

What differs from the built-in:

- The encoder matmul is computed once and shared by the gate path, the magnitude path
  (``pi_mag = pre * exp(r_mag) + b_mag``) and the auxiliary loss; ``W_enc * exp(r_mag)`` is
  never materialized.
- Training follows paper App. G by default (``recipe="paper"``): plain L1 on
  ``ReLU(pi_gate)``, decoder frozen (stop-gradient) in the auxiliary reconstruction, and
  decoder rows kept at unit norm. ``recipe="april_update"`` reproduces SAELens's built-in
  gated training exactly.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
import wandb
from numpy.typing import NDArray
from sae_lens.saes.gated_sae import GatedSAE as _BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as _BuiltinGatedSAEConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE as _BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as _BuiltinGatedTrainingSAEConfig,
)
from sae_lens.saes.sae import (
    SAEConfig,
    SAEMetadata,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.util import filter_valid_dataclass_fields
from safetensors.torch import load_file, save_file
from typing_extensions import override

from sae_lens_gated.metrics import relative_reconstruction_bias_tensor
from sae_lens_gated.saes.gated_encoder import (
    GatedEncoding,
    encode_gated,
    encode_gated_features,
)
from sae_lens_gated.training.batch_guard import BatchGuard
from sae_lens_gated.training.grad_clip import GradientClipUndo
from sae_lens_gated.training.optimizer_hooks import attach_to_optimizer_steps
from sae_lens_gated.training.resampling import (
    DeadFeatureResampler,
    ParameterSlice,
    ResamplingSchedule,
)

logger = logging.getLogger(__name__)

Recipe = Literal["paper", "april_update"]
WeightTying = Literal["r_mag", "none"]

T_CONFIG = TypeVar("T_CONFIG", bound=SAEConfig)


@dataclass(frozen=True)
class GatedRecipe:
    """Values a training recipe gives the config fields that are left unset.

    Args:
        freeze_decoder_in_aux: Stop gradients from the auxiliary loss into ``W_dec`` and the
            decoder-side ``b_dec``.
        l1_scale_by_decoder_norm: Weight each feature's sparsity penalty by its decoder row norm.
        unit_norm_decoder: Keep every ``W_dec`` row at exactly unit norm during training.
        decoder_init_norm: Norm of the ``W_dec`` rows at initialisation.
        resample_dead: Resample dead features at scheduled steps.
    """

    freeze_decoder_in_aux: bool
    l1_scale_by_decoder_norm: bool
    unit_norm_decoder: bool
    decoder_init_norm: float
    resample_dead: bool


RECIPES: dict[str, GatedRecipe] = {
    # Paper §3.2.2, App. D.1 and App. G.
    "paper": GatedRecipe(
        freeze_decoder_in_aux=True,
        l1_scale_by_decoder_norm=False,
        unit_norm_decoder=True,
        decoder_init_norm=1.0,
        resample_dead=True,
    ),
    # The authors' April 2024 follow-up (a norm-weighted penalty instead of the unit-norm
    # constraint, decoder trainable in both terms); this is what SAELens's built-in trains.
    "april_update": GatedRecipe(
        freeze_decoder_in_aux=False,
        l1_scale_by_decoder_norm=True,
        unit_norm_decoder=False,
        decoder_init_norm=0.1,
        resample_dead=False,
    ),
}

_WEIGHT_TYING_OPTIONS = ("r_mag", "none")

RESAMPLER_STATE_FILENAME = "gated_resampler_state.safetensors"

# Bricken et al. 2023 ("Neuron Resampling"): events at these steps, 12,500-step window.
DEFAULT_RESAMPLE_STEPS = (25_000, 50_000, 75_000, 100_000)


def _upgrade_config(cfg: SAEConfig, target: type[T_CONFIG]) -> T_CONFIG:
    """Rebuild a config (e.g. a built-in gated config) as ``target``, keeping shared fields."""
    if isinstance(cfg, target):
        return cfg
    return _config_from_dict(target, cfg.to_dict())


def _config_from_dict(target: type[T_CONFIG], config_dict: dict[str, Any]) -> T_CONFIG:
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


@dataclass
class GatedSAEConfig(_BuiltinGatedSAEConfig):
    """Configuration for an inference :class:`GatedSAE` (same fields as SAELens's)."""

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "GatedSAEConfig":
        # Resolve to this class whether or not the plugin is registered with SAELens.
        return _config_from_dict(cls, config_dict)


class GatedSAE(_BuiltinGatedSAE):
    """Inference Gated SAE whose encoder shares one matmul between gate and magnitude."""

    config_class: ClassVar[type[GatedSAEConfig]] = GatedSAEConfig

    def __init__(self, cfg: _BuiltinGatedSAEConfig, use_error_term: bool = False):
        super().__init__(_upgrade_config(cfg, self.config_class), use_error_term)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` into gated feature activations ``1[pi_gate > 0] * ReLU(pi_mag)``."""
        return encode_gated_features(self, x)

    @override
    @classmethod
    def get_sae_class_for_architecture(cls, architecture: str) -> type["GatedSAE"]:
        # Resolve this class's own architecture to itself, registered or not.
        if architecture == cls.config_class.architecture():
            return cls
        return super().get_sae_class_for_architecture(architecture)

    @override
    @classmethod
    def get_sae_config_class_for_architecture(
        cls, architecture: str
    ) -> type[SAEConfig]:
        if architecture == cls.config_class.architecture():
            return cls.config_class
        return super().get_sae_config_class_for_architecture(architecture)


@dataclass
class GatedTrainingSAEConfig(_BuiltinGatedTrainingSAEConfig):
    """Configuration for training a Gated SAE as arXiv 2404.16014 specifies.

    Fields marked "recipe default" are resolved from ``recipe`` when the config is built, so
    a saved config always records the values that were used. The inherited
    ``l1_coefficient`` (lambda, applied to ``ReLU(pi_gate)``) and ``l1_warm_up_steps``
    (linear warm-up of lambda from 0 by SAELens's coefficient scheduler) work as in SAELens.

    Args:
        recipe: ``"paper"`` (App. D.1 and G: plain L1 on ``ReLU(pi_gate)``, decoder frozen in
            the auxiliary loss, unit-norm decoder rows) or ``"april_update"`` (the authors'
            later variant: L1 weighted by decoder norms, trainable decoder everywhere, no
            norm constraint; identical to SAELens's built-in gated training).
        aux_coefficient: Weight of the auxiliary reconstruction loss (1.0 in the paper).
        freeze_decoder_in_aux: Recipe default (paper True, april_update False). Stop gradients
            from the auxiliary loss into ``W_dec`` and the decoder-side ``b_dec`` (paper
            §3.2.2; the centering ``b_dec`` still receives gradient, as in App. G).
        l1_scale_by_decoder_norm: Recipe default (paper False, april_update True). Multiply
            each feature's penalty by ``||W_dec[i]||``.
        unit_norm_decoder: Recipe default (paper True, april_update False). Keep every
            ``W_dec`` row at unit norm: the gradient component parallel to each row is removed
            before each optimizer step and rows are renormalized after it.
        decoder_init_norm: Recipe default (paper 1.0, april_update 0.1). Norm of the random
            ``W_dec`` rows at initialisation (``W_enc = W_dec.T``; biases and ``r_mag`` start at
            0). Forced to 1.0 when ``unit_norm_decoder`` is True.
        weight_tying: ``"r_mag"`` (paper: ``W_mag = exp(r_mag) * W_gate``) or ``"none"``, which
            freezes ``r_mag`` at 0 (the paper's "no r_mag" ablation).
        clip_grad_norm: SAELens's trainer always clips the global gradient norm to 1.0 (the
            paper does not clip). With False the unclipped gradient is restored just before
            each optimizer step, which matches the paper.
        resample_dead: Recipe default (paper True, april_update False). Resample dead
            features (Bricken et al. 2023, paper App. D.1) at scheduled events.
        resample_steps: Event steps, counted in completed training steps. With neither this
            nor ``resample_every`` set, Bricken et al.'s 25k/50k/75k/100k is used.
        resample_every: Event period in steps (instead of ``resample_steps``).
        resample_window: A feature is dead at an event if it has not fired in this many
            preceding training steps (Bricken et al.: 12,500). Events must be at least this
            many steps after the start and after each other.
        resample_pool_size: Recent training inputs kept to sample new directions from
            (Bricken et al.: 819,200). They are only held during the last
            ``ceil(pool / batch)`` steps before an event: ``pool x d_in`` values of memory.
        resample_encoder_scale: New encoder columns get this times the mean encoder column
            norm of the alive features (Bricken et al.: 0.2).
        resample_lr_warmup_steps: After an event the learning rate restarts at 0.1x its
            scheduled value and returns to it on a cosine over this many steps (paper App.
            D.1: 1000; 0 turns the re-warm off).
    """

    recipe: Recipe = "paper"
    aux_coefficient: float = 1.0
    freeze_decoder_in_aux: bool | None = None
    l1_scale_by_decoder_norm: bool | None = None
    unit_norm_decoder: bool | None = None
    decoder_init_norm: float | None = None
    weight_tying: WeightTying = "r_mag"
    clip_grad_norm: bool = True
    resample_dead: bool | None = None
    resample_steps: list[int] | None = None
    resample_every: int | None = None
    resample_window: int = 12_500
    resample_pool_size: int = 819_200
    resample_encoder_scale: float = 0.2
    resample_lr_warmup_steps: int = 1000

    @override
    def __post_init__(self) -> None:
        self._validate()
        self._apply_recipe_defaults()
        self._validate_resampling()
        self._warn_about_discouraged_combinations()
        super().__post_init__()

    def _validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(
                f"Unknown recipe {self.recipe!r}: expected one of {sorted(RECIPES)}."
            )
        if self.weight_tying not in _WEIGHT_TYING_OPTIONS:
            raise ValueError(
                f"Unknown weight_tying {self.weight_tying!r}: expected one of "
                f"{list(_WEIGHT_TYING_OPTIONS)}."
            )
        for name in ("l1_coefficient", "aux_coefficient"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}.")
        if self.l1_warm_up_steps < 0:
            raise ValueError(
                f"l1_warm_up_steps must be >= 0, got {self.l1_warm_up_steps}."
            )
        if self.decoder_init_norm is not None and not self.decoder_init_norm > 0:
            raise ValueError(
                f"decoder_init_norm must be > 0, got {self.decoder_init_norm}."
            )

    def _validate_resampling(self) -> None:
        for name in ("resample_window", "resample_pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.resample_every is not None and self.resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {self.resample_every}.")
        if self.resample_lr_warmup_steps < 0:
            raise ValueError(
                f"resample_lr_warmup_steps must be >= 0, got {self.resample_lr_warmup_steps}."
            )
        if not (
            math.isfinite(self.resample_encoder_scale)
            and self.resample_encoder_scale > 0
        ):
            raise ValueError(
                f"resample_encoder_scale must be finite and > 0, got {self.resample_encoder_scale}."
            )
        if self.resample_steps is not None and self.resample_every is not None:
            raise ValueError("Set resample_steps or resample_every, not both.")
        if self.resample_steps is not None:
            steps = list(self.resample_steps)
            if not steps or any(b <= a for a, b in zip(steps, steps[1:])):
                raise ValueError(
                    f"resample_steps must be a non-empty, strictly increasing list, got {steps}."
                )
            gaps = [steps[0]] + [b - a for a, b in zip(steps, steps[1:])]
            if min(gaps) < self.resample_window:
                raise ValueError(
                    f"resample_steps {steps} puts an event less than resample_window="
                    f"{self.resample_window} steps after the start of training or after "
                    "the previous event; a feature can only be judged dead after a full window."
                )
        if (
            self.resample_every is not None
            and self.resample_every < self.resample_window
        ):
            raise ValueError(
                f"resample_every={self.resample_every} is shorter than resample_window="
                f"{self.resample_window}; a feature can only be judged dead after a full window."
            )

    def _apply_recipe_defaults(self) -> None:
        recipe = RECIPES[self.recipe]
        for recipe_field in fields(recipe):
            if getattr(self, recipe_field.name) is None:
                setattr(self, recipe_field.name, getattr(recipe, recipe_field.name))
        if (
            self.resample_dead
            and self.resample_steps is None
            and self.resample_every is None
        ):
            self.resample_steps = list(DEFAULT_RESAMPLE_STEPS)
        if self.unit_norm_decoder and self.decoder_init_norm != 1.0:
            logger.warning(
                "decoder_init_norm=%s is ignored: unit_norm_decoder=True keeps decoder "
                "rows at norm 1, so they are initialised at norm 1.",
                self.decoder_init_norm,
            )
            self.decoder_init_norm = 1.0

    def _warn_about_discouraged_combinations(self) -> None:
        # Both combinations are called out in the authors' April 2024 comments (gated-sae
        # paper reference, B2): they let the sparsity penalty be gamed or trained inconsistently.
        if self.l1_scale_by_decoder_norm and self.freeze_decoder_in_aux:
            logger.warning(
                "Discouraged combination: l1_scale_by_decoder_norm=True with "
                "freeze_decoder_in_aux=True. The authors advise freezing the decoder in both "
                "the sparsity penalty and the auxiliary loss, or in neither."
            )
        if not self.l1_scale_by_decoder_norm and not self.unit_norm_decoder:
            logger.warning(
                "Discouraged combination: l1_scale_by_decoder_norm=False with "
                "unit_norm_decoder=False. The plain L1 penalty can then be reduced by "
                "shrinking encoder outputs while growing decoder norms."
            )
        if self.resample_dead and not self.unit_norm_decoder:
            logger.warning(
                "Discouraged combination: resample_dead=True with unit_norm_decoder=False. "
                "Resampled decoder rows get unit norm while the other rows keep theirs."
            )

    def resampling_schedule(self) -> ResamplingSchedule:
        """The resampling settings of this config, for :class:`DeadFeatureResampler`."""
        return ResamplingSchedule(
            event_steps=tuple(self.resample_steps or ()),
            every=self.resample_every,
            window=self.resample_window,
            pool_size=self.resample_pool_size,
            encoder_scale=self.resample_encoder_scale,
            lr_warmup_steps=self.resample_lr_warmup_steps,
        )

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "GatedTrainingSAEConfig":
        # Resolve to this class whether or not the plugin is registered with SAELens.
        return _config_from_dict(cls, config_dict)

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return GatedSAEConfig


class GatedTrainingSAE(_BuiltinGatedTrainingSAE):
    """Gated SAE for training with SAELens's ``SAETrainer`` and runners.

    Losses (per example, averaged over the batch; App. G):

    - ``mse_loss``: ``||x - x_hat||^2`` with ``x_hat = f @ W_dec + b_dec``;
    - ``l1_loss``: ``lambda * ||ReLU(pi_gate)||_1`` (times ``||W_dec[i]||`` per feature if
      ``l1_scale_by_decoder_norm``);
    - ``auxiliary_reconstruction_loss``: ``aux_coefficient * ||x - (ReLU(pi_gate) @ sg(W_dec)
      + sg(b_dec))||^2`` (without ``sg`` unless ``freeze_decoder_in_aux``).

    A built-in ``GatedTrainingSAEConfig`` passed in is upgraded to this plugin's config, with
    the plugin's recipe defaults for fields it does not have.
    """

    cfg: GatedTrainingSAEConfig  # pyright: ignore[reportIncompatibleVariableOverride]
    config_class: ClassVar[type[GatedTrainingSAEConfig]] = GatedTrainingSAEConfig

    def __init__(
        self, cfg: _BuiltinGatedTrainingSAEConfig, use_error_term: bool = False
    ):
        super().__init__(_upgrade_config(cfg, self.config_class), use_error_term)
        self._batch_guard = BatchGuard()
        self.resampler: DeadFeatureResampler | None = None
        if self.cfg.resample_dead:
            seed = int(torch.randint(0, 2**62, ()).item())
            self.resampler = DeadFeatureResampler(
                self.cfg.resampling_schedule(), self.cfg.d_sae, seed
            )
        self._clip_undo = None if self.cfg.clip_grad_norm else GradientClipUndo()
        if self._clip_undo is not None:
            self._clip_undo.attach(self.parameters())
        self._logging_step: int | None = None
        self._scheduled_lrs: list[tuple[dict[str, Any], float]] = []
        attach_to_optimizer_steps(self)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        if self.cfg.weight_tying == "none":
            self.r_mag.requires_grad_(False)

    @property
    def _uses_r_mag(self) -> bool:
        return self.cfg.weight_tying == "r_mag"

    def encode_for_loss(self, x: torch.Tensor, decode: bool = False) -> GatedEncoding:
        """Run the encoder (and with ``decode`` both decoders) for the training losses."""
        weights = self.W_dec.norm(dim=1) if self.cfg.l1_scale_by_decoder_norm else None
        return encode_gated(
            self,
            x,
            use_r_mag=self._uses_r_mag,
            penalty_weights=weights,
            decode=decode,
            aux_decoder_trainable=not self.cfg.freeze_decoder_in_aux,
        )

    @override
    def encode_with_hidden_pre(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoding = self.encode_for_loss(x)
        return encoding.feature_acts, encoding.magnitude_pre

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_gated_features(self, x, use_r_mag=self._uses_r_mag)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._batch_guard.check(step_input.sae_in)
        encoding = self.encode_for_loss(step_input.sae_in, decode=True)
        if encoding.reconstruction is None:
            sae_out = self.decode(encoding.feature_acts)
        else:
            sae_out = self.run_time_activation_norm_fn_out(
                self.hook_sae_recons(encoding.reconstruction)
            )
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        gate_losses = self.gate_losses(encoding, step_input.coefficients)
        total_loss = mse_loss
        for value in gate_losses.values():
            total_loss = total_loss + value
        if self.resampler is not None:
            self.resampler.observe(step_input.sae_in, encoding.feature_acts)
        self._logging_step = (
            step_input.n_training_steps if step_input.is_logging_step else None
        )
        metrics: dict[str, Any] = {}
        if step_input.is_logging_step:
            with torch.no_grad():
                metrics["relative_reconstruction_bias"] = (
                    relative_reconstruction_bias_tensor(step_input.sae_in, sae_out)
                )
                metrics["gate_l0"] = (encoding.gate_acts > 0).float().sum(-1).mean()
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=encoding.feature_acts,
            hidden_pre=encoding.magnitude_pre,
            loss=total_loss,
            losses={"mse_loss": mse_loss, **gate_losses},
            metrics=metrics,
        )

    def gate_losses(
        self, encoding: GatedEncoding, coefficients: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Sparsity penalty and auxiliary reconstruction loss, both driven by ``pi_gate``.

        Args:
            encoding: Output of :meth:`encode_for_loss` for the batch.
            coefficients: Current coefficient values from SAELens's schedulers (``"l1"``).
        """
        n_examples = encoding.gate_acts.numel() // self.cfg.d_sae
        l1_loss = coefficients["l1"] * encoding.penalty / n_examples

        via_gate_reconstruction = encoding.aux_reconstruction
        if via_gate_reconstruction is None:
            W_dec, b_dec = self.W_dec, self.b_dec
            if self.cfg.freeze_decoder_in_aux:
                W_dec, b_dec = W_dec.detach(), b_dec.detach()
            via_gate_reconstruction = encoding.gate_acts @ W_dec + b_dec
        aux_loss = (via_gate_reconstruction - encoding.sae_in).pow(2).sum(dim=-1).mean()
        return {
            "l1_loss": l1_loss,
            "auxiliary_reconstruction_loss": self.cfg.aux_coefficient * aux_loss,
        }

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return self.gate_losses(
            self.encode_for_loss(step_input.sae_in), step_input.coefficients
        )

    @torch.no_grad()
    def per_example_reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """``||x - x_hat||^2`` per example (the loss resampling weights inputs by)."""
        return (self.decode(self.encode(x)) - x.to(self.dtype)).pow(2).sum(dim=-1)

    @torch.no_grad()
    def centered_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the encoder sees it before the matmul (processed, minus ``b_dec``)."""
        return self.process_sae_in(x)

    @torch.no_grad()
    def reinitialize_features(
        self,
        idx: torch.Tensor,
        directions: torch.Tensor,
        alive: torch.Tensor,
        encoder_scale: float,
    ) -> list[ParameterSlice]:
        """Restart features ``idx`` along unit ``directions`` (dead-feature resampling).

        The decoder rows become the directions; the columns of every encoder matrix point the
        same way with ``encoder_scale`` times that matrix's mean column norm over the
        ``alive`` features; the gate and magnitude biases and ``r_mag`` become 0, so both paths
        start identical.

        Args:
            idx: Indices of the features to restart.
            directions: Unit vectors, one row per feature in ``idx``.
            alive: Boolean mask of the features that are not being restarted.
            encoder_scale: Relative norm of the new encoder columns (Bricken et al.: 0.2).

        Returns:
            The ``(parameter, index)`` slices written, whose optimizer state must be reset.
        """
        self.W_dec.data[idx] = directions
        written: list[ParameterSlice] = [(self.W_dec, (idx,))]
        for encoder in self.encoder_matrices():
            norms = encoder.norm(dim=0)
            mean_norm = norms[alive].mean() if alive.any() else norms.mean()
            encoder.data[:, idx] = (directions * encoder_scale * mean_norm).T
            written.append((encoder, (slice(None), idx)))
        for bias in self.per_feature_encoder_parameters():
            bias.data[idx] = 0
            written.append((bias, (idx,)))
        return written

    def encoder_matrices(self) -> tuple[torch.nn.Parameter, ...]:
        """The ``(d_in, d_sae)`` encoder matrices (the untied ablation has two)."""
        return (self.W_enc,)

    def per_feature_encoder_parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """The ``(d_sae,)`` encoder-side parameters, which a restarted feature resets to 0."""
        return (self.b_gate, self.b_mag, self.r_mag)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called just before an optimizer holding this SAE's parameters steps.

        In order: raise on a non-finite training batch before it can reach the weights;
        restore gradients clipped by the training loop (``clip_grad_norm=False``); remove
        the gradient component parallel to each decoder row (``unit_norm_decoder``); apply
        the learning-rate re-warm after a resampling event.
        """
        self._batch_guard.raise_if_bad()
        if self._clip_undo is not None:
            self._clip_undo.restore(list(self.parameters()))
        if self.cfg.unit_norm_decoder:
            remove_parallel_decoder_grad(self.W_dec)
        factor = 1.0 if self.resampler is None else self.resampler.lr_factor()
        if factor != 1.0:
            own = {id(p) for p in self.parameters()}
            for group in optimizer.param_groups:
                if any(id(p) in own for p in group["params"]):
                    self._scheduled_lrs.append((group, group["lr"]))
                    group["lr"] = group["lr"] * factor

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called just after an optimizer holding this SAE's parameters stepped.

        Puts back the scheduled learning rate (so LR schedulers see their own value),
        renormalizes decoder rows, and runs a resampling event if one is due.
        """
        for group, lr in self._scheduled_lrs:
            group["lr"] = lr
        self._scheduled_lrs.clear()
        if self.cfg.unit_norm_decoder:
            normalize_decoder_rows(self.W_dec)
        if self.resampler is not None:
            self.resampler.step_completed(self, optimizer)
            self._log_resampling()

    def _log_resampling(self) -> None:
        # SAELens's trainer prefixes TrainStepOutput.metrics with "metrics/", so the
        # resampling counters go to its W&B run directly, at its logging steps.
        if self._logging_step is None or self.resampler is None or wandb.run is None:
            return
        wandb.log(
            {
                "resampling/n_resampled": self.resampler.n_resampled,
                "resampling/n_events": self.resampler.n_events,
                "resampling/lr_factor": self.resampler.lr_factor(),
            },
            step=self._logging_step,
        )

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        weights_path, cfg_path = super().save_model(path)
        if self.resampler is not None:
            save_file(
                self.resampler.state_dict(), Path(path) / RESAMPLER_STATE_FILENAME
            )
        return weights_path, cfg_path

    @override
    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        super().load_weights_from_checkpoint(checkpoint_path)
        state_path = Path(checkpoint_path) / RESAMPLER_STATE_FILENAME
        if self.resampler is None:
            return
        if not state_path.exists():
            logger.warning(
                "%s has no %s: resampling restarts its schedule from step 0.",
                checkpoint_path,
                RESAMPLER_STATE_FILENAME,
            )
            return
        try:
            state = load_file(state_path)
        except Exception as error:
            raise ValueError(
                f"Could not read resampler state {state_path}: {error}"
            ) from error
        self.resampler.load_state_dict(state, device=self.W_dec.device)

    @override
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign and self._clip_undo is not None:
            self._clip_undo.attach(self.parameters())  # parameter objects were replaced
        return result

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, NDArray[Any]]:
        # float64: numpy cannot cut 64 bins out of float32 values that lie within a few ulps
        # of each other, which is what unit-norm decoder rows do.
        values = self.histogram_tensors()
        return {k: v.detach().double().cpu().numpy() for k, v in values.items()}

    def histogram_tensors(self) -> dict[str, torch.Tensor]:
        """The per-feature values :meth:`log_histograms` sends to W&B, by name."""
        return {
            "weights/W_dec_norms": self.W_dec.norm(dim=1),
            "weights/b_gate": self.b_gate,
            "weights/b_mag": self.b_mag,
            "weights/r_mag": self.r_mag,
        }

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        if self.cfg.unit_norm_decoder and "W_dec" in state_dict:
            _fold_decoder_norms_into_state_dict(state_dict)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        if not self.cfg.unit_norm_decoder:
            super().fold_activation_norm_scaling_factor(scaling_factor)
            return
        # Fold the factor into the biases so the decoder keeps unit-norm rows and feature
        # activations come out in the units of the raw activations.
        for bias in (self.b_dec, self.b_gate, self.b_mag):
            bias.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    @override
    @classmethod
    def get_sae_class_for_architecture(
        cls, architecture: str
    ) -> type["GatedTrainingSAE"]:
        # Resolve this class's own architecture to itself, registered or not.
        if architecture == cls.config_class.architecture():
            return cls
        return super().get_sae_class_for_architecture(architecture)

    @override
    @classmethod
    def get_sae_config_class_for_architecture(
        cls, architecture: str
    ) -> type[TrainingSAEConfig]:
        if architecture == cls.config_class.architecture():
            return cls.config_class
        return super().get_sae_config_class_for_architecture(architecture)


@torch.no_grad()
def remove_parallel_decoder_grad(W_dec: torch.Tensor) -> None:
    """Project each ``W_dec`` row's gradient onto the tangent space of its row sphere."""
    if W_dec.grad is None:
        return
    parallel = (W_dec.grad * W_dec).sum(dim=1, keepdim=True) / (
        W_dec.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)
    )
    W_dec.grad.sub_(parallel * W_dec)


@torch.no_grad()
def normalize_decoder_rows(W_dec: torch.Tensor) -> None:
    """Rescale every ``W_dec`` row to unit norm, in place (keeps optimizer state bound)."""
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def _fold_decoder_norms_into_state_dict(state_dict: dict[str, Any]) -> None:
    # A decoder with non-unit rows (e.g. trained with the april_update recipe) is brought to
    # unit norm without changing the function: each row's norm moves into the encoder side.
    norms = state_dict["W_dec"].norm(dim=1).clamp_min(1e-12)
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-6):
        return
    state_dict["W_dec"] = state_dict["W_dec"] / norms[:, None]
    for key in ("W_enc", "W_mag"):  # W_mag: the untied ablation's magnitude encoder
        if key in state_dict:
            state_dict[key] = state_dict[key] * norms[None, :]
    state_dict["b_gate"] = state_dict["b_gate"] * norms
    state_dict["b_mag"] = state_dict["b_mag"] * norms

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
  gated training.
- All three loss terms are computed in the space the SAE works in (after run-time
  normalization), so the paper's 1:1 weighting of the two reconstructions holds.

The per-step work around the optimizer (unit norm, resampling, ...) is not here: it lives in
:class:`~sae_lens_gated.training.conventions.TrainingConventions`, which the training SAE owns.
"""

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from numpy.typing import NDArray
from sae_lens.saes.gated_sae import GatedSAE as _BuiltinGatedSAE
from sae_lens.saes.gated_sae import GatedSAEConfig as _BuiltinGatedSAEConfig
from sae_lens.saes.gated_sae import GatedTrainingSAE as _BuiltinGatedTrainingSAE
from sae_lens.saes.gated_sae import (
    GatedTrainingSAEConfig as _BuiltinGatedTrainingSAEConfig,
)
from sae_lens.saes.sae import (
    SAEConfig,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from typing_extensions import override

from sae_lens_gated.saes import gated_sparse
from sae_lens_gated.saes.gated_encoder import (
    GatedEncoding,
    decode_gated,
    encode_gated,
    encode_gated_features,
)
from sae_lens_gated.saes.gated_recipes import (
    DEFAULT_RESAMPLE_STEPS,
    RECIPES,
    Recipe,
    SparseStep,
    WeightTying,
    check_resampling_schedule,
    check_training_config,
    config_from_dict,
    upgrade_config,
    warn_about_discouraged_combinations,
    warn_if_from_builtin_config,
    warn_if_init_norm_ignored,
)
from sae_lens_gated.training.conventions import TrainingConventions
from sae_lens_gated.training.resampling import ResamplingSchedule

logger = logging.getLogger(__name__)


@dataclass
class GatedSAEConfig(_BuiltinGatedSAEConfig):
    """Configuration for an inference :class:`GatedSAE` (same fields as SAELens's)."""

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "GatedSAEConfig":
        # Resolve to this class whether or not the plugin is registered with SAELens.
        return config_from_dict(cls, config_dict)


class GatedSAE(_BuiltinGatedSAE):
    """Inference Gated SAE whose encoder shares one matmul between gate and magnitude."""

    config_class: ClassVar[type[GatedSAEConfig]] = GatedSAEConfig

    def __init__(self, cfg: _BuiltinGatedSAEConfig, use_error_term: bool = False):
        super().__init__(upgrade_config(cfg, self.config_class), use_error_term)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` into gated feature activations ``1[pi_gate > 0] * ReLU(pi_mag)``."""
        return encode_gated_features(self, x)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """SAELens's decode, on the nonzero features when cheaper (see ``decode_gated``)."""
        return decode_gated(self, feature_acts)

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
    ``l1_coefficient`` (lambda, applied to ``ReLU(pi_gate)``), ``l1_warm_up_steps`` (linear
    warm-up of lambda from 0 by SAELens's coefficient scheduler) and ``decoder_init_norm``
    (norm of the random initial ``W_dec`` rows; None keeps SAELens's unscaled init) work as
    in SAELens; with ``unit_norm_decoder`` the rows start, and stay, at norm 1.

    Args:
        recipe: ``"paper"`` (App. D.1 and G: plain L1 on ``ReLU(pi_gate)``, decoder frozen in
            the auxiliary loss, unit-norm decoder rows, resampling) or ``"april_update"``
            (the authors' later variant: L1 weighted by decoder norms, trainable decoder
            everywhere, no norm constraint, no resampling; SAELens's built-in gated training).
        aux_coefficient: Weight of the auxiliary reconstruction loss (1.0 in the paper).
        freeze_decoder_in_aux: Recipe default (paper True, april_update False). Stop gradients
            from the auxiliary loss into ``W_dec`` and the decoder-side ``b_dec`` (paper
            §3.2.2; the centering ``b_dec`` still receives gradient, as in App. G).
        l1_scale_by_decoder_norm: Recipe default (paper False, april_update True). Multiply
            each feature's penalty by ``||W_dec[i]||``.
        unit_norm_decoder: Recipe default (paper True, april_update False). Keep every
            ``W_dec`` row at unit norm: the gradient component parallel to each row is removed
            before each optimizer step and rows are renormalized after it.
        weight_tying: ``"r_mag"`` (paper: ``W_mag = exp(r_mag) * W_gate``) or ``"none"``, which
            freezes ``r_mag`` (at 0 from initialization: the paper's "no r_mag" ablation).
            A frozen ``r_mag`` is still applied, so loaded non-zero values act everywhere.
        clip_grad_norm: SAELens's trainer always clips the global gradient norm to 1.0; the
            paper does not clip. True (default) keeps SAELens's clipping, which helped short
            runs; False restores the unclipped gradient just before each optimizer step, as
            in the paper.
        fused_optimizer: Step an Adam or AdamW whose param groups hold only this SAE's
            parameters (SAELens's trainer builds one) as PyTorch's fused kernel, one pass
            over each weight and its moments, on the CPU and on CUDA: the same update as
            PyTorch's default Adam (to float32 rounding), 8-17x faster on a CPU (see
            :mod:`~sae_lens_gated.training.fused_adam`). False keeps the optimizer as it
            was built, and gives a run resumed from a checkpoint of a fused run PyTorch's
            default Adam back.
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
        resample_pool_device: Where those inputs are kept: ``"cpu"`` (default: host
            memory, so an accelerator's memory holds none of them; they are copied to the
            SAE's device in chunks when an event scores them), any other torch device, or
            None (``"None"`` on a command line) for the SAE's own device.
        resample_encoder_scale: New encoder columns get this times the mean encoder column
            norm of the alive features (Bricken et al.: 0.2).
        resample_lr_warmup_steps: After an event the learning rate restarts at 0.1x its
            scheduled value and returns to it on a cosine over this many steps (paper App.
            D.1: 1000; 0 turns the re-warm off).
        sparse_step: ``"auto"`` chooses between a dense training step and one on the open
            gates only (everything after the one dense encoder matmul) by timing both on
            the device that trains, once a step opens at most a tenth of the gates (see
            :mod:`~sae_lens_gated.training.sparse_policy`); ``"always"`` and ``"never"``
            force one or the other. Same losses and gradients either way.
    """

    recipe: Recipe = "paper"
    aux_coefficient: float = 1.0
    freeze_decoder_in_aux: bool | None = None
    l1_scale_by_decoder_norm: bool | None = None
    unit_norm_decoder: bool | None = None
    weight_tying: WeightTying = "r_mag"
    clip_grad_norm: bool = True
    fused_optimizer: bool = True
    resample_dead: bool | None = None
    resample_steps: list[int] | None = None
    resample_every: int | None = None
    resample_window: int = 12_500
    resample_pool_size: int = 819_200
    resample_pool_device: str | None = "cpu"
    resample_encoder_scale: float = 0.2
    resample_lr_warmup_steps: int = 1000
    sparse_step: SparseStep = "auto"

    @override
    def __post_init__(self) -> None:
        # A command line hands over None as the string "None".
        if str(self.resample_pool_device).lower() == "none":
            self.resample_pool_device = None
        check_training_config(self, RECIPES)
        warn_if_from_builtin_config(self)
        recipe = RECIPES[self.recipe]
        for recipe_field in fields(recipe):
            if getattr(self, recipe_field.name) is None:
                setattr(self, recipe_field.name, getattr(recipe, recipe_field.name))
        if self.resample_dead and (self.resample_steps, self.resample_every) == (
            None,
            None,
        ):
            self.resample_steps = list(DEFAULT_RESAMPLE_STEPS)
        check_resampling_schedule(self)
        if self.unit_norm_decoder:
            warn_if_init_norm_ignored(self.decoder_init_norm)
            self.decoder_init_norm = 1.0
        warn_about_discouraged_combinations(self)
        super().__post_init__()

    def resampling_schedule(self) -> ResamplingSchedule:
        """The resampling settings of this config, for the dead-feature resampler."""
        return ResamplingSchedule(
            event_steps=tuple(self.resample_steps or ()),
            every=self.resample_every,
            window=self.resample_window,
            pool_size=self.resample_pool_size,
            encoder_scale=self.resample_encoder_scale,
            lr_warmup_steps=self.resample_lr_warmup_steps,
            pool_device=self.resample_pool_device,
        )

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "GatedTrainingSAEConfig":
        # Resolve to this class whether or not the plugin is registered with SAELens.
        return config_from_dict(cls, config_dict)

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return GatedSAEConfig


class GatedTrainingSAE(_BuiltinGatedTrainingSAE):
    """Gated SAE for training with SAELens's ``SAETrainer`` and runners.

    Losses (per example, averaged over the batch; App. G), all in the SAE's input space
    after run-time normalization:

    - ``mse_loss``: ``||x - x_hat||^2`` with ``x_hat = f @ W_dec + b_dec``;
    - ``l1_loss``: ``lambda * ||ReLU(pi_gate)||_1`` (times ``||W_dec[i]||`` per feature if
      ``l1_scale_by_decoder_norm``);
    - ``auxiliary_reconstruction_loss``: ``aux_coefficient * ||x - (ReLU(pi_gate) @ sg(W_dec)
      + sg(b_dec))||^2`` (without ``sg`` unless ``freeze_decoder_in_aux``).

    A built-in ``GatedTrainingSAEConfig`` passed in is upgraded to this plugin's config, with
    the plugin's recipe defaults for fields it does not have (and a warning).

    Attributes:
        conventions: The per-step training machinery (unit norm, resampling, LR re-warm,
            gradient-clip undo, non-finite guard, extra metrics).
    """

    cfg: GatedTrainingSAEConfig  # pyright: ignore[reportIncompatibleVariableOverride]
    config_class: ClassVar[type[GatedTrainingSAEConfig]] = GatedTrainingSAEConfig

    def __init__(
        self, cfg: _BuiltinGatedTrainingSAEConfig, use_error_term: bool = False
    ):
        super().__init__(upgrade_config(cfg, self.config_class), use_error_term)
        self.conventions = TrainingConventions(self)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        if self.cfg.weight_tying == "none":
            self.r_mag.requires_grad_(False)

    def encode_for_loss(
        self, x: torch.Tensor, decode: bool = False, sparse: bool = False
    ) -> GatedEncoding:
        """The encoder (with ``decode`` both decoders; ``sparse``: on the open gates only)."""
        return encode_gated(
            self,
            x,
            penalty_weights=self.penalty_weights(),
            decode=decode,
            aux_decoder_trainable=not self.cfg.freeze_decoder_in_aux,
            sparse=sparse,
        )

    def penalty_weights(self) -> torch.Tensor | None:
        """Per-feature weights of the sparsity penalty: decoder row norms, or None (all 1)."""
        return self.W_dec.norm(dim=1) if self.cfg.l1_scale_by_decoder_norm else None

    @override
    def encode_with_hidden_pre(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoding = self.encode_for_loss(x)
        return encoding.feature_acts, encoding.magnitude_pre

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_gated_features(self, x)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return decode_gated(self, feature_acts)

    def reconstruction(self, encoding: GatedEncoding) -> torch.Tensor:
        """``f @ W_dec + b_dec`` through ``hook_sae_recons``, before de-normalization."""
        if encoding.reconstruction is not None:
            return self.hook_sae_recons(encoding.reconstruction)
        return self.hook_sae_recons(encoding.feature_acts @ self.W_dec + self.b_dec)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        logging_step = (
            step_input.n_training_steps if step_input.is_logging_step else None
        )
        self.conventions.start_step(step_input.sae_in, logging_step)
        encoding = self.encode_for_loss(
            step_input.sae_in, decode=True, sparse=self.conventions.sparse_step()
        )
        reconstruction = self.reconstruction(encoding)
        mse_loss = self.mse_loss_fn(reconstruction, encoding.sae_in).sum(-1).mean()
        gate_losses = self.gate_losses(encoding, step_input.coefficients)
        total_loss = mse_loss + sum(gate_losses.values())
        sae_out = self.run_time_activation_norm_fn_out(reconstruction)
        metrics = self.conventions.end_forward(
            step_input.sae_in, sae_out, encoding, total_loss
        )
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
        n_examples = encoding.sae_in.numel() // self.cfg.d_in
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
        """``||x - x_hat||^2`` per example, in the space the losses are computed in.

        The rows of ``x`` go through in slices whose ``(rows, d_sae)`` activations each
        stay within :data:`~sae_lens_gated.saes.gated_sparse.SCRATCH_BUDGET_BYTES`: scoring
        a resampling pool (8192 inputs at a time) would otherwise allocate several
        ``(8192, d_sae)`` tensors, 32 GiB each at ``d_sae`` 2**20 in float32.
        """
        row_bytes = self.cfg.d_sae * self.W_enc.element_size()
        rows = max(1, gated_sparse.SCRATCH_BUDGET_BYTES // row_bytes)
        return torch.cat([self._reconstruction_error(part) for part in x.split(rows)])

    def _reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        # Its own frame, so that one slice's activations are freed before the next's.
        encoding = self.encode_for_loss(x, decode=True)
        reconstruction = self.reconstruction(encoding)
        self.run_time_activation_norm_fn_out(reconstruction)  # releases the norm state
        return (reconstruction - encoding.sae_in).pow(2).sum(dim=-1)

    def encoder_matrices(self) -> tuple[torch.nn.Parameter, ...]:
        """The ``(d_in, d_sae)`` encoder matrices (the untied ablation has two)."""
        return (self.W_enc,)

    def per_feature_encoder_parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """The ``(d_sae,)`` encoder-side parameters, which a restarted feature resets to 0."""
        return (self.b_gate, self.b_mag, self.r_mag)

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        weights_path, cfg_path = super().save_model(path)
        self.conventions.save(path)
        return weights_path, cfg_path

    @override
    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        super().load_weights_from_checkpoint(checkpoint_path)
        self.conventions.load(checkpoint_path)

    @override
    def log_histograms(self) -> dict[str, NDArray[Any]]:
        return self.conventions.histograms()

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

"""The paper's "untied encoders" ablation (§5): a gated SAE with a free magnitude encoder.

``architecture="gated_untied"``: the magnitude path has its own ``W_mag`` (``d_in x d_sae``)
instead of ``exp(r_mag) * W_enc``, and there is no ``r_mag``:

    pi_gate = (x - b_dec) @ W_enc + b_gate
    pi_mag  = (x - b_dec) @ W_mag + b_mag
    f       = 1[pi_gate > 0] * ReLU(pi_mag)

Everything else (losses, recipes, unit-norm decoder, resampling) is the gated SAE's. It costs
one more encoder matmul and 50% more encoder parameters, which the paper found do not help.
Vanilla SAELens does not know this architecture: load it with the plugin.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from sae_lens.saes.sae import SAEConfig
from torch import nn
from typing_extensions import override

from sae_lens_gated.saes.gated_encoder import GatedEncoding, normalized_input
from sae_lens_gated.saes.gated_sae import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
)
from sae_lens_gated.saes.gated_sparse import sparse_decode

ARCHITECTURE = "gated_untied"


@dataclass
class GatedUntiedSAEConfig(GatedSAEConfig):
    """Configuration of an inference :class:`GatedUntiedSAE` (same fields as gated)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass
class GatedUntiedTrainingSAEConfig(GatedTrainingSAEConfig):
    """Configuration for training the untied ablation; the fields are the gated SAE's.

    ``weight_tying`` does not apply (there is no ``r_mag``) and must stay ``"r_mag"``;
    ``normalize_activations="covariance_whitening"`` is not supported.
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def __post_init__(self) -> None:
        if self.weight_tying != "r_mag":
            raise ValueError(
                "gated_untied has no r_mag: weight_tying does not apply (leave it 'r_mag')."
            )
        if self.normalize_activations == "covariance_whitening":
            raise ValueError(
                "gated_untied does not support normalize_activations='covariance_whitening'."
            )
        super().__post_init__()

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return GatedUntiedSAEConfig


def encode_untied(
    sae: "GatedUntiedSAE | GatedUntiedTrainingSAE",
    x: torch.Tensor,
    penalty_weights: torch.Tensor | None = None,
) -> GatedEncoding:
    """The untied encoder, with the same outputs as :func:`encode_gated`.

    Args:
        sae: The SAE whose parameters to use.
        x: Input activations of shape ``(..., d_in)``.
        penalty_weights: Per-feature weights of the sparsity penalty (``None``: all 1).
    """
    sae_in = normalized_input(sae, x)
    centered = sae_in - sae.b_dec if sae.cfg.apply_b_dec_to_input else sae_in
    gate_pre = centered @ sae.W_enc + sae.b_gate
    magnitude_pre = sae.hook_sae_acts_pre(centered @ sae.W_mag + sae.b_mag)
    gate_acts = torch.relu(gate_pre)
    feature_acts = sae.hook_sae_acts_post(
        (gate_pre > 0).to(magnitude_pre.dtype) * sae.activation_fn(magnitude_pre)
    )
    penalty = (
        gate_acts if penalty_weights is None else gate_acts * penalty_weights
    ).sum()
    return GatedEncoding(sae_in, gate_acts, magnitude_pre, feature_acts, penalty)


def _init_untied(sae: "GatedUntiedSAE | GatedUntiedTrainingSAE") -> None:
    # Both encoders start as the decoder's transpose (as the tied W_enc does).
    sae.W_mag = nn.Parameter(sae.W_enc.detach().clone())
    del sae.r_mag


@torch.no_grad()
def _fold_W_dec_norm_untied(sae: "GatedUntiedSAE | GatedUntiedTrainingSAE") -> None:
    norms = sae.fold_and_get_W_dec_norm()
    sae.W_mag.data.mul_(norms)
    sae.b_gate.data.mul_(norms)
    sae.b_mag.data.mul_(norms)


class GatedUntiedSAE(GatedSAE):
    """Inference SAE of the untied ablation (``W_mag`` free, no ``r_mag``)."""

    W_mag: nn.Parameter
    config_class: ClassVar[type[GatedSAEConfig]] = GatedUntiedSAEConfig

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_untied(self)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_untied(self, x).feature_acts

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        _fold_W_dec_norm_untied(self)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.W_mag.data *= scaling_factor

    @override
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        raise NotImplementedError("gated_untied does not support activation whitening.")


class GatedUntiedTrainingSAE(GatedTrainingSAE):
    """Training SAE of the untied ablation; losses and training machinery are the gated SAE's."""

    W_mag: nn.Parameter
    config_class: ClassVar[type[GatedTrainingSAEConfig]] = GatedUntiedTrainingSAEConfig

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_untied(self)

    @override
    def encode_for_loss(
        self, x: torch.Tensor, decode: bool = False, sparse: bool = False
    ) -> GatedEncoding:
        # The two encoder matmuls cannot share a product, so the fused gated function does
        # not apply: plain autograd. Dense steps decode in the training loss; a sparse step
        # decodes here, on the nonzero activations only (the encoders stay dense).
        encoding = encode_untied(self, x, penalty_weights=self.penalty_weights())
        if not decode:
            return encoding
        encoding = encoding._replace(n_open=torch.count_nonzero(encoding.gate_acts))
        if not sparse:
            return encoding
        W_aux, b_aux = self.W_dec, self.b_dec
        if self.cfg.freeze_decoder_in_aux:
            W_aux, b_aux = W_aux.detach(), b_aux.detach()
        return encoding._replace(
            reconstruction=sparse_decode(encoding.feature_acts, self.W_dec, self.b_dec),
            aux_reconstruction=sparse_decode(encoding.gate_acts, W_aux, b_aux),
        )

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_untied(self, x).feature_acts

    @override
    def encoder_matrices(self) -> tuple[nn.Parameter, ...]:
        return (self.W_enc, self.W_mag)

    @override
    def per_feature_encoder_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.b_gate, self.b_mag)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        _fold_W_dec_norm_untied(self)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if not self.cfg.unit_norm_decoder:  # the base class scaled W_enc, not W_mag
            self.W_mag.data *= scaling_factor

"""The gated encoder as functions of an SAE's parameters, for inference and training.

One encoder matmul ``(x - b_dec) @ W_enc`` serves the gate path, the magnitude path
(``pi_mag = pre * exp(r_mag) + b_mag``) and, in training, the sparsity penalty and the
auxiliary reconstruction; ``W_enc * exp(r_mag)`` is never materialized. The arithmetic is
:class:`~sae_lens_gated.saes.gated_function.GatedSAEFunction`; this module prepares its
inputs (dtype, reshaping, ``hook_sae_input``, run-time normalization) and routes its
outputs through the SAE's hook points.
"""

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from sae_lens.saes.sae import SAE
from transformer_lens.hook_points import HookPoint

from sae_lens_gated.saes.gated_function import GatedFunctionOptions, GatedSAEFunction

if TYPE_CHECKING:
    from sae_lens_gated.saes.gated_sae import GatedSAE, GatedTrainingSAE


def check_d_in(sae: SAE[Any], sae_in: torch.Tensor) -> None:
    """Raise a clear error unless the last dimension of ``sae_in`` is ``d_in``."""
    if sae_in.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"Expected activations whose last dimension is d_in={sae.cfg.d_in}, "
            f"got a tensor of shape {tuple(sae_in.shape)}."
        )


class GatedEncoding(NamedTuple):
    """Intermediate values of one gated encoder pass.

    Attributes:
        sae_in: The input after dtype cast, ``hook_sae_input`` and run-time normalisation,
            before the ``b_dec`` centering: the space reconstructions are compared in.
        gate_acts: ``ReLU(pi_gate)``, which the sparsity and auxiliary losses use.
        magnitude_pre: ``pi_mag``, the magnitude pre-activation (after ``hook_sae_acts_pre``).
        feature_acts: ``1[pi_gate > 0] * ReLU(pi_mag)`` (after ``hook_sae_acts_post``).
        penalty: Sum of ``gate_acts`` over the batch and features, each feature weighted by
            ``penalty_weights`` if given (0-d tensor).
        reconstruction: ``feature_acts @ W_dec + b_dec`` before ``hook_sae_recons`` (only
            when decoding was requested).
        aux_reconstruction: ``gate_acts @ W_dec + b_dec`` (only when decoding was requested).
    """

    sae_in: torch.Tensor
    gate_acts: torch.Tensor
    magnitude_pre: torch.Tensor
    feature_acts: torch.Tensor
    penalty: torch.Tensor
    reconstruction: torch.Tensor | None = None
    aux_reconstruction: torch.Tensor | None = None


def encode_gated(
    sae: "GatedSAE | GatedTrainingSAE",
    x: torch.Tensor,
    use_r_mag: bool = True,
    penalty_weights: torch.Tensor | None = None,
    decode: bool = False,
    aux_decoder_trainable: bool = False,
) -> GatedEncoding:
    """Run the gated encoder: one encoder matmul shared by the gate and magnitude paths.

    This and :func:`encode_gated_features` are the only implementations of the gated encoder,
    used for inference and training; both run
    :class:`~sae_lens_gated.saes.gated_function.GatedSAEFunction`.

    Args:
        sae: The SAE whose parameters to use.
        x: Input activations of shape ``(..., d_in)`` (or ``(..., n_heads, d_head)`` for
            ``hook_z`` SAEs).
        use_r_mag: If False, ``pi_mag = pre + b_mag`` and ``r_mag`` is left out of the graph
            (the paper's "no r_mag" ablation).
        penalty_weights: Per-feature weights of the sparsity penalty (``None``: all 1).
        decode: Also compute both reconstructions inside the same function (training);
            ignored while hooks are attached to the activation or reconstruction hook
            points, whose outputs must feed the decoder.
        aux_decoder_trainable: With ``decode``, let the auxiliary reconstruction train the
            decoder (False: stop-gradient).
    """
    decode = decode and not has_hooks(
        sae.hook_sae_acts_pre, sae.hook_sae_acts_post, sae.hook_sae_recons
    )
    sae_in = normalized_input(sae, x)
    outputs = _run_gated_function(
        sae,
        sae_in,
        use_r_mag,
        penalty_weights,
        GatedFunctionOptions(
            center=sae.cfg.apply_b_dec_to_input,
            decode=decode,
            aux_decoder_trainable=aux_decoder_trainable,
        ),
    )
    feature_acts, gate_acts, magnitude, penalty = outputs[:4]
    batch_shape = (*sae_in.shape[:-1], sae.cfg.d_sae)
    magnitude = magnitude.reshape(batch_shape)
    gate_acts = gate_acts.reshape(batch_shape)
    hooked = sae.hook_sae_acts_pre(magnitude)
    if hooked is not magnitude:
        # A hook replaced the pre-activation: the features follow the replacement.
        feature_acts = (gate_acts > 0).to(hooked.dtype) * sae.activation_fn(hooked)
    feature_acts = sae.hook_sae_acts_post(feature_acts.reshape(batch_shape))
    reconstructions = [r.reshape(sae_in.shape) for r in outputs[4:]]
    return GatedEncoding(
        sae_in, gate_acts, hooked, feature_acts, penalty, *reconstructions
    )


def encode_gated_features(
    sae: "GatedSAE | GatedTrainingSAE", x: torch.Tensor, use_r_mag: bool = True
) -> torch.Tensor:
    """Only the feature activations of :func:`encode_gated`, as cheaply as possible.

    Without gradients and without hooks on ``hook_sae_acts_pre``, the gate and magnitude
    pre-activations never exist for the whole batch at once: the features are the only
    ``(batch, d_sae)`` allocation.

    Args:
        sae: The SAE whose parameters to use.
        x: Input activations.
        use_r_mag: See :func:`encode_gated`.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in sae.parameters())
    )
    if needs_grad or has_hooks(sae.hook_sae_acts_pre):
        return encode_gated(sae, x, use_r_mag=use_r_mag).feature_acts
    sae_in = normalized_input(sae, x)
    options = GatedFunctionOptions(
        center=sae.cfg.apply_b_dec_to_input, decode=False, features_only=True
    )
    (feature_acts,) = _run_gated_function(sae, sae_in, use_r_mag, None, options)
    return sae.hook_sae_acts_post(feature_acts.reshape(*sae_in.shape[:-1], -1))


def normalized_input(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    """``x`` after dtype cast, reshaping, ``hook_sae_input`` and run-time normalization."""
    # process_sae_in without its centering step: the un-centered input is the target of the
    # auxiliary reconstruction, and the centering happens inside the gated function.
    sae_in = sae.reshape_fn_in(x.to(sae.dtype))
    check_d_in(sae, sae_in)
    return sae.run_time_activation_norm_fn_in(sae.hook_sae_input(sae_in))


def _run_gated_function(
    sae: "GatedSAE | GatedTrainingSAE",
    sae_in: torch.Tensor,
    use_r_mag: bool,
    penalty_weights: torch.Tensor | None,
    options: GatedFunctionOptions,
) -> tuple[torch.Tensor, ...]:
    outputs = GatedSAEFunction.apply(
        sae_in.reshape(-1, sae_in.shape[-1]),
        sae.W_enc,
        sae.b_gate,
        sae.r_mag if use_r_mag else None,
        sae.b_mag,
        sae.W_dec,
        sae.b_dec,
        penalty_weights,
        options,
    )
    return outputs if isinstance(outputs, tuple) else (outputs,)


def has_hooks(*points: HookPoint) -> bool:
    return any(point._forward_hooks or point._forward_pre_hooks for point in points)

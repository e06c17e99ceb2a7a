"""Metrics the Gated SAE paper reports."""

import math

import torch


def widest_float(device: torch.device) -> torch.dtype:
    """The widest floating dtype tensors on ``device`` can have: float64, but float32 on
    MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def relative_reconstruction_bias(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Relative reconstruction bias gamma = E||x_hat||^2 / E[x_hat . x] (paper v2, Eq. 10).

    ``1 / gamma`` is the scalar that best rescales reconstructions onto the inputs, so
    gamma = 1 is unbiased and gamma < 1 is shrinkage. Expectations are batch means (a ratio
    of means, not a mean of per-example ratios).

    Args:
        x: Inputs of shape ``(..., d)``.
        x_hat: Reconstructions of the same shape.
    """
    if x.shape != x_hat.shape:
        raise ValueError(
            f"x and x_hat must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(x_hat.shape)}."
        )
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(
            f"Need a non-empty batch of vectors, got shape {tuple(x.shape)}."
        )
    gamma = float(relative_reconstruction_bias_tensor(x, x_hat))
    if not math.isfinite(gamma):
        raise ValueError("E[x_hat . x] is 0: gamma is undefined for this batch.")
    return gamma


def relative_reconstruction_bias_tensor(
    x: torch.Tensor, x_hat: torch.Tensor
) -> torch.Tensor:
    """gamma as a 0-d tensor on the inputs' device (no host synchronisation), computed in
    float64 (float32 on MPS: :func:`widest_float`)."""
    wide = widest_float(x.device)
    x_wide, x_hat_wide = x.detach().to(wide), x_hat.detach().to(wide)
    return (
        x_hat_wide.pow(2).sum(dim=-1).mean() / (x_hat_wide * x_wide).sum(dim=-1).mean()
    )

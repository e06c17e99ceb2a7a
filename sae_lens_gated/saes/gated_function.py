"""The gated SAE forward and backward as one autograd function.

For a centered input ``x = sae_in - b_dec`` (rows of the batch):

    pi_gate = x @ W_enc + b_gate
    pi_mag  = (x @ W_enc) * exp(r_mag) + b_mag  =  pi_gate * exp(r_mag) + (b_mag - b_gate * exp(r_mag))
    f       = 1[pi_gate > 0] * ReLU(pi_mag)          feature activations
    g       = ReLU(pi_gate)                          what the sparsity and auxiliary losses see
    penalty = sum over rows and features of g        (each feature weighted, if weights are given)
    x_hat   = f @ W_dec + b_dec                      reconstruction          (training only)
    x_aux   = g @ W_dec + b_dec                      auxiliary reconstruction (training only)

Written with autograd's elementwise ops this takes about twenty passes over the
``(batch, d_sae)`` activations, a fresh tensor for most of them, and keeps half a dozen
alive for the backward pass. Here:

- the encoder matmul is done once; only ``f``, ``g`` and ``pi_mag`` (the three outputs) are
  allocated at ``(batch, d_sae)``, and every other step writes in place or into them;
- the backward pass needs only the outputs ``f``, ``g`` and ``pi_mag`` (``r_mag``'s gradient
  uses ``(x @ W_enc) * exp(r_mag) = pi_mag - b_mag``) and works through the batch in row
  chunks with two chunk-sized scratch buffers, accumulating the parameter gradients with
  matmuls;
- ``b_dec``'s gradient through the centering is a matrix-vector product of the batch-summed
  gradient, not a batch matmul.

On the CPU, where a fresh ``(batch, d_sae)`` tensor costs several times the arithmetic done
on it (page faults), this is most of the difference. On a GPU the whole batch is one chunk.
"""

from dataclasses import dataclass
from typing import Any

import torch

# Rows per chunk on the CPU: chunk buffers of about 16 MiB keep matmuls at full speed.
_CPU_CHUNK_BYTES = 16 * 2**20


def keep_where_positive(
    values: torch.Tensor, condition: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``values`` where ``condition > 0``, else 0, in a single pass (ReLU's backward kernel)."""
    if out is None:
        return torch.ops.aten.threshold_backward(values, condition, 0)
    return torch.ops.aten.threshold_backward.grad_input(
        values, condition, 0, grad_input=out
    )


@dataclass(frozen=True)
class GatedFunctionOptions:
    """Static settings of one :class:`GatedSAEFunction` call.

    Args:
        center: Subtract ``b_dec`` from the input (``apply_b_dec_to_input``).
        decode: Also compute ``x_hat`` and ``x_aux`` (training).
        aux_decoder_trainable: Let the auxiliary reconstruction train ``W_dec`` and ``b_dec``
            (False: stop-gradient, the paper recipe).
        features_only: Return only ``f``, keeping ``g`` and ``pi_mag`` in chunk-sized scratch
            buffers (inference without gradients: one ``(batch, d_sae)`` allocation).
    """

    center: bool
    decode: bool
    aux_decoder_trainable: bool = False
    features_only: bool = False


class GatedSAEFunction(torch.autograd.Function):
    """``(f, g, pi_mag, penalty[, x_hat, x_aux])`` from the gated SAE's parameters."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_gate: torch.Tensor,
        r_mag: torch.Tensor | None,
        b_mag: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        penalty_weights: torch.Tensor | None,
        options: GatedFunctionOptions,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        device_type = sae_in.device.type
        work = _compute_dtype(device_type, sae_in.dtype)
        with torch.autocast(device_type, enabled=False):
            x = (sae_in - b_dec if options.center else sae_in).to(work)
            enc = W_enc.to(work)
            scale = None if r_mag is None else r_mag.exp()
            mag_bias = b_mag - b_gate if scale is None else b_mag - b_gate * scale
            scale_w = None if scale is None else scale.to(work)
            gate_bias, mag_bias = b_gate.to(work), mag_bias.to(work)

            n, d_sae = x.shape[0], W_enc.shape[1]
            feature_acts = torch.empty(n, d_sae, dtype=work, device=x.device)
            chunks = _chunks(n, d_sae, feature_acts)
            if options.features_only:
                rows_per_chunk = chunks[0].stop - chunks[0].start
                gate_acts = torch.empty(
                    rows_per_chunk, d_sae, dtype=work, device=x.device
                )
            else:
                gate_acts = torch.empty_like(feature_acts)
            magnitude = torch.empty_like(gate_acts)
            penalty = torch.zeros((), dtype=_accumulation_dtype(work), device=x.device)
            weights = None if penalty_weights is None else penalty_weights.to(work)
            for rows in chunks:
                f = feature_acts[rows]
                if options.features_only:  # reuse the scratch rows for every chunk
                    g, m = gate_acts[: f.shape[0]], magnitude[: f.shape[0]]
                else:
                    g, m = gate_acts[rows], magnitude[rows]
                torch.addmm(gate_bias, x[rows], enc, out=g)
                if scale_w is None:
                    torch.add(g, mag_bias, out=m)
                else:
                    torch.addcmul(mag_bias, g, scale_w, out=m)
                keep_where_positive(m, g, out=f).clamp_(min=0)
                if options.features_only:
                    continue
                g.clamp_(min=0)
                penalty += g.sum() if weights is None else (g @ weights).sum()
            if options.features_only:
                return feature_acts

            outputs: tuple[torch.Tensor, ...] = (
                feature_acts,
                gate_acts,
                magnitude,
                penalty,
            )
            if options.decode:
                dec, bias = W_dec.to(work), b_dec.to(work)
                outputs += (
                    torch.addmm(bias, feature_acts, dec),
                    torch.addmm(bias, gate_acts, dec),
                )

        # Outputs the loss does not use get None, not a (batch, d_sae) tensor of zeros.
        ctx.set_materialize_grads(False)
        # Only outputs and parameters are kept: nothing extra stays alive for backward.
        ctx.save_for_backward(
            x,
            W_enc,
            W_dec,
            b_mag,
            scale,
            penalty_weights,
            feature_acts,
            gate_acts,
            magnitude,
        )
        ctx.options = options
        ctx.device_type = device_type
        return outputs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, *grads: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        (
            x,
            W_enc,
            W_dec,
            b_mag,
            scale,
            penalty_weights,
            feature_acts,
            gate_acts,
            magnitude,
        ) = ctx.saved_tensors
        options: GatedFunctionOptions = ctx.options
        grad_f, grad_g, grad_magnitude, grad_penalty = grads[:4]
        grad_x_hat, grad_x_aux = grads[4:6] if options.decode else (None, None)
        work = gate_acts.dtype
        n, d_sae = gate_acts.shape
        acc = _accumulation_dtype(work)

        with torch.autocast(ctx.device_type, enabled=False):
            enc = W_enc.to(work)
            dec = W_dec.to(work)
            scale_w = None if scale is None else scale.to(work)
            per_feature = None
            if grad_penalty is not None:
                per_feature = grad_penalty.to(work).expand(d_sae)
                if penalty_weights is not None:
                    per_feature = per_feature * penalty_weights.to(work)
            aux_grad = _as(grad_x_aux, work)
            aux_grad_for_dec = aux_grad if options.aux_decoder_trainable else None

            grad_W_enc = torch.zeros(W_enc.shape, dtype=acc, device=x.device)
            grad_W_dec = torch.zeros(W_dec.shape, dtype=acc, device=x.device)
            sum_grad_gate = torch.zeros(d_sae, dtype=acc, device=x.device)
            sum_grad_mag = torch.zeros(d_sae, dtype=acc, device=x.device)
            sum_grad_mag_m = torch.zeros(d_sae, dtype=acc, device=x.device)
            grad_sae_in = (
                torch.empty(x.shape, dtype=work, device=x.device)
                if ctx.needs_input_grad[0]
                else None
            )
            chunks = _chunks(n, d_sae, gate_acts)
            chunk_shape = (chunks[0].stop - chunks[0].start, d_sae)
            scratch_mag_buffer = torch.empty(chunk_shape, dtype=work, device=x.device)
            scratch_gate_buffer = torch.empty_like(scratch_mag_buffer)
            recon_grad = _as(grad_x_hat, work)
            for rows in chunks:
                f, g = feature_acts[rows], gate_acts[rows]
                scratch_mag = scratch_mag_buffer[: f.shape[0]]
                scratch_gate = scratch_gate_buffer[: f.shape[0]]
                # Gradient reaching pi_mag: through f only where the feature fired, and
                # directly where pi_mag itself was used (a hook replaced it).
                _upstream(grad_f, recon_grad, dec, rows, scratch_mag)
                grad_mag = keep_where_positive(scratch_mag, f, out=scratch_mag)
                if grad_magnitude is not None:
                    grad_mag += grad_magnitude[rows]
                sum_grad_mag += grad_mag.sum(dim=0, dtype=acc)
                if scale_w is not None:
                    torch.mul(grad_mag, magnitude[rows], out=scratch_gate)
                    sum_grad_mag_m += scratch_gate.sum(dim=0, dtype=acc)
                # Gradient reaching pi_gate: from the losses on g, where the gate is open.
                _upstream(grad_g, aux_grad, dec, rows, scratch_gate)
                if per_feature is not None:
                    scratch_gate += per_feature
                grad_gate = keep_where_positive(scratch_gate, g, out=scratch_gate)
                sum_grad_gate += grad_gate.sum(dim=0, dtype=acc)
                # d(loss)/d(x @ W_enc), in place.
                if scale_w is None:
                    grad_pre = grad_gate.add_(grad_mag)
                else:
                    grad_pre = grad_gate.addcmul_(grad_mag, scale_w)
                grad_W_enc.addmm_(x[rows].T.to(acc), grad_pre.to(acc))
                if grad_sae_in is not None:
                    torch.mm(grad_pre, enc.T, out=grad_sae_in[rows])
                if grad_x_hat is not None:
                    grad_W_dec.addmm_(f.T.to(acc), grad_x_hat[rows].to(acc))
                if aux_grad_for_dec is not None:
                    grad_W_dec.addmm_(g.T.to(acc), aux_grad_for_dec[rows].to(acc))

            grad_r_mag = None
            if scale is None:
                sum_grad_pre = sum_grad_gate + sum_grad_mag
            else:
                # d pi_mag / d r_mag = (x @ W_enc) * exp(r_mag) = pi_mag - b_mag
                grad_r_mag = sum_grad_mag_m - b_mag * sum_grad_mag
                sum_grad_pre = sum_grad_gate + scale * sum_grad_mag
            grad_b_dec = torch.zeros(x.shape[1], dtype=acc, device=x.device)
            if options.center:
                # Through the centering: summed over the batch first, then one matrix-vector product.
                grad_b_dec -= sum_grad_pre.to(acc) @ W_enc.T.to(acc)
            if grad_x_hat is not None:
                grad_b_dec += grad_x_hat.sum(dim=0, dtype=acc)
            if aux_grad_for_dec is not None:
                grad_b_dec += aux_grad_for_dec.sum(dim=0, dtype=acc)
            grad_weights = None
            if grad_penalty is not None and ctx.needs_input_grad[7]:
                grad_weights = grad_penalty * gate_acts.sum(dim=0, dtype=acc)

        return (
            None if grad_sae_in is None else grad_sae_in.to(x.dtype),
            grad_W_enc.to(W_enc.dtype),
            sum_grad_gate.to(b_mag.dtype),
            None if grad_r_mag is None else grad_r_mag.to(b_mag.dtype),
            sum_grad_mag.to(b_mag.dtype),
            grad_W_dec.to(W_dec.dtype) if options.decode else None,
            grad_b_dec.to(W_dec.dtype),
            None
            if grad_weights is None or penalty_weights is None
            else grad_weights.to(penalty_weights.dtype),
            None,
        )


def _upstream(
    grad_out: torch.Tensor | None,
    grad_recon: torch.Tensor | None,
    W_dec: torch.Tensor,
    rows: slice,
    out: torch.Tensor,
) -> None:
    """Write into ``out`` the gradient arriving at an activation for ``rows``: from its direct
    use (``grad_out``) plus, through a decoder, ``grad_recon @ W_dec.T``."""
    if grad_recon is not None:
        torch.mm(grad_recon[rows], W_dec.T, out=out)
        if grad_out is not None:
            out += grad_out[rows]
    elif grad_out is not None:
        out.copy_(grad_out[rows])
    else:
        out.zero_()


def _chunks(n: int, d_sae: int, like: torch.Tensor) -> list[slice]:
    if like.device.type != "cpu":
        return [slice(0, n)]
    rows = max(64, _CPU_CHUNK_BYTES // max(1, d_sae * like.element_size()))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)

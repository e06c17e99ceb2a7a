"""The gated SAE forward and backward as one autograd function, dense or on the open gates.

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
alive for the backward pass. Here the encoder matmul is done once, in row chunks
(:func:`~sae_lens_gated.saes.gated_sparse.row_chunks`): cache-sized on the CPU, so that the
elementwise work on each chunk runs right after the matmul wrote it; on other devices the
whole batch is one chunk (the caching allocator makes fresh tensors cheap there) unless a
chunk-sized scratch buffer would pass
:data:`~sae_lens_gated.saes.gated_sparse.SCRATCH_BUDGET_BYTES` (1 GiB), which caps the
chunks on every device. ``b_dec``'s gradient through the centering is a matrix-vector
product of the batch-summed gradient, not a batch matmul.

**Dense mode** (``sparse=False``, 16 MiB chunks on the CPU). The forward allocates only
``f``, ``g`` and ``pi_mag`` (the three outputs) at ``(batch, d_sae)`` and writes every other
step in place or into them. The backward needs only those outputs (``r_mag``'s gradient uses
``(x @ W_enc) * exp(r_mag) = pi_mag - b_mag``) and two chunk-sized scratch buffers, and
accumulates the parameter gradients with matmuls, in the compute dtype (bf16 under
autocast, as autocast runs a standard SAE's) and summed over chunks in float32; once a
batch spans several chunks it allocates no ``(batch, d_sae)`` tensor.
A training step does seven ``batch x d_in x d_sae`` matmuls (eight with a trainable
auxiliary decoder).

**Sparse mode** (``sparse=True``). Every gradient of the loss vanishes off the open-gate set
``S = {pi_gate > 0}`` (the L1 and the auxiliary loss see ``ReLU(pi_gate)``, ``f`` is 0 off
it), so after the dense encoder matmul everything runs on ``S``:

- forward: each chunk's ``pi_gate`` goes into one reused scratch buffer (64 MiB chunks on
  the CPU, see :data:`~sae_lens_gated.saes.gated_sparse.SPARSE_CPU_CHUNK_BYTES`); one
  comparison with 0 into a reused boolean buffer and one ``nonzero`` give the open
  positions, whose values are gathered
  (:class:`~sae_lens_gated.saes.gated_sparse.SupportBuilder`); ``f``, ``g``, ``pi_mag`` and
  the penalty are then computed on the ``nnz`` open positions with the dense mode's
  elementwise code, and both decoders are embedding bags (of bf16 rows under autocast);
- backward: the support sorted by feature once (a stable sort of ``nnz`` integers), the
  decoder gradients sampled on it (``sampled_addmm``), the dense mode's elementwise gradient
  code on ``nnz`` values, ``W_enc``'s and ``W_dec``'s gradients as one embedding bag per
  feature, the per-feature gradients with ``index_add_``
  (:class:`~sae_lens_gated.saes.gated_sparse.FeatureMajor`).

Beyond the encoder matmul, one comparison pass and one ``nonzero`` per chunk, a sparse step
costs ``O(nnz * d_in)``. Its only allocations of ``batch x d_sae`` size are the forward's two
scratch buffers (pre-activations and the boolean mask), chunk-sized: at most the scratch
budget, and ``(batch, d_sae)`` off the CPU when the batch fits in it. Nothing of that size is
saved for or allocated by the backward; ``W_enc``'s gradient comes out as the transpose of
a ``(d_sae, d_in)`` tensor, laid out like ``W_enc`` in the copy that widens it. The outputs are
values on ``S`` in row-major order plus the ``(2, nnz)`` positions (see
:class:`GatedSAEFunction`).

``nonzero`` has a data-dependent size, so the sparse mode synchronises with a GPU once per
chunk and cannot be captured in a ``torch.compile`` graph: :func:`gated_sae_function` runs
it under ``torch.compiler.disable``, one clean graph break with the rest of a compiled step
still compiled (calling ``GatedSAEFunction.apply`` in sparse mode inside a compiled function
also works, through several graph breaks). The dense mode traces without graph breaks.

Both modes can also return the number of open gates as a 0-d int64 tensor, counted chunk by
chunk right after the chunk's matmul (the sparse mode's ``nnz``), so that a caller can choose
the next step's mode from the measured density without another pass.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import torch

from sae_lens_gated.saes.gated_sparse import (
    SPARSE_CPU_CHUNK_BYTES,
    FeatureMajor,
    Support,
    SupportBuilder,
    row_chunks,
)

# The open-gate fraction below which a sparse step pays. Measured on a 2-core CPU (d_in 512,
# d_sae 16384, batch 4096, fp32): the sparse function is faster than the dense one up to
# 20-30% open, and its memory grows with the open gates (about 100 bytes each).
SPARSE_STEP_MAX_DENSITY = 0.1
# Bytes of gradient rows transposed at a time when a CPU gradient is widened into its
# parameter's transposed layout (:func:`_laid_out_as`): small enough to stay in cache.
TRANSPOSE_BLOCK_BYTES = 2 * 2**20


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
        sparse: Compute everything after the encoder matmul on the open gates only, and
            return values on them (see the module docstring). Faster than the dense mode
            up to 20-30% of gates open; its memory grows with the open gates, so use it
            below about 10%.
        count_open: In dense mode, also return the number of open gates (the sparse mode
            always returns it).
        decode_bias: Add ``b_dec`` to both reconstructions. False gives ``f @ W_dec`` and
            ``g @ W_dec``, a latent shard's parts of the whole SAE's reconstructions
            (``b_dec`` still centers the input when ``center``).
    """

    center: bool
    decode: bool
    aux_decoder_trainable: bool = False
    features_only: bool = False
    sparse: bool = False
    count_open: bool = False
    decode_bias: bool = True

    def __post_init__(self) -> None:
        if self.features_only and (self.sparse or self.count_open):
            raise ValueError(
                "features_only returns the dense features alone; it cannot be combined "
                "with sparse or count_open."
            )

    @property
    def returns_open_count(self) -> bool:
        return self.sparse or self.count_open


class GatedSAEFunction(torch.autograd.Function):
    """The gated SAE's activations, penalty and reconstructions from its parameters.

    ``apply(sae_in, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, penalty_weights, options)``
    with ``sae_in`` of shape ``(batch, d_in)``, ``r_mag`` None for ``pi_mag = pre + b_mag``,
    ``penalty_weights`` None for an unweighted L1. Outputs, in order (bracketed ones only
    with ``decode``, ``count_open`` or ``sparse``):

    - dense: ``f, g, pi_mag`` (``(batch, d_sae)``), ``penalty`` (0-d), ``[x_hat, x_aux]``
      (``(batch, d_in)``), ``[n_open]``; ``features_only``: ``f`` alone (not a tuple);
    - sparse: ``f, g, pi_mag`` as ``(nnz,)`` values at the open gates in row-major order,
      ``penalty``, ``[x_hat, x_aux]``, ``n_open`` (0-d int64, equal to ``nnz``) and the
      ``(2, nnz)`` int64 positions ``(row, feature)`` (a coalesced COO index; not
      differentiable). ``f`` may be 0 at an open gate (``pi_mag <= 0``).

    :func:`gated_sae_function` names these outputs.
    """

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
        work = compute_dtype(device_type, sae_in.dtype)
        acc = _accumulation_dtype(work)
        with torch.autocast(device_type, enabled=False):
            x = (sae_in - b_dec if options.center else sae_in).to(work)
            enc = W_enc.to(work)
            scale = None if r_mag is None else r_mag.exp()
            mag_bias = b_mag - b_gate if scale is None else b_mag - b_gate * scale
            scale_w = None if scale is None else scale.to(work)
            gate_bias, mag_bias = b_gate.to(work), mag_bias.to(work)
            weights = None if penalty_weights is None else penalty_weights.to(work)

            n, d_sae = x.shape[0], W_enc.shape[1]
            chunk_bytes = SPARSE_CPU_CHUNK_BYTES if options.sparse else None
            chunks = row_chunks(n, d_sae, x, chunk_bytes)
            chunk_rows = chunks[0].stop if chunks else 0
            penalty = torch.zeros((), dtype=acc, device=x.device)
            n_open = torch.zeros((), dtype=torch.long, device=x.device)
            # Where each chunk's pre-activations go: the gate output itself (dense), or
            # scratch rows reused by every chunk.
            keep_all = not (options.sparse or options.features_only)
            gate_acts = torch.empty(
                n if keep_all else chunk_rows, d_sae, dtype=work, device=x.device
            )
            builder = None
            feature_acts = magnitude = None
            if options.sparse:
                builder = SupportBuilder(n, d_sae, chunk_rows, x.device, above=0.0)
            else:
                feature_acts = torch.empty(n, d_sae, dtype=work, device=x.device)
                magnitude = torch.empty_like(gate_acts)
            for rows in chunks:
                g = gate_acts[rows] if keep_all else gate_acts[: rows.stop - rows.start]
                # pi_gate exactly as in the dense mode, so that both open the same gates.
                torch.addmm(gate_bias, x[rows], enc, out=g)
                if builder is not None:
                    builder.add(g, rows.start)
                    continue
                assert feature_acts is not None and magnitude is not None
                m = magnitude[rows] if keep_all else magnitude[: g.shape[0]]
                _activate(g, m, feature_acts[rows], scale_w, mag_bias)
                if options.features_only:
                    continue
                penalty += _penalty(g, weights)
                if options.count_open:
                    n_open += _count_open(g)
            if options.features_only:
                assert feature_acts is not None
                return feature_acts

            support = None
            if builder is not None:
                support, gate_acts = builder.build(like=x)
                n_open = torch.full((), support.nnz, device=x.device)
                per_feature = support.per_feature
                magnitude = torch.empty_like(gate_acts)
                feature_acts = torch.empty_like(gate_acts)
                _activate(
                    gate_acts,
                    magnitude,
                    feature_acts,
                    None if scale_w is None else per_feature(scale_w),
                    per_feature(mag_bias),
                )
                penalty += _penalty(
                    gate_acts, None if weights is None else per_feature(weights)
                )
            assert feature_acts is not None and magnitude is not None

            outputs: tuple[torch.Tensor, ...] = (
                feature_acts,
                gate_acts,
                magnitude,
                penalty,
            )
            dense_decoder = None
            if options.decode:
                # Both modes decode in the compute dtype: bf16 matmuls, or bf16 decoder
                # rows gathered (half the bytes; embedding_bag sums them in float32).
                dec = W_dec.to(work)
                bias = b_dec.to(work) if options.decode_bias else dec.new_zeros(())
                if support is None:
                    dense_decoder = dec  # the dense backward's projections use it too
                    outputs += (
                        torch.addmm(bias, feature_acts, dec),
                        torch.addmm(bias, gate_acts, dec),
                    )
                else:
                    outputs += tuple(
                        support.decode(values, dec).add_(bias)
                        for values in (feature_acts, gate_acts)
                    )
            if options.returns_open_count:
                outputs += (n_open,)
                ctx.mark_non_differentiable(n_open)
            if support is not None:
                outputs += (support.indices,)
                ctx.mark_non_differentiable(support.indices)

        # Outputs the loss does not use get None, not a tensor of zeros.
        ctx.set_materialize_grads(False)
        # Kept for backward: the centered input x (batch, d_in), parameters, exp(r_mag),
        # the penalty weights and the outputs f, g, pi_mag; in sparse mode those are nnz
        # values, with the positions and row pointers; in dense mode the decoder in the
        # compute dtype (not cast twice). Nothing else of batch x d_sae size.
        saved = [
            x,
            W_enc,
            W_dec,
            dense_decoder,
            b_mag,
            scale,
            penalty_weights,
            feature_acts,
            gate_acts,
            magnitude,
        ]
        if support is not None:
            saved += [support.indices, support.row_ptr]
        ctx.save_for_backward(*saved)
        ctx.options = options
        ctx.device_type = device_type
        ctx.d_sae = d_sae
        return outputs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, *grads: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        (
            x,
            W_enc,
            W_dec,
            dense_decoder,
            b_mag,
            scale,
            penalty_weights,
            feature_acts,
            gate_acts,
            magnitude,
            *support_tensors,
        ) = ctx.saved_tensors
        options: GatedFunctionOptions = ctx.options
        grad_f, grad_g, grad_magnitude, grad_penalty = grads[:4]
        grad_x_hat, grad_x_aux = grads[4:6] if options.decode else (None, None)
        work = gate_acts.dtype
        acc = _accumulation_dtype(work)
        n, d_sae = x.shape[0], ctx.d_sae

        with torch.autocast(ctx.device_type, enabled=False):
            per_feature = None
            if grad_penalty is not None:
                per_feature = grad_penalty.to(work).expand(d_sae)
                if penalty_weights is not None:
                    per_feature = per_feature * penalty_weights.to(work)
            aux_grad = _as(grad_x_aux, work)
            step = _GradStep(
                grad_f=grad_f,
                grad_g=grad_g,
                grad_magnitude=grad_magnitude,
                recon_grad=_as(grad_x_hat, work),
                aux_grad=aux_grad,
                W_dec=W_dec,
                scale=None if scale is None else scale.to(work),
                penalty_per_feature=per_feature,
                sums=_FeatureSums.zeros(d_sae, acc, x.device),
            )
            aux_grad_for_dec = aux_grad if options.aux_decoder_trainable else None
            want_input_grad = ctx.needs_input_grad[0]
            if support_tensors:
                indices, row_ptr = support_tensors
                support = Support(indices, n, d_sae, row_ptr)
                grad_W_enc, grad_W_dec, grad_sae_in, gate_sum = _sparse_backward(
                    step,
                    support,
                    (feature_acts, gate_acts, magnitude),
                    x,
                    W_enc,
                    aux_grad_for_dec,
                    want_input_grad=want_input_grad,
                    want_gate_sum=per_feature is not None and ctx.needs_input_grad[7],
                )
            else:
                grad_W_enc, grad_W_dec, grad_sae_in = _dense_backward(
                    step,
                    (feature_acts, gate_acts, magnitude),
                    x,
                    W_enc,
                    dense_decoder,
                    aux_grad_for_dec,
                    want_input_grad=want_input_grad,
                )
                gate_sum = None
                if grad_penalty is not None and ctx.needs_input_grad[7]:
                    gate_sum = gate_acts.sum(dim=0, dtype=acc)

            sums = step.sums
            grad_r_mag = None
            if scale is None:
                sum_grad_pre = sums.gate + sums.mag
            else:
                # d pi_mag / d r_mag = (x @ W_enc) * exp(r_mag) = pi_mag - b_mag
                grad_r_mag = sums.mag_m - b_mag * sums.mag
                sum_grad_pre = sums.gate + scale * sums.mag
            grad_b_dec = torch.zeros(x.shape[1], dtype=acc, device=x.device)
            if options.center:
                # Through the centering: summed over the batch first, then one matrix-vector product.
                grad_b_dec -= sum_grad_pre.to(acc) @ W_enc.T.to(acc)
            if grad_x_hat is not None and options.decode_bias:
                grad_b_dec += grad_x_hat.sum(dim=0, dtype=acc)
            if aux_grad_for_dec is not None and options.decode_bias:
                grad_b_dec += aux_grad_for_dec.sum(dim=0, dtype=acc)
            grad_weights = None
            if grad_penalty is not None and gate_sum is not None:
                grad_weights = grad_penalty * gate_sum

        return (
            None if grad_sae_in is None else grad_sae_in.to(x.dtype),
            _laid_out_as(grad_W_enc, W_enc),
            sums.gate.to(b_mag.dtype),
            None if grad_r_mag is None else grad_r_mag.to(b_mag.dtype),
            sums.mag.to(b_mag.dtype),
            _laid_out_as(grad_W_dec, W_dec) if options.decode else None,
            grad_b_dec.to(W_dec.dtype),
            None
            if grad_weights is None or penalty_weights is None
            else grad_weights.to(penalty_weights.dtype),
            None,
        )


class GatedOutputs(NamedTuple):
    """The outputs of :class:`GatedSAEFunction`, named.

    Attributes:
        feature_acts: ``f``: ``(batch, d_sae)``, or its ``(nnz,)`` values on ``support``.
        gate_acts: ``g = ReLU(pi_gate)``, same layout.
        magnitude: ``pi_mag``, same layout (sparse: only at the open gates).
        penalty: The (weighted) sum of ``g``, 0-d.
        reconstruction: ``x_hat`` (with ``decode``).
        aux_reconstruction: ``x_aux`` (with ``decode``).
        n_open: Number of open gates, 0-d int64 (sparse mode, or ``count_open``); in sparse
            mode ``support.nnz`` is the same number as a Python int.
        support: The open gates' positions (sparse mode); ``support.to_sparse_coo(values)``
            gives a coalesced ``(batch, d_sae)`` sparse COO tensor with gradients to
            ``values``.
    """

    feature_acts: torch.Tensor
    gate_acts: torch.Tensor
    magnitude: torch.Tensor
    penalty: torch.Tensor
    reconstruction: torch.Tensor | None = None
    aux_reconstruction: torch.Tensor | None = None
    n_open: torch.Tensor | None = None
    support: Support | None = None


def gated_sae_function(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor | None,
    b_mag: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    penalty_weights: torch.Tensor | None,
    options: GatedFunctionOptions,
) -> GatedOutputs:
    """Run :class:`GatedSAEFunction` (not ``features_only``) and name its outputs.

    The sparse mode runs outside ``torch.compile`` graphs (``torch.compiler.disable``: its
    sizes depend on the data); the dense mode is traced.

    Args:
        sae_in: ``(batch, d_in)`` input, before the ``b_dec`` centering.
        W_enc: ``(d_in, d_sae)`` encoder.
        b_gate: ``(d_sae,)`` gate bias.
        r_mag: ``(d_sae,)`` magnitude log-scale, or None for ``pi_mag = pre + b_mag``.
        b_mag: ``(d_sae,)`` magnitude bias.
        W_dec: ``(d_sae, d_in)`` decoder.
        b_dec: ``(d_in,)`` decoder bias.
        penalty_weights: ``(d_sae,)`` weights of the L1 penalty, or None.
        options: Static settings.
    """
    if options.features_only:
        raise ValueError("gated_sae_function does not run features_only.")
    args = (sae_in, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, penalty_weights, options)
    if options.sparse:
        outputs = list(_apply_eagerly(*args))
    else:
        outputs = list(GatedSAEFunction.apply(*args))
    support = None
    if options.sparse:
        support = Support(outputs.pop(), sae_in.shape[0], W_enc.shape[1])
    n_open = outputs.pop() if options.returns_open_count else None
    x_hat, x_aux = (outputs[4], outputs[5]) if options.decode else (None, None)
    f, g, magnitude, penalty = outputs[:4]
    return GatedOutputs(f, g, magnitude, penalty, x_hat, x_aux, n_open, support)


def _apply(*args: Any) -> tuple[torch.Tensor, ...]:
    return GatedSAEFunction.apply(*args)


# The sparse mode's sizes depend on the data (nonzero): it runs outside compiled graphs.
_apply_eagerly = cast(
    Callable[..., tuple[torch.Tensor, ...]], torch.compiler.disable(_apply)
)


def _activate(
    g: torch.Tensor,
    magnitude: torch.Tensor,
    feature_acts: torch.Tensor,
    scale: torch.Tensor | None,
    mag_bias: torch.Tensor,
) -> None:
    """From ``pi_gate`` in ``g``: ``pi_mag`` into ``magnitude``, ``f`` into ``feature_acts``,
    then ``g`` becomes ``ReLU(pi_gate)``, in place. The per-feature ``scale`` and ``mag_bias``
    broadcast over a dense chunk or are already gathered at the open gates."""
    if scale is None:
        torch.add(g, mag_bias, out=magnitude)
    else:
        torch.addcmul(mag_bias, g, scale, out=magnitude)
    keep_where_positive(magnitude, g, out=feature_acts).clamp_(min=0)
    g.clamp_(min=0)


def _count_open(g: torch.Tensor) -> torch.Tensor:
    """The number of positive entries of ``g = ReLU(pi_gate)``, as a 0-d int64 tensor."""
    if g.device.type == "cpu" and g.numel() < 2**24:
        # count_nonzero and sums of booleans convert the chunk first: 10-20x slower on the
        # CPU. sign(g) is 0 or 1, and a float32 sum of fewer than 2^24 ones is exact.
        return torch.sign(g).sum(dtype=torch.float32).long()
    return torch.count_nonzero(g)


def _penalty(g: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    # A matrix-vector product (dense) or a dot product (values at the open gates).
    return g.sum() if weights is None else (g @ weights).sum()


@dataclass
class _FeatureSums:
    """Batch sums, per feature, of the gradients at ``pi_gate`` and ``pi_mag``, and of
    ``grad_pi_mag * pi_mag``."""

    gate: torch.Tensor
    mag: torch.Tensor
    mag_m: torch.Tensor

    @classmethod
    def zeros(
        cls, d_sae: int, dtype: torch.dtype, device: torch.device
    ) -> "_FeatureSums":
        return cls(*(torch.zeros(d_sae, dtype=dtype, device=device) for _ in range(3)))


class _Part(Protocol):
    """A piece of the batch that the backward's elementwise math runs on: a dense row
    chunk, or the open gates."""

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """This part of a whole-batch tensor (dense) or of row-major values (sparse)."""
        ...

    def per_feature(self, values: torch.Tensor) -> torch.Tensor:
        """A ``(d_sae,)`` tensor, broadcastable over this part."""
        ...

    def feature_sum(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-feature sum of this part's values."""
        ...

    def project(self, grad_recon: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``grad_recon @ W_dec.T`` on this part, written into ``out`` or a new tensor."""
        ...


class _Rows:
    """A dense row chunk."""

    def __init__(self, rows: slice, W_dec: torch.Tensor):
        self.rows, self.W_dec = rows, W_dec

    def take(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.rows]

    def per_feature(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def feature_sum(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return values.sum(dim=0, dtype=dtype)

    def project(self, grad_recon: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(grad_recon[self.rows], self.W_dec.T, out=out)


class _OpenGates:
    """The open gates, feature-major (see :class:`FeatureMajor`)."""

    def __init__(self, gates: FeatureMajor, W_dec: torch.Tensor):
        self.gates, self.W_dec = gates, W_dec

    def take(self, values: torch.Tensor) -> torch.Tensor:
        return self.gates.take(values)

    def per_feature(self, values: torch.Tensor) -> torch.Tensor:
        return self.gates.per_feature(values)

    def feature_sum(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.gates.feature_sum(values, dtype)

    def project(self, grad_recon: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # In float32 under bf16 autocast too: sampled_addmm refuses bf16 tensors.
        dot = self.gates.sampled_dot(grad_recon.to(self.W_dec.dtype), self.W_dec)
        return dot.to(out.dtype)


@dataclass
class _GradStep:
    """The upstream gradients and parameters the backward's elementwise math needs."""

    grad_f: torch.Tensor | None
    grad_g: torch.Tensor | None
    grad_magnitude: torch.Tensor | None
    recon_grad: torch.Tensor | None
    aux_grad: torch.Tensor | None
    W_dec: torch.Tensor
    scale: torch.Tensor | None
    penalty_per_feature: torch.Tensor | None
    sums: _FeatureSums

    def grad_pre(
        self,
        part: _Part,
        activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scratch_mag: torch.Tensor,
        scratch_gate: torch.Tensor,
    ) -> torch.Tensor:
        """d(loss)/d(x @ W_enc) on ``part``, accumulating the per-feature sums.

        Args:
            part: The dense row chunk or the open gates.
            activations: ``f``, ``g``, ``pi_mag`` on ``part``.
            scratch_mag: Buffer of the part's shape for the gradient at ``pi_mag``.
            scratch_gate: Buffer for the gradient at ``pi_gate`` (and the result).
        """
        f, g, magnitude = activations
        acc = self.sums.gate.dtype
        # Gradient reaching pi_mag: through f only where the feature fired, and directly
        # where pi_mag itself was used (a hook replaced it).
        upstream = self._upstream(part, self.grad_f, self.recon_grad, scratch_mag)
        grad_mag = keep_where_positive(upstream, f, out=upstream)
        if self.grad_magnitude is not None:
            grad_mag += part.take(self.grad_magnitude)
        self.sums.mag += part.feature_sum(grad_mag, acc)
        if self.scale is not None:
            torch.mul(grad_mag, magnitude, out=scratch_gate)
            self.sums.mag_m += part.feature_sum(scratch_gate, acc)
        # Gradient reaching pi_gate: from the losses on g, where the gate is open.
        upstream = self._upstream(part, self.grad_g, self.aux_grad, scratch_gate)
        if self.penalty_per_feature is not None:
            upstream += part.per_feature(self.penalty_per_feature)
        grad_gate = keep_where_positive(upstream, g, out=upstream)
        self.sums.gate += part.feature_sum(grad_gate, acc)
        if self.scale is None:
            return grad_gate.add_(grad_mag)
        return grad_gate.addcmul_(grad_mag, part.per_feature(self.scale))

    @staticmethod
    def _upstream(
        part: _Part,
        grad_out: torch.Tensor | None,
        grad_recon: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """The gradient arriving at an activation on ``part``, in ``out`` or a new tensor:
        from its direct use (``grad_out``) plus, through the decoder, ``grad_recon @
        W_dec.T``."""
        if grad_recon is not None:
            result = part.project(grad_recon, out)
            if grad_out is not None:
                result += part.take(grad_out)
            return result
        if grad_out is not None:
            return out.copy_(part.take(grad_out))
        return out.zero_()


def _dense_backward(
    step: _GradStep,
    activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    W_enc: torch.Tensor,
    decoder: torch.Tensor | None,
    aux_grad_for_dec: torch.Tensor | None,
    want_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The weight and input gradients, in row chunks with two chunk-sized scratch buffers
    (and, for bf16 products over several chunks, a third for their blocks). ``decoder``
    is ``W_dec`` in the compute dtype as the forward cast it (None: not decoded there)."""
    feature_acts, gate_acts, magnitude = activations
    work, acc = gate_acts.dtype, step.sums.gate.dtype
    n, d_sae = gate_acts.shape
    dec = step.W_dec.to(work) if decoder is None else decoder
    # W_enc in the compute dtype only for the input gradient, which training never needs.
    enc = W_enc.to(work) if want_input_grad else None
    grad_sae_in = None if enc is None else torch.empty_like(x, dtype=work)
    chunks = row_chunks(n, d_sae, gate_acts)
    grads = _ProductSums(acc, one_chunk=len(chunks) == 1)
    chunk_shape = (chunks[0].stop if chunks else 0, d_sae)
    scratch_mag_buffer = torch.empty(chunk_shape, dtype=work, device=x.device)
    scratch_gate_buffer = torch.empty_like(scratch_mag_buffer)
    for rows in chunks:
        f, g = feature_acts[rows], gate_acts[rows]
        grad_pre = step.grad_pre(
            _Rows(rows, dec),
            (f, g, magnitude[rows]),
            scratch_mag_buffer[: f.shape[0]],
            scratch_gate_buffer[: f.shape[0]],
        )
        grads.add("W_enc", x[rows].T, grad_pre)
        if enc is not None and grad_sae_in is not None:
            torch.mm(grad_pre, enc.T, out=grad_sae_in[rows])
        if step.recon_grad is not None:
            grads.add("W_dec", f.T, step.recon_grad[rows])
        if aux_grad_for_dec is not None:
            grads.add("W_dec", g.T, aux_grad_for_dec[rows])
    return grads.total("W_enc", W_enc), grads.total("W_dec", step.W_dec), grad_sae_in


class _ProductSums:
    """Sums of matmuls over row chunks, by name: each product in its operands' dtype, the
    sums in ``acc``.

    Under bf16 autocast (or with bf16 or fp16 parameters) the products are narrow matmuls,
    as autocast runs a standard SAE's weight gradients: float32 ones are 5x slower on a
    CPU with AMX, and slower still on a GPU's tensor cores. A batch of one chunk gets the
    first product of each sum widened, as autocast does; the other products are added in
    blocks of at most a chunk
    (:func:`~sae_lens_gated.saes.gated_sparse.row_chunks`: the scratch budget, 16 MiB on
    the CPU) through one reused buffer.

    Args:
        acc: The sums' dtype.
        one_chunk: Whether the batch is one chunk.
    """

    def __init__(self, acc: torch.dtype, one_chunk: bool):
        self.acc, self.one_chunk = acc, one_chunk
        self._sums: dict[str, torch.Tensor] = {}
        self._buffer: torch.Tensor | None = None

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add ``a @ b`` to the sum ``name``."""
        total = self._sums.get(name)
        if total is None and (self.one_chunk or a.dtype == self.acc):
            self._sums[name] = torch.mm(a, b).to(self.acc)
            return
        if total is not None and a.dtype == self.acc:
            total.addmm_(a, b)
            return
        if total is None:
            total = a.new_zeros((a.shape[0], b.shape[1]), dtype=self.acc)
            self._sums[name] = total
        # Blocks along the product's longer side.
        by_rows = a.shape[0] >= b.shape[1]
        long, short = (a.shape[0], b.shape[1]) if by_rows else (b.shape[1], a.shape[0])
        for part in row_chunks(long, short, a):
            if by_rows:
                a_part, b_part, sum_part = a[part], b, total[part]
            else:
                a_part, b_part, sum_part = a, b[:, part], total[:, part]
            sum_part.add_(torch.mm(a_part, b_part, out=self._scratch(sum_part, a)))

    def total(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The sum ``name``, of ``like``'s shape (zeros if nothing was added)."""
        total = self._sums.get(name)
        if total is None:
            return torch.zeros(like.shape, dtype=self.acc, device=like.device)
        return total

    def _scratch(self, shape_of: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A reused buffer of ``shape_of``'s shape and ``like``'s dtype."""
        numel = shape_of.numel()
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = like.new_empty(numel)
        return self._buffer[:numel].view(shape_of.shape)


def _sparse_backward(
    step: _GradStep,
    support: Support,
    activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    W_enc: torch.Tensor,
    aux_grad_for_dec: torch.Tensor | None,
    want_input_grad: bool,
    want_gate_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The weight and input gradients from the open gates, in feature-major order."""
    part = support.by_feature()
    f, g, magnitude = (part.take(values) for values in activations)
    work, acc = g.dtype, step.sums.gate.dtype
    grad_pre = step.grad_pre(
        _OpenGates(part, step.W_dec.to(acc)),
        (f, g, magnitude),
        torch.empty_like(g),
        torch.empty_like(g),
    )
    # The weight gradients gather rows of the compute dtype, as the dense mode's matmuls
    # read them; W_enc's comes out feature-major, (d_sae, d_in), and is laid out as W_enc.
    grad_W_enc = part.transposed_product(grad_pre, x).T
    grad_W_dec = None
    for values, grad_recon in ((f, step.recon_grad), (g, aux_grad_for_dec)):
        if grad_recon is not None:
            product = part.transposed_product(values, grad_recon)
            grad_W_dec = (
                product.to(acc) if grad_W_dec is None else grad_W_dec.add_(product)
            )
    if grad_W_dec is None:
        grad_W_dec = torch.zeros(step.W_dec.shape, dtype=acc, device=x.device)
    grad_sae_in = None
    if want_input_grad:
        enc_rows = W_enc.to(work).T.contiguous()
        grad_sae_in = support.decode(part.to_row_major(grad_pre), enc_rows)
    gate_sum = part.feature_sum(g, acc) if want_gate_sum else None
    return grad_W_enc, grad_W_dec, grad_sae_in, gate_sum


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused function computes in for ``dtype`` inputs: autocast's, where
    it is on for ``device_type``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _laid_out_as(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``param``'s dtype and layout: autograd would otherwise copy a gradient
    of another layout once more (the sparse mode's ``W_enc`` gradient is a transpose)."""
    if grad.dtype == param.dtype and grad.stride() == param.stride():
        return grad
    out = torch.empty_like(param)
    transposed = grad.dim() == 2 and grad.t().is_contiguous()
    if grad.device.type == "cpu" and grad.dtype != param.dtype and transposed:
        # The CPU copies a transpose in cache-sized blocks only within one dtype: a
        # transposing cast goes element by element, 2-3x slower than transposing blocks
        # of rows and widening each (bf16 to float32 at 512 x 8192: 12 ms against 4 ms;
        # at 2304 x 65536: 731 ms against 315 ms).
        rows = grad.t()
        step = max(1, TRANSPOSE_BLOCK_BYTES // (rows.shape[1] * rows.element_size()))
        for start in range(0, rows.shape[0], step):
            block = rows[start : start + step]
            out[:, start : start + step].copy_(block.t().contiguous())
        return out
    return out.copy_(grad)


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)

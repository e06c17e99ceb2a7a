"""Sparse helpers for gated SAEs: a batch's open-gate support and the products on it.

A trained gated SAE opens a few tens to a few hundred of its 16k-131k gates per token, and
every gradient of its training loss vanishes off the open-gate set. Once the encoder matmul
has been done densely, the rest of a training step can run on that set alone:

- :class:`SupportBuilder` collects the positions of a ``(batch, d_sae)`` matrix's positive (or
  nonzero) entries one row chunk at a time, while the chunk is in cache: converting a whole
  dense matrix afterwards (``to_sparse_csr``) costs more than the matmul that produced it;
- :class:`Support` holds those positions in row-major order (a coalesced COO index and CSR
  row pointers) and decodes values on them with ``embedding_bag``;
- :class:`FeatureMajor` is the same support sorted by feature (one stable sort of ``nnz``
  integers), the order for everything that runs over features: sampled dot products
  ``<grad[row], W_dec[feature]>`` read each decoder row once, and the weight gradients
  ``S^T @ dense`` are embedding bags with one bag per feature;
- :func:`sparse_decode` is ``features @ W_dec + b_dec`` on the nonzero entries only, for
  sparse COO/CSR tensors or dense ones, with autograd.

Every op here is a PyTorch op that runs on the CPU and on CUDA (``nonzero``, ``sort``,
``embedding_bag``, ``sampled_addmm``, ``index_add_``) and costs ``O(nnz * d_in)`` or less,
except the support extraction, which reads each chunk once.

Op choices, measured on a 2-core CPU (torch 2.13, 2 threads, ``d_in`` 512, ``d_sae`` 16384,
batch 4096, float32, 1% of entries nonzero; interleaved runs on a shared machine):
``embedding_bag`` decodes 2-3x faster than CSR ``@`` dense and 5x faster than COO;
``sampled_addmm`` on the feature-major pattern is 2.5x faster than on the row-major one; the
weight gradients as feature-major embedding bags are 5x faster than CSC ``@`` dense or dense
``@`` CSR, and ``index_add_`` of gathered rows is 50x slower. A whole-tensor ``to_sparse_csr``
costs more than the matmul that produced the tensor.
"""

import warnings

import torch
import torch.nn.functional as F

# Bytes per row chunk on the CPU in the dense mode, which writes three (batch, d_sae)
# outputs chunk by chunk: 16 MiB chunks stay in cache for the elementwise passes.
CPU_CHUNK_BYTES = 16 * 2**20
# The sparse forward writes each chunk's pre-activations into one reused scratch buffer, so it
# affords larger chunks. On the 2-core test machine 16, 64 and 256 MiB chunks gave the same
# sparse step when it was quiet, but with other jobs running 16 MiB chunks made it 1.5x
# slower than 64 MiB ones (four times as many ops, each waiting for its threads).
SPARSE_CPU_CHUNK_BYTES = 64 * 2**20
# The most bytes one chunk-sized scratch buffer of the fused gated function may take, on
# every device. Off the CPU a batch used to be one chunk, so the dense backward's two
# buffers and the sparse forward's pre-activations were (batch, d_sae): 16 GiB each at
# batch 4096 and d_sae 2**20 in fp32. 1 GiB chunks are still big enough (256 rows of 2**20
# fp32 features) that a GPU stays busy on each chunk's matmul.
SCRATCH_BUDGET_BYTES = 2**30


def row_chunks(
    n_rows: int, n_cols: int, like: torch.Tensor, chunk_bytes: int | None = None
) -> list[slice]:
    """Row slices of an ``(n_rows, n_cols)`` matrix of ``like``'s dtype and device.

    On every device a slice covers at most :data:`SCRATCH_BUDGET_BYTES` (but at least one
    row), so that a batch within the budget is one slice off the CPU. On the CPU each slice
    also covers about ``chunk_bytes`` (default :data:`CPU_CHUNK_BYTES`; at least 64 rows
    unless the budget allows fewer), to stay in cache.
    """
    row_bytes = max(1, n_cols * like.element_size())
    rows = max(1, SCRATCH_BUDGET_BYTES // row_bytes)
    if like.device.type == "cpu":
        cache = CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        rows = min(rows, max(64, cache // row_bytes))
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


class Support:
    """The positions of a ``(n_rows, n_features)`` matrix's entries, in row-major order.

    Args:
        indices: ``(2, nnz)`` int64 rows and features, sorted row-major without duplicates
            (a coalesced COO index).
        n_rows: Rows of the matrix (the batch).
        n_features: Columns of the matrix (``d_sae``).
        row_ptr: CSR row pointers, ``(n_rows + 1,)`` int64; computed from ``indices`` if not
            given.
    """

    def __init__(
        self,
        indices: torch.Tensor,
        n_rows: int,
        n_features: int,
        row_ptr: torch.Tensor | None = None,
    ):
        self.indices = indices
        self.n_rows = n_rows
        self.n_features = n_features
        self._row_ptr = row_ptr
        self._by_feature: FeatureMajor | None = None

    @property
    def row_ptr(self) -> torch.Tensor:
        """CSR row pointers, ``(n_rows + 1,)`` int64 (computed on first use)."""
        if self._row_ptr is None:
            bounds = torch.arange(self.n_rows + 1, device=self.indices.device)
            self._row_ptr = torch.searchsorted(self.rows, bounds)
        return self._row_ptr

    @classmethod
    def from_csr(
        cls, row_ptr: torch.Tensor, features: torch.Tensor, n_features: int
    ) -> "Support":
        """The support of a CSR matrix with these row pointers and column indices."""
        n_rows = row_ptr.numel() - 1
        rows = torch.repeat_interleave(
            torch.arange(n_rows, device=row_ptr.device), row_ptr.diff()
        )
        return cls(
            torch.stack([rows, features.long()]), n_rows, n_features, row_ptr.long()
        )

    @property
    def rows(self) -> torch.Tensor:
        return self.indices[0]

    @property
    def features(self) -> torch.Tensor:
        return self.indices[1]

    @property
    def nnz(self) -> int:
        return self.indices.shape[1]

    def per_feature(self, values: torch.Tensor) -> torch.Tensor:
        """A per-feature ``(n_features,)`` tensor's value at every position."""
        return values.index_select(0, self.features)

    def decode(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``S @ weight`` for the sparse matrix ``S`` with ``values`` at these positions."""
        return F.embedding_bag(
            self.features,
            weight,
            self.row_ptr,
            mode="sum",
            per_sample_weights=values.to(weight.dtype),
            include_last_offset=True,
        )

    def to_sparse_coo(self, values: torch.Tensor) -> torch.Tensor:
        """A coalesced sparse COO tensor with ``values`` at these positions."""
        return torch.sparse_coo_tensor(
            self.indices,
            values,
            (self.n_rows, self.n_features),
            is_coalesced=True,
            check_invariants=False,
        )

    def by_feature(self) -> "FeatureMajor":
        """The same positions sorted by feature (computed once, then kept)."""
        if self._by_feature is None:
            self._by_feature = FeatureMajor(self)
        return self._by_feature


class FeatureMajor:
    """A :class:`Support` sorted by feature, then row: the transposed matrix's CSR pattern.

    Values in this order are "feature-major"; :meth:`take` brings row-major values into it
    and :meth:`to_row_major` takes them back.

    Args:
        support: The row-major support.
    """

    def __init__(self, support: Support):
        # A stable sort keeps rows ascending within each feature. Narrow keys: PyTorch's
        # radix sort of int16 keys took 3 ms where int64 keys took 12-40 ms (671k keys).
        key_dtype = torch.int16 if support.n_features <= 2**15 else torch.int32
        keys, self.order = torch.sort(support.features.to(key_dtype), stable=True)
        self.features = keys.long()
        self.rows = support.rows.index_select(0, self.order)
        self.n_rows, self.n_features = support.n_rows, support.n_features
        counts = torch.bincount(support.features, minlength=support.n_features)
        self.feature_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """Row-major values in feature-major order."""
        return values.index_select(0, self.order)

    def to_row_major(self, values: torch.Tensor) -> torch.Tensor:
        """Feature-major values in row-major order."""
        return torch.empty_like(values).index_copy_(0, self.order, values)

    def per_feature(self, values: torch.Tensor) -> torch.Tensor:
        """A per-feature ``(n_features,)`` tensor's value at every position."""
        return values.index_select(0, self.features)

    def feature_sum(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Sum of feature-major ``values`` per feature, in ``dtype``."""
        out = torch.zeros(self.n_features, dtype=dtype, device=values.device)
        return out.index_add_(0, self.features, values.to(dtype))

    def sampled_dot(self, dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``<dense[row], weight[feature]>`` at every position: ``(dense @ weight.T)``
        sampled on the support, feature-major."""
        pattern = _csr(
            self.feature_ptr,
            self.rows,
            weight.new_zeros(self.rows.shape[0]),
            (self.n_features, self.n_rows),
        )
        sampled = torch.sparse.sampled_addmm(pattern, weight, dense.T, beta=0.0)
        return sampled.values()

    def transposed_product(
        self, values: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """``S.T @ dense``, ``(n_features, dense.shape[1])``, for the sparse ``S`` with the
        feature-major ``values``."""
        return F.embedding_bag(
            self.rows,
            dense,
            self.feature_ptr,
            mode="sum",
            per_sample_weights=values.to(dense.dtype),
            include_last_offset=True,
        )


class SupportBuilder:
    """Collects the support of a ``(n_rows, n_features)`` matrix one row chunk at a time.

    Each chunk is compared once into a reused boolean scratch buffer of ``chunk_rows`` rows,
    whose flat ``nonzero`` gives the positions; the values are gathered from the chunk.

    Args:
        n_rows: Rows of the whole matrix.
        n_features: Its columns.
        chunk_rows: The most rows a chunk will have.
        device: Where the chunks are.
        above: Keep the entries greater than this (a number, or one per feature; 0 finds the
            open gates in ``pi_gate``); None keeps the nonzero entries.
    """

    def __init__(
        self,
        n_rows: int,
        n_features: int,
        chunk_rows: int,
        device: torch.device,
        above: torch.Tensor | float | None = None,
    ):
        self.n_rows, self.n_features, self.above = n_rows, n_features, above
        self._mask = torch.empty(
            chunk_rows, n_features, dtype=torch.bool, device=device
        )
        self._positions: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def add(self, chunk: torch.Tensor, first_row: int) -> None:
        """Record the support of ``chunk`` (contiguous), rows ``first_row ...`` of the matrix."""
        mask = self._mask[: chunk.shape[0]]
        if self.above is None:
            torch.ne(chunk, 0, out=mask)
        else:
            torch.gt(chunk, self.above, out=mask)
        flat = mask.view(-1).nonzero().squeeze(1)
        self._values.append(chunk.view(-1).index_select(0, flat))
        if first_row:
            flat += first_row * self.n_features
        self._positions.append(flat)

    def build(self, like: torch.Tensor) -> tuple[Support, torch.Tensor]:
        """The support and the matrix's values on it (row-major).

        Args:
            like: A tensor of the matrix's dtype and device (used when no chunk was added).
        """
        if self._positions:
            flat, values = torch.cat(self._positions), torch.cat(self._values)
        else:
            flat = torch.zeros(0, dtype=torch.long, device=like.device)
            values = like.new_zeros(0)
        support = Support(
            _unflatten(flat, self.n_features), self.n_rows, self.n_features
        )
        return support, values


def sparse_decode(
    features: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """``features @ W_dec + b_dec``, computed on the nonzero entries of ``features`` only.

    A dense input's nonzero entries are found with one ``nonzero`` pass over it (no scratch
    buffer); the decoder is then an ``embedding_bag``.

    Gradients reach ``W_dec``, ``b_dec`` and the values of ``features`` on their support (for
    a dense input: its nonzero entries); the gradient at a dense input's zero entries is 0,
    not ``grad @ W_dec.T``, so the result matches dense autograd for everything computed
    before an activation that is 0 where its input's gradient is dropped (ReLU, a closed gate).

    Args:
        features: A 2-D sparse COO or CSR tensor, or a dense ``(..., d_sae)`` tensor.
        W_dec: The ``(d_sae, d_in)`` decoder.
        b_dec: The ``(d_in,)`` decoder bias, or None.
    """
    if features.layout == torch.sparse_coo:
        coalesced = features.coalesce()
        n_rows, n_features = coalesced.shape
        support = Support(coalesced.indices(), n_rows, n_features)
        values = coalesced.values()
        leading: tuple[int, ...] = (coalesced.shape[0],)
    elif features.layout == torch.sparse_csr:
        support = Support.from_csr(
            features.crow_indices(), features.col_indices(), features.shape[1]
        )
        values = features.values()
        leading = (features.shape[0],)
    else:
        leading = tuple(features.shape[:-1])
        flat = features.reshape(-1, features.shape[-1])
        n_rows, n_features = flat.shape
        # One nonzero over the input itself: no scratch buffer, nnz-sized outputs only.
        positions = flat.detach().reshape(-1).nonzero().squeeze(1)
        support = Support(_unflatten(positions, n_features), n_rows, n_features)
        values = flat.reshape(-1).index_select(0, positions)
    out = support.decode(values, W_dec)
    if b_dec is not None:
        out = out + b_dec
    return out.reshape(*leading, W_dec.shape[1])


def _unflatten(flat: torch.Tensor, n_features: int) -> torch.Tensor:
    """``(2, nnz)`` rows and features of the flat positions in a row-major matrix."""
    indices = flat.new_empty(2, flat.shape[0])
    torch.div(flat, n_features, rounding_mode="floor", out=indices[0])
    torch.remainder(flat, n_features, out=indices[1])
    return indices


def _csr(
    row_ptr: torch.Tensor,
    columns: torch.Tensor,
    values: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    with warnings.catch_warnings():
        # Printed once per process by every CSR constructor; the ops used here are tested.
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            row_ptr, columns, values, size, check_invariants=False
        )

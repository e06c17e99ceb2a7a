import pytest
import torch

import sae_lens_gated.saes.gated_sparse as gated_sparse
from sae_lens_gated.saes.gated_sparse import (
    Support,
    SupportBuilder,
    row_chunks,
    sparse_decode,
)
from tests.helpers import DEVICES


def _sparse_matrix(
    seed: int, n: int = 40, d_sae: int = 30, device: str = "cpu"
) -> torch.Tensor:
    """A float64 matrix with ~10% nonzero entries, an all-zero row and an all-zero column."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d_sae, generator=gen, dtype=torch.float64)
    keep = torch.rand(n, d_sae, generator=gen) < 0.1
    keep[3] = False
    keep[:, 7] = False
    return (values * keep).to(device)


def _support_of(dense: torch.Tensor) -> Support:
    n_rows, n_features = dense.shape
    return Support(torch.nonzero(dense).T.contiguous(), n_rows, n_features)


def test_row_chunks_cover_the_batch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gated_sparse, "CPU_CHUNK_BYTES", 64 * 10 * 4)
    chunks = row_chunks(150, 10, torch.empty(0))
    assert chunks == [slice(0, 64), slice(64, 128), slice(128, 150)]
    # At least 64 rows, and the whole batch in one chunk off the CPU.
    assert row_chunks(150, 10_000, torch.empty(0)) == chunks
    assert row_chunks(150, 10, torch.empty(0, device="meta")) == [slice(0, 150)]
    assert row_chunks(0, 10, torch.empty(0)) == []
    assert row_chunks(150, 10, torch.empty(0), chunk_bytes=100 * 10 * 4) == [
        slice(0, 100),
        slice(100, 150),
    ]


def test_row_chunks_off_the_cpu_split_a_batch_over_the_scratch_budget():
    # "meta" stands for any device other than the CPU: no cache-sized chunks there.
    float32 = torch.empty(0, device="meta")
    bfloat16 = torch.empty(0, dtype=torch.bfloat16, device="meta")
    assert gated_sparse.SCRATCH_BUDGET_BYTES == 2**30
    # 4096 x 2**16 float32 is exactly 1 GiB: one chunk; one row more is two.
    assert row_chunks(4096, 2**16, float32) == [slice(0, 4096)]
    assert row_chunks(4097, 2**16, float32) == [slice(0, 4096), slice(4096, 4097)]
    # 4096 x 2**20 float32 is 16 GiB: 2**30 / (4 * 2**20) = 256 rows per chunk.
    chunks = row_chunks(4096, 2**20, float32)
    assert chunks == [slice(start, start + 256) for start in range(0, 4096, 256)]
    assert len(row_chunks(4096, 2**20, bfloat16)) == 8  # 512 rows of 2 bytes
    # A row over the budget on its own is still one chunk.
    assert row_chunks(3, 2**29, float32) == [slice(0, 1), slice(1, 2), slice(2, 3)]


def test_the_scratch_budget_caps_every_device(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gated_sparse, "SCRATCH_BUDGET_BYTES", 50 * 10 * 4)
    meta, cpu = torch.empty(0, device="meta"), torch.empty(0)
    assert row_chunks(50, 10, meta) == [slice(0, 50)]
    assert row_chunks(150, 10, meta) == [slice(0, 50), slice(50, 100), slice(100, 150)]
    # On the CPU the budget wins over the cache-sized chunks, 64-row floor included.
    assert row_chunks(150, 10, cpu) == row_chunks(150, 10, meta)
    assert row_chunks(150, 10, cpu, chunk_bytes=2**30) == row_chunks(150, 10, meta)
    assert row_chunks(150, 10, cpu, chunk_bytes=1) == row_chunks(150, 10, meta)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("above", [None, 0.5, "per_feature"])
def test_builder_finds_the_support_chunk_by_chunk(
    above: float | str | None, device: str
):
    dense = _sparse_matrix(1, device=device)
    threshold = torch.linspace(-0.5, 0.5, 30, dtype=torch.float64, device=device)
    limit = threshold if above == "per_feature" else above
    assert not isinstance(limit, str)
    builder = SupportBuilder(40, 30, chunk_rows=16, device=dense.device, above=limit)
    for start in (0, 16, 32):
        builder.add(dense[start : start + 16], start)
    support, values = builder.build(like=dense)

    keep = dense != 0 if limit is None else dense > limit
    want = torch.nonzero(keep).T
    assert 0 < want.shape[1] < keep.numel()
    torch.testing.assert_close(support.indices, want, rtol=0, atol=0)
    torch.testing.assert_close(values, dense[keep], rtol=0, atol=0)
    torch.testing.assert_close(
        support.row_ptr,
        torch.cat([torch.zeros(1, device=device), keep.sum(1).cumsum(0)]).long(),
    )


def test_builder_without_chunks_or_open_positions_gives_an_empty_support():
    like = torch.zeros(0, dtype=torch.float64)
    support, values = SupportBuilder(5, 3, 2, like.device).build(like)
    assert support.indices.shape == (2, 0) and values.dtype == torch.float64
    torch.testing.assert_close(support.row_ptr, torch.zeros(6, dtype=torch.long))
    builder = SupportBuilder(5, 3, 5, like.device)
    builder.add(torch.zeros(5, 3), 0)
    support, values = builder.build(like)
    assert support.nnz == 0 and values.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [2, 3])
def test_products_on_the_support_match_dense_products(seed: int, device: str):
    dense = _sparse_matrix(seed, device=device)
    support = _support_of(dense)
    values = dense[dense != 0]
    gen = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(30, 6, generator=gen, dtype=torch.float64).to(device)
    A = torch.randn(40, 6, generator=gen, dtype=torch.float64).to(device)
    features = torch.arange(30.0, dtype=torch.float64, device=device)

    torch.testing.assert_close(support.decode(values, W), dense @ W)  # row 3 is 0
    torch.testing.assert_close(
        support.per_feature(features),
        support.features.double(),
    )
    by_feature = support.by_feature()
    assert by_feature is support.by_feature()  # sorted once
    order = torch.argsort(support.features * 40 + support.rows)
    torch.testing.assert_close(by_feature.order, order, rtol=0, atol=0)
    torch.testing.assert_close(by_feature.rows, support.rows[order], rtol=0, atol=0)
    torch.testing.assert_close(
        by_feature.features, support.features[order], rtol=0, atol=0
    )
    feature_major = by_feature.take(values)
    torch.testing.assert_close(
        by_feature.to_row_major(feature_major), values, rtol=0, atol=0
    )
    torch.testing.assert_close(feature_major, dense.T[dense.T != 0], rtol=0, atol=0)
    assert by_feature.feature_ptr[8] == by_feature.feature_ptr[7]  # column 7 is empty

    want_dot = (A @ W.T)[support.rows, support.features][order]
    torch.testing.assert_close(by_feature.sampled_dot(A, W), want_dot)
    torch.testing.assert_close(
        by_feature.transposed_product(feature_major, A), dense.T @ A
    )
    torch.testing.assert_close(
        by_feature.feature_sum(feature_major, torch.float64), dense.sum(0)
    )
    torch.testing.assert_close(
        by_feature.per_feature(features),
        by_feature.features.double(),
    )
    coo = support.to_sparse_coo(values)
    assert coo.is_coalesced()
    torch.testing.assert_close(coo.to_dense(), dense, rtol=0, atol=0)


def test_products_on_an_empty_support_are_zero():
    dense = torch.zeros(5, 4, dtype=torch.float64)
    support = _support_of(dense)
    W, A = torch.ones(4, 3, dtype=torch.float64), torch.ones(5, 3, dtype=torch.float64)
    empty = dense[dense != 0]
    torch.testing.assert_close(
        support.decode(empty, W), torch.zeros(5, 3, dtype=torch.float64)
    )
    by_feature = support.by_feature()
    assert by_feature.sampled_dot(A, W).shape == (0,)
    torch.testing.assert_close(
        by_feature.transposed_product(empty, A), torch.zeros(4, 3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        by_feature.feature_sum(empty, torch.float64),
        torch.zeros(4, dtype=torch.float64),
    )


def _decoder(seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    b_dec = torch.randn(6, generator=gen, dtype=torch.float64)
    return W_dec.to(device), b_dec.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["coo", "uncoalesced_coo", "csr"])
def test_sparse_decode_of_sparse_tensors_matches_dense(layout: str, device: str):
    dense = _sparse_matrix(4, device=device)
    W_dec, b_dec = _decoder(5, device)
    values = dense[dense != 0].clone().requires_grad_(True)
    indices = torch.nonzero(dense).T
    if layout == "csr":
        zero = torch.zeros(1, device=device)
        row_ptr = torch.cat([zero, (dense != 0).sum(1).cumsum(0)]).long()
        features = torch.sparse_csr_tensor(
            row_ptr, indices[1], values, dense.shape, check_invariants=True
        )
    elif layout == "coo":
        features = torch.sparse_coo_tensor(
            indices, values, dense.shape, check_invariants=True
        ).coalesce()
    else:  # reversed, and one entry split in two halves
        split = torch.cat([indices.flip(1), indices[:, :1]], dim=1)
        halves = torch.cat([values.flip(0), values[:1] / 2])
        halves = torch.cat([halves[:-2], halves[-2:-1] / 2, halves[-1:]])
        features = torch.sparse_coo_tensor(
            split, halves, dense.shape, check_invariants=True
        )
    W = W_dec.clone().requires_grad_(True)
    b = b_dec.clone().requires_grad_(True)
    out = sparse_decode(features, W, b)
    torch.testing.assert_close(out, dense @ W_dec + b_dec)

    dense_values = dense.clone().requires_grad_(True)
    W_ref = W_dec.clone().requires_grad_(True)
    b_ref = b_dec.clone().requires_grad_(True)
    ref = dense_values @ W_ref + b_ref
    upstream = torch.randn(
        ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    ).to(device)
    got = torch.autograd.grad(out, [values, W, b], upstream)
    want = torch.autograd.grad(ref, [dense_values, W_ref, b_ref], upstream)
    torch.testing.assert_close(got[0], want[0][dense != 0])  # the values' gradient
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_of_dense_features_matches_dense_autograd(device: str):
    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(3, 70, 30, generator=gen, dtype=torch.float64).to(device) - 1.2
    W_dec, b_dec = _decoder(8, device)

    def grads(decode: bool) -> tuple[torch.Tensor, ...]:
        leaves = [t.clone().requires_grad_(True) for t in (pre, W_dec, b_dec)]
        features = torch.relu(leaves[0])  # (3, 70, 30)
        if decode:
            out = sparse_decode(features, leaves[1], leaves[2])
        else:
            out = features @ leaves[1] + leaves[2]
        loss = out.pow(2).sum()
        return (out.detach(), *torch.autograd.grad(loss, leaves))

    got, want = grads(True), grads(False)
    assert 0.05 < float((pre > 0).double().mean()) < 0.2
    assert got[0].shape == (3, 70, 6)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            sparse_decode(torch.relu(pre), W_dec), want[0] - b_dec
        )


def test_feature_major_order_with_wide_dictionaries():
    # Past 2**15 features the sort keys are int32 instead of int16.
    indices = torch.tensor([[0, 0, 1, 2, 2], [5, 39_999, 39_999, 5, 20_000]])
    support = Support(indices, 3, 40_000)
    by_feature = support.by_feature()
    torch.testing.assert_close(
        by_feature.features, torch.tensor([5, 5, 20_000, 39_999, 39_999])
    )
    torch.testing.assert_close(by_feature.rows, torch.tensor([0, 2, 2, 0, 1]))
    torch.testing.assert_close(by_feature.order, torch.tensor([0, 3, 4, 1, 2]))
    torch.testing.assert_close(
        by_feature.feature_ptr[[0, 5, 6, 20_000, 20_001, 40_000]],
        torch.tensor([0, 0, 2, 2, 3, 5]),
    )

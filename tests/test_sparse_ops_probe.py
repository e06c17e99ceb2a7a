import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_gated.saes.gated_sparse import Support
from tests.helpers import load_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sparse_ops_probe.py"
probe = load_module(SCRIPT)


def _case(
    n_rows: int = 40, n_features: int = 100, d_in: int = 6, density: float = 0.1
) -> tuple[Support, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random support with rows 3 and 17 empty, values on it, their dense matrix and a
    decoder (float64)."""
    torch.manual_seed(0)
    support, _ = probe.random_support(n_rows, n_features, density, torch.device("cpu"))
    keep = (support.rows != 3) & (support.rows != 17)
    support = Support(support.indices[:, keep], n_rows, n_features)
    values = torch.rand(support.nnz, dtype=torch.float64) + 0.5
    dense = torch.zeros(n_rows, n_features, dtype=torch.float64)
    dense[support.rows, support.features] = values
    W = torch.randn(n_features, d_in, dtype=torch.float64)
    return support, values, dense, W


def test_the_random_support_opens_the_asked_fraction_where_the_pre_activation_is_positive():
    torch.manual_seed(0)
    support, pre = probe.random_support(200, 300, 0.05, torch.device("cpu"))
    expected = (pre > 0).nonzero()
    assert torch.equal(support.indices, expected.T)
    assert abs(support.nnz / (200 * 300) - 0.05) < 0.005
    # Sorted by feature for the feature-major ops, rows ascending within each feature.
    by_feature = support.by_feature()
    assert torch.equal(
        by_feature.features * 200 + by_feature.rows,
        torch.sort(support.features * 200 + support.rows).values,
    )


def test_the_paired_decode_is_both_decodes():
    support, values, dense, W = _case()
    second = values.flip(0) * 3
    dense_second = torch.zeros_like(dense)
    dense_second[support.rows, support.features] = second
    first_out, second_out = probe.PairPlan(support).decode(values, second, W)
    torch.testing.assert_close(first_out, dense @ W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second_out, dense_second @ W, rtol=1e-12, atol=1e-12)
    assert (first_out[[3, 17]] == 0).all()  # empty rows decode to 0


@pytest.mark.parametrize("tile_rows", [1, 7, 20, 99, 100, 1000])
def test_a_decode_tile_by_tile_matches_the_dense_product(tile_rows: int):
    # Tiles of one feature (some empty), of sizes dividing d_sae 100 or not, of the whole
    # decoder, and wider than it.
    support, values, dense, W = _case()
    tiles = probe.DecodeTiles(support, tile_rows)
    out = tiles.decode(values, W)
    torch.testing.assert_close(out, dense @ W, rtol=1e-12, atol=1e-12)
    assert (out[[3, 17]] == 0).all()  # empty rows
    # A permutation of the entries, by tile, then by row, features ascending.
    order = tiles.order
    assert torch.equal(order.sort().values, torch.arange(support.nnz))
    rows, features = support.rows[order], support.features[order]
    key = (features // tile_rows * 40 + rows) * 100 + features
    assert bool((key.diff() > 0).all())
    assert torch.equal(tiles.features, features % tile_rows)


def test_a_bf16_decode_tile_by_tile_sums_its_tiles_in_float32():
    torch.manual_seed(11)
    indices = torch.nonzero(torch.rand(64, 300) < 0.3).T.contiguous()
    support = Support(indices, 64, 300)
    values = torch.rand(support.nnz)
    W = torch.randn(300, 8).bfloat16()
    exact = torch.zeros(64, 300, dtype=torch.float64)
    exact[support.rows, support.features] = values.bfloat16().double()
    want = exact @ W.double()
    untiled = support.decode(values, W)
    tiled = probe.DecodeTiles(support, 4).decode(values, W)  # 75 tiles
    assert tiled.dtype == untiled.dtype == torch.bfloat16
    # Each tile's partial sum is rounded to bf16 once; summed in float32, they stay as
    # close as the one untiled bag (summed in bf16 they were 7x further: 0.017).
    scale = float(want.abs().max())
    untiled_error = float((untiled.double() - want).abs().max()) / scale
    tiled_error = float((tiled.double() - want).abs().max()) / scale
    assert untiled_error < 2**-8 and tiled_error < 2**-8


@pytest.mark.parametrize("rows_per_chunk", [None, 8, 7])
def test_the_sampled_product_through_a_matmul_reads_the_open_gates(
    rows_per_chunk: int | None, monkeypatch: pytest.MonkeyPatch
):
    support, _, _, W = _case()
    if rows_per_chunk is not None:  # the fused function's row chunks on a small budget

        def row_chunks(n_rows: int, n_cols: int, like: torch.Tensor) -> list[slice]:
            del n_cols, like
            step = rows_per_chunk
            return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]

        monkeypatch.setattr(probe, "row_chunks", row_chunks)
    grad = torch.randn(support.n_rows, W.shape[1], dtype=torch.float64)
    expected = (grad @ W.T)[support.rows, support.features]
    out = probe.sampled_via_matmul(support, grad, W)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_the_scattered_matrix_holds_the_values_on_the_support():
    support, values, dense, _ = _case()
    assert torch.equal(probe.scattered(support, values, torch.float64), dense)


def _main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )


SMALL = ["--d-in", "16", "--d-sae", "256", "--batch", "64", "--repeats", "2"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_probe_times_every_op_and_checks_every_alternative(dtype: str):
    done = _main(*SMALL, "--dtype", dtype, "--density", "0.05", "--tiles", "16", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    alternatives = {
        "decode_pair",
        "decode_via_matmul",
        "decode_tiled_16",
        "decode_tiled_100",
        "sampled_via_matmul",
        "wgrad_via_matmul",
    }
    assert set(summary["errors"]) == alternatives
    assert set(summary["ms"]) == alternatives | {
        "matmul",
        "support",
        "decode",
        "sampled",
        "wgrad",
        "decode_pair_prep",
        "decode_tiled_16_prep",
        "decode_tiled_100_prep",
    }
    assert summary["agree"] is True
    assert summary["tolerance"] == probe.TOLERANCE[getattr(torch, dtype)]
    assert all(0 <= e <= summary["tolerance"] for e in summary["errors"].values())
    assert summary["nnz"] == round(summary["density"] * 64 * 256)
    assert 0.02 < summary["density"] < 0.08
    for name, ms in summary["ms"].items():
        assert ms > 0, name
        assert summary["vs_matmul"][name] == pytest.approx(
            ms / summary["ms"]["matmul"], rel=1e-3
        )


def test_a_wrong_alternative_fails_the_probe(monkeypatch: pytest.MonkeyPatch):
    original = probe.DecodeTiles.decode

    def off_by_a_row(
        self: Any, values: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        return original(self, values, weight.roll(1, dims=0))

    monkeypatch.setattr(probe.DecodeTiles, "decode", off_by_a_row)
    args = probe._arguments([*SMALL, "--tiles", "32"])
    summary = probe.probe(args)
    assert summary["agree"] is False
    assert summary["errors"]["decode_tiled_32"] > 0.1
    assert summary["errors"]["decode_pair"] <= summary["tolerance"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--density", "0"], "--density must be in (0, 1]"),
        (["--d-sae", "0"], "--d-sae must be at least 1"),
        (["--tiles", "0"], "--tiles must be at least 1 each"),
        (["--dtype", "float16"], "argument --dtype: invalid choice"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as stopped:
        probe.main(args)
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("sparse_ops_probe: ") and message in err

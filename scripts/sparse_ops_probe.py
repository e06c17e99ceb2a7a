"""The sparse step's heavy ops, and what could replace each, timed at one shape on one device.

The GPU check's ``sparse_ops`` step. docs/gpu.md estimates that at 1% of the gates open on an
H100 the sparse step's gathers of decoder rows cost more than the dense matmuls they
replace; a profile of one step says which ops are slow, not whether another formulation of
them would be faster. This probe times, on one random support of the asked density:

- ``matmul``: one dense ``(batch, d_sae) @ (d_sae, d_in)`` product in the compute dtype, the
  unit every other op is reported in (a standard SAE's step does about six);
- ``support``: finding the open gates of a ``(batch, d_sae)`` pre-activation
  (``SupportBuilder``) and sorting them by feature (``Support.by_feature``);
- ``decode``, each of the step's two decodes as ``Support.decode`` does it (one embedding
  bag, batch rows in order, each reading its open features' rows of the whole decoder),
  against ``decode_tiled_T`` (an embedding bag per tile of ``T`` decoder rows, see
  :class:`DecodeTiles`), ``decode_pair`` (both decodes in one embedding bag, each batch row's
  two bags side by side, so that the second reads decoder rows the first just brought into
  cache) and ``decode_via_matmul`` (the values scattered into a dense matrix, then
  ``matmul``);
- ``sampled`` (``FeatureMajor.sampled_dot``: ``sampled_addmm``, float32) against
  ``sampled_via_matmul`` (the dense ``grad @ W_dec.T`` in the compute dtype, in the fused
  function's row chunks, read at the open gates);
- ``wgrad`` (``FeatureMajor.transposed_product``: one embedding bag per feature) against
  ``wgrad_via_matmul`` (the values scattered into a dense matrix, then one matmul).

Each alternative's index preparation, which a step would pay once for both of its uses, is
timed on its own (``*_prep``). Each alternative is checked against the op it would replace
(its largest error over the reference's largest entry, within ``tolerance``): a wrong
alternative fails the probe. The last line printed is a JSON summary.

usage: python scripts/sparse_ops_probe.py [--device cuda] [--dtype bfloat16] ...
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from typing_extensions import override

from sae_lens_gated.saes.gated_sparse import Support, SupportBuilder, row_chunks
from sae_lens_gated.training.sparse_policy import synchronize_device

# Largest error of an alternative over the reference's largest entry: bf16 rounds products
# and partial sums (about 2**-8 each), float32 only reorders sums.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


class _OneLineParser(argparse.ArgumentParser):
    """A command-line mistake is one line, and exit status 2, before any work."""

    @override
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sparse_ops_probe: {message}\n")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tiles",
        type=int,
        nargs="+",
        default=[2048, 8192],
        help="Decoder rows per tile of decode_tiled (one timing each).",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("d_in", "d_sae", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.density <= 1:
        parser.error("--density must be in (0, 1]")
    if min(args.tiles) < 1:
        parser.error("--tiles must be at least 1 each")
    return args


class PairPlan:
    """Both decodes of a step in one embedding bag: batch row ``r``'s bags are ``2r``
    (the first values) and ``2r + 1`` (the second), over the same features.

    Args:
        support: The open gates, row-major.
    """

    def __init__(self, support: Support):
        ptr = support.row_ptr
        counts = ptr.diff()
        start = ptr[:-1].repeat_interleave(counts, output_size=support.nnz)
        # Entry j of row r (entry start + j of all) goes to 2 * start + j in the first bag
        # and to that plus the row's count in the second.
        self.first = start + torch.arange(support.nnz, device=ptr.device)
        self.second = self.first + counts.repeat_interleave(
            counts, output_size=support.nnz
        )
        self.features = torch.empty(
            2 * support.nnz, dtype=torch.long, device=ptr.device
        )
        self.features[self.first] = support.features
        self.features[self.second] = support.features
        self.offsets = torch.empty(
            2 * support.n_rows + 1, dtype=torch.long, device=ptr.device
        )
        self.offsets[0::2] = 2 * ptr
        self.offsets[1::2] = 2 * ptr[:-1] + counts

    def decode(
        self, first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``S1 @ weight`` and ``S2 @ weight`` for the values ``first`` and ``second``."""
        values = torch.empty(
            self.features.shape[0], dtype=weight.dtype, device=weight.device
        )
        values[self.first] = first.to(weight.dtype)
        values[self.second] = second.to(weight.dtype)
        out = F.embedding_bag(
            self.features,
            weight,
            self.offsets,
            mode="sum",
            per_sample_weights=values,
            include_last_offset=True,
        )
        pair = out.view(-1, 2, weight.shape[1])
        return pair[:, 0], pair[:, 1]


class DecodeTiles:
    """A ``Support`` by tiles of ``tile_rows`` features, rows in order within each.

    A decode then runs tile by tile: one embedding bag per tile reads only the tile's
    decoder rows, which stay in cache while every batch row reads them (untiled, the rows
    of the whole decoder are in play at once). The tiles' partial products are summed in
    float32 (or in a wider weight's dtype). Because each batch row's features ascend, its
    entries of one tile are contiguous: the tile-major order comes from counts, without a
    sort.

    Args:
        support: The row-major support.
        tile_rows: Features per tile.
    """

    def __init__(self, support: Support, tile_rows: int):
        n_rows, nnz = support.n_rows, support.nnz
        n_tiles = -(-support.n_features // tile_rows)
        self.n_rows, self.tile_rows = n_rows, tile_rows
        features = support.features
        # Each entry's bag, in tile-major order: (tile, row).
        bag = torch.div(features, tile_rows, rounding_mode="floor")
        bag.mul_(n_rows).add_(support.rows)
        counts = torch.bincount(bag, minlength=n_tiles * n_rows)
        bag_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # A bag's entries keep their row-major order, so an entry moves by its bag's start
        # in the tile-major order minus its start in the row-major one: the row's first
        # entry plus the row's entries in earlier tiles.
        per_tile = counts.view(n_tiles, n_rows)
        starts = support.row_ptr[:-1] + (per_tile.cumsum(0) - per_tile)
        shift = bag_ptr[:-1] - starts.view(-1)
        position = torch.arange(nnz, device=bag.device)
        tile_major = shift.index_select(0, bag).add_(position)
        # order[j]: the row-major entry at tile-major position j.
        self.order = torch.empty_like(position).index_copy_(0, tile_major, position)
        local = torch.remainder(features, tile_rows)
        self.features = local.index_select(0, self.order)
        bounds = bag_ptr[::n_rows].tolist()  # each tile's first entry: one host copy
        # Each tile with an entry: its first feature, its entries, its bags' offsets.
        self._tiles = [
            (
                t * tile_rows,
                slice(bounds[t], bounds[t + 1]),
                bag_ptr[t * n_rows : (t + 1) * n_rows + 1] - bounds[t],
            )
            for t in range(n_tiles)
            if bounds[t + 1] > bounds[t]
        ]

    def decode(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``S @ weight`` for the row-major ``values``, in ``weight``'s dtype."""
        ordered = values.index_select(0, self.order).to(weight.dtype)
        acc = torch.promote_types(weight.dtype, torch.float32)
        out = torch.zeros(self.n_rows, weight.shape[1], dtype=acc, device=weight.device)
        for first, entries, offsets in self._tiles:
            out += F.embedding_bag(
                self.features[entries],
                weight[first : first + self.tile_rows],
                offsets,
                mode="sum",
                per_sample_weights=ordered[entries],
                include_last_offset=True,
            )
        return out.to(weight.dtype)


def _flat(support: Support) -> torch.Tensor:
    """Row-major flat positions of the support in a ``(n_rows, n_features)`` matrix."""
    return support.rows * support.n_features + support.features


def scattered(
    support: Support, values: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The dense ``(n_rows, n_features)`` matrix with ``values`` on the support."""
    dense = torch.zeros(
        support.n_rows, support.n_features, dtype=dtype, device=values.device
    )
    dense.view(-1)[_flat(support)] = values.to(dtype)
    return dense


def sampled_via_matmul(
    support: Support, dense: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``<dense[row], weight[feature]>`` at every open gate, row-major: ``dense @
    weight.T`` in the fused function's row chunks, read at the open gates."""
    ptr = support.row_ptr.tolist()
    flat = _flat(support)
    out = torch.empty(support.nnz, dtype=torch.float32, device=dense.device)
    for rows in row_chunks(support.n_rows, support.n_features, dense):
        lo, hi = ptr[rows.start], ptr[rows.stop]
        product = dense[rows] @ weight.T
        positions = flat[lo:hi] - rows.start * support.n_features
        out[lo:hi] = product.view(-1).index_select(0, positions)
    return out


def random_support(
    n_rows: int,
    n_features: int,
    density: float,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[Support, torch.Tensor]:
    """A support with each gate open with probability ``density``, found the way the
    sparse step finds it, and a ``(n_rows, n_features)`` pre-activation of ``dtype`` (the
    compute dtype) that opens it."""
    pre = torch.rand(n_rows, n_features, device=device).sub_(1 - density).to(dtype)
    return _find(pre), pre


def _find(pre: torch.Tensor) -> Support:
    """The open gates of ``pre``, as the sparse step finds them, and sorted by feature."""
    n_rows, n_features = pre.shape
    chunks = row_chunks(n_rows, n_features, pre)
    builder = SupportBuilder(
        n_rows, n_features, chunks[0].stop - chunks[0].start, pre.device, above=0.0
    )
    for rows in chunks:
        builder.add(pre[rows], rows.start)
    support, _ = builder.build(like=pre)
    support.by_feature()
    return support


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], Any]], float]:
    def median_ms(work: Callable[[], Any]) -> float:
        work()  # warm-up: allocations, kernels' first launch
        times: list[float] = []
        for _ in range(repeats):
            synchronize_device(device)
            start = time.perf_counter()
            work()
            synchronize_device(device)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return median_ms


def _error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(1e-30)
    return float((value.float() - reference.float()).abs().max() / scale)


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Every op's median milliseconds, its ratio to ``matmul``, and every alternative's
    error against the op it would replace."""
    device = torch.device(args.device)
    work = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    support, pre = random_support(args.batch, args.d_sae, args.density, device, work)
    W_dec = F.normalize(randn(args.d_sae, args.d_in), dim=1)
    dec = W_dec.to(work)  # the step decodes, and gathers, rows of the compute dtype
    f = randn(support.nnz).abs()
    g = randn(support.nnz).abs()
    grad = randn(args.batch, args.d_in)
    # The output gradient as the step's weight gradients and dense products read it: cast
    # once, outside the timings.
    grad_work = grad.to(work)
    by_feature = support.by_feature()
    f_feature = by_feature.take(f)
    dense_f = scattered(support, f, work)

    timed = _timer(device, args.repeats)
    ms: dict[str, float] = {
        "matmul": timed(lambda: dense_f @ dec),
        "support": timed(lambda: _find(pre)),
        "decode": timed(lambda: support.decode(f, dec)),
        "decode_pair_prep": timed(lambda: PairPlan(support)),
        "decode_via_matmul": timed(lambda: scattered(support, f, work) @ dec),
        "sampled": timed(lambda: by_feature.sampled_dot(grad, W_dec)),
        "sampled_via_matmul": timed(
            lambda: sampled_via_matmul(support, grad_work, dec)
        ),
        "wgrad": timed(lambda: by_feature.transposed_product(f_feature, grad_work)),
        "wgrad_via_matmul": timed(lambda: scattered(support, f, work).T @ grad_work),
    }
    reference = support.decode(f, dec)
    pair = PairPlan(support)
    ms["decode_pair"] = timed(lambda: pair.decode(f, g, dec))
    first, second = pair.decode(f, g, dec)
    errors = {
        "decode_pair": max(
            _error(first, reference), _error(second, support.decode(g, dec))
        ),
        "decode_via_matmul": _error(dense_f @ dec, reference),
    }
    for tile in args.tiles:
        ms[f"decode_tiled_{tile}_prep"] = timed(lambda: DecodeTiles(support, tile))
        tiles = DecodeTiles(support, tile)
        ms[f"decode_tiled_{tile}"] = timed(lambda: tiles.decode(f, dec))
        errors[f"decode_tiled_{tile}"] = _error(tiles.decode(f, dec), reference)
    sampled = by_feature.to_row_major(by_feature.sampled_dot(grad, W_dec))
    errors["sampled_via_matmul"] = _error(
        sampled_via_matmul(support, grad_work, dec), sampled
    )
    errors["wgrad_via_matmul"] = _error(
        dense_f.T @ grad_work,
        by_feature.transposed_product(f_feature, grad_work),
    )
    tolerance = TOLERANCE[work]
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "batch": args.batch,
        "density": support.nnz / (args.batch * args.d_sae),
        "nnz": support.nnz,
        "repeats": args.repeats,
        "ms": ms,
        "vs_matmul": {name: value / ms["matmul"] for name, value in ms.items()},
        "errors": errors,
        "tolerance": tolerance,
        "agree": all(error <= tolerance for error in errors.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    summary = probe(args)
    for name, value in summary["ms"].items():
        sys.stdout.write(
            f"{name:24s} {value:10.3f} ms {summary['vs_matmul'][name]:8.2f}x matmul\n"
        )
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0 if summary["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())

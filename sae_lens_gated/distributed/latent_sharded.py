"""Latent-sharded training: each process holds ``d_sae / N`` of the gated SAE's features.

A gated SAE's features are independent given the input: process ``r`` holds the encoder
columns, decoder rows, ``b_gate``, ``b_mag`` and ``r_mag`` of features
``[r * d_sae / N, (r + 1) * d_sae / N)`` (and the optimizer state of those), and every
process holds ``b_dec``. Each training step:

- every process encodes the whole global batch with its features and decodes it without
  ``b_dec``, in the fused gated function (``decode_bias=False``), with sparse steps on the
  open gates as in one process;
- one all-reduce sums the partial reconstructions ``x_hat`` and ``x_aux`` and the sparsity
  penalties (a ``2 x batch x d_in + 1`` buffer); ``b_dec`` is added once. The backward pass
  of that sum is the identity: every process computes the same loss of the sum;
- ``b_dec``'s gradient has a decoder part, identical everywhere, and a centering part that
  each process computes for its own features. A post-accumulate-grad hook sums it across
  processes; the decoder part was scaled by ``1/N`` on the way so that it is counted once.

The L1 penalty, the auxiliary loss and the unit-norm projection and renormalization stay
local: they are per-feature. SAELens's trainer clips by the norm of this process's
gradients, so when ``clip_grad_norm`` is on the plan undoes that clip and clips again by
the norm of the whole SAE's gradient (squared norms summed across processes, ``b_dec``
counted once). Resampling decides on the global dead set with the global loss, and each
process rewrites its own features.

Saving gathers the whole SAE on the first process and writes one ordinary SAELens folder;
loading reads each process's features from such a folder.
"""

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from safetensors import safe_open
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from sae_lens_gated.distributed.collectives import (
    Ranks,
    scale_gradient,
    sum_across_ranks,
)
from sae_lens_gated.distributed.guard import stop_everywhere_if_not_finite
from sae_lens_gated.distributed.pool import (
    FirstProcessPool,
    copy_first_resampler_state,
)
from sae_lens_gated.saes.gated_encoder import GatedEncoding, encode_gated
from sae_lens_gated.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.training.conventions import has_conventions_state
from sae_lens_gated.training.grad_clip import GradientClipUndo
from sae_lens_gated.training.resampling import DeadFeatureResampler

SHARDED_DIMS: dict[str, int] = {
    "W_enc": 1,
    "W_dec": 0,
    "b_gate": 0,
    "b_mag": 0,
    "r_mag": 0,
}
"""The dimension along which each per-feature parameter is split (``b_dec`` is whole)."""

SAELENS_MAX_GRAD_NORM = 1.0
"""The norm ``SAETrainer`` clips every step's gradient to (hard-coded in SAELens)."""


def feature_slice(d_sae: int, ranks: Ranks) -> slice:
    """The features process ``ranks.rank`` holds, as a slice of all ``d_sae``."""
    width = d_sae // ranks.world_size
    return slice(ranks.rank * width, (ranks.rank + 1) * width)


def rank_checkpoint_folder(folder: str | Path, rank: int) -> Path:
    """Where process ``rank`` keeps its part of a latent-sharded checkpoint.

    ``folder`` is the first process's folder (the whole SAE, an ordinary SAELens
    checkpoint, ``<checkpoint_path>/<name>``); process ``r > 0`` keeps its optimizer state
    and data position in ``<checkpoint_path>/rank<r>/<name>``.
    """
    folder = Path(folder)
    return folder if rank == 0 else folder.parent / f"rank{rank}" / folder.name


def is_rank_checkpoint_part(folder: str | Path, rank: int) -> bool:
    """Whether ``folder`` is where process ``rank`` keeps its part of a checkpoint, or
    stages it (the first process's part is the whole folder)."""
    return rank == 0 or f"rank{rank}" in Path(folder).parts


def whole_checkpoint_folder(folder: str | Path, rank: int) -> Path:
    """The first process's folder of the checkpoint whose process-``rank`` part is in
    ``folder`` (inverse of :func:`rank_checkpoint_folder`)."""
    folder = Path(folder)
    return folder if rank == 0 else folder.parent.parent / folder.name


class LatentShardedGatedTrainingSAE(GatedTrainingSAE):
    """This process's share of the features of a gated training SAE.

    Build it with :func:`shard_latents`. Its ``cfg.d_sae`` is the share's width, so
    SAELens's trainer sizes its firing statistics to the features it sees; ``d_sae_total``
    is the whole SAE's. Forward passes, saving and loading are collective: every process
    makes the same calls in the same order.

    Args:
        cfg: The whole SAE's config (``d_sae`` divisible by the number of processes).
        ranks: The processes of the run.
        gather_batch: Each process passes its own rows to ``training_forward_pass`` and the
            SAE trains on all processes' rows (False: every process passes the whole
            global batch).
    """

    def __init__(
        self, cfg: GatedTrainingSAEConfig, ranks: Ranks, gather_batch: bool = False
    ) -> None:
        check_shardable(cfg, ranks)
        super().__init__(dataclasses.replace(cfg, d_sae=cfg.d_sae // ranks.world_size))
        self.ranks = ranks
        self.d_sae_total = cfg.d_sae
        self.features = feature_slice(cfg.d_sae, ranks)
        self.gather_batch = gather_batch
        if self.conventions.resampler is not None:
            self.conventions.resampler = DeadFeatureResampler(
                self.cfg.resampling_schedule(),
                self.d_sae_total,
                seed=0,  # replaced by the first process's generator in shard_latents
                collectives=LatentShardedResampling(ranks, self.features),
            )
        self.conventions.use_parallel(LatentShardedPlan(self))

    # ---- training -----------------------------------------------------------------------

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self.gather_batch:
            return super().training_forward_pass(step_input)
        local = step_input.sae_in
        everything = self.ranks.all_gather(local.detach(), "gathering the global batch")
        output = super().training_forward_pass(
            dataclasses.replace(step_input, sae_in=everything)
        )
        # SAELens's trainer counts this process's rows: hand it back its own.
        rows = slice(
            self.ranks.rank * local.shape[0], (self.ranks.rank + 1) * local.shape[0]
        )
        return dataclasses.replace(
            output,
            sae_in=local,
            sae_out=output.sae_out[rows],
            feature_acts=_rows(output.feature_acts, rows),
            hidden_pre=_rows(output.hidden_pre, rows),
        )

    @override
    def encode_for_loss(
        self, x: torch.Tensor, decode: bool = False, sparse: bool = False
    ) -> GatedEncoding:
        """Encode with this process's features; always decode across all processes.

        Collective. ``penalty``, ``reconstruction`` and ``aux_reconstruction`` are the
        whole SAE's; the activations are this process's features'. The fused function
        decodes this process's part without ``b_dec`` (on the open gates only when
        ``sparse``); the parts are summed and ``b_dec`` added once.
        """
        del decode  # the losses always need the whole SAE's reconstructions
        encoding = encode_gated(
            self,
            x,
            penalty_weights=self.penalty_weights(),
            decode=True,
            aux_decoder_trainable=not self.cfg.freeze_decoder_in_aux,
            sparse=sparse,
            decoder_bias=False,
        )
        part_hat, part_aux = encoding.reconstruction, encoding.aux_reconstruction
        if part_hat is None or part_aux is None:
            # Hooks on the activations: the decoders run on the hooked values.
            features = encoding.feature_acts.reshape(-1, self.cfg.d_sae)
            gates = encoding.gate_acts.reshape(-1, self.cfg.d_sae)
            W_aux = (
                self.W_dec.detach() if self.cfg.freeze_decoder_in_aux else self.W_dec
            )
            part_hat, part_aux = features @ self.W_dec, gates @ W_aux
        partial = torch.stack(
            [part_hat.reshape(-1, self.cfg.d_in), part_aux.reshape(-1, self.cfg.d_in)]
        )
        wide = torch.promote_types(partial.dtype, torch.float32)
        summed = sum_across_ranks(
            torch.cat(
                [partial.flatten().to(wide), encoding.penalty.reshape(1).to(wide)]
            ),
            self.ranks,
            "summing the shards' reconstructions",
        )
        x_hat, x_aux = summed[:-1].view(partial.shape).to(partial.dtype)
        # The decoder's b_dec: its gradient is summed across processes with the centering
        # part, so each process contributes 1/N of it.
        b_dec = scale_gradient(self.b_dec, 1.0 / self.ranks.world_size)
        b_aux = b_dec.detach() if self.cfg.freeze_decoder_in_aux else b_dec
        shape = encoding.sae_in.shape
        return encoding._replace(
            penalty=summed[-1].to(encoding.penalty.dtype),
            reconstruction=(x_hat + b_dec).reshape(shape),
            aux_reconstruction=(x_aux + b_aux).reshape(shape),
        )

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Decode this process's features, summed with the other processes'. Collective."""
        partial = feature_acts @ self.W_dec
        sae_out = sum_across_ranks(partial, self.ranks, "decoding across shards")
        sae_out = self.hook_sae_recons(sae_out + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    # ---- the whole SAE --------------------------------------------------------------------

    @torch.no_grad()
    def gather_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole SAE's weights, on the CPU of the first process (None elsewhere).

        Collective; the first process receives one share at a time.
        """
        whole: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            if name in SHARDED_DIMS:
                parts = self.ranks.gather(tensor, f"gathering {name}")
                if parts is not None:
                    whole[name] = torch.cat(parts, dim=SHARDED_DIMS[name])
            else:
                whole[name] = tensor.detach().cpu().clone()
        return whole if self.ranks.is_first else None

    def gathered(self) -> GatedTrainingSAE | None:
        """The whole SAE as an ordinary plugin ``GatedTrainingSAE`` on the CPU of the first
        process (None elsewhere), with this run's resampler state and metadata. Collective.
        """
        metadata = _summed_sparsity_metadata(self)
        state = self.gather_state_dict()
        if state is None:
            return None
        cfg = dataclasses.replace(self.cfg, d_sae=self.d_sae_total, device="meta")
        # Built on the meta device: the random initialization is neither run nor kept.
        whole = GatedTrainingSAE(cfg)
        whole.load_state_dict(state, assign=True)
        whole.cfg.device = self.cfg.device
        whole.device = torch.device("cpu")
        whole.cfg.metadata = copy.deepcopy(self.cfg.metadata)
        for name, value in metadata.items():
            setattr(whole.cfg.metadata, name, value)
        whole.conventions.resampler = self.conventions.resampler
        whole.conventions.sparse_policy = self.conventions.sparse_policy
        return whole

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write the whole SAE as an ordinary SAELens training folder (first process).

        Collective. Where ``path`` is their part of a checkpoint (see
        :func:`rank_checkpoint_folder`), the other processes write their own training
        conventions' state there (resampler without the pool, sparse-step policy);
        elsewhere they write nothing, so as not to overwrite the first process's.
        """
        whole = self.gathered()
        if whole is not None:
            return whole.save_model(path)
        if is_rank_checkpoint_part(path, self.ranks.rank):
            Path(path).mkdir(parents=True, exist_ok=True)
            self.conventions.save(path)
        return Path(path) / SAE_WEIGHTS_FILENAME, Path(path) / SAE_CFG_FILENAME

    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write the whole SAE as an ordinary SAELens inference folder (first process).

        Collective; the other processes write nothing.
        """
        whole = self.gathered()
        if whole is not None:
            return whole.save_inference_model(path)
        return Path(path) / SAE_WEIGHTS_FILENAME, Path(path) / SAE_CFG_FILENAME

    @override
    @torch.no_grad()
    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        """Load this process's features from a whole-SAE checkpoint folder.

        ``checkpoint_path`` is the first process's folder, or this process's part of a
        latent-sharded checkpoint (see :func:`rank_checkpoint_folder`).
        """
        own = Path(checkpoint_path)
        folder = own
        if not (folder / SAE_WEIGHTS_FILENAME).exists():
            folder = whole_checkpoint_folder(folder, self.ranks.rank)
        self.load_state_dict(self.read_shard(folder / SAE_WEIGHTS_FILENAME))
        # Each process's conventions state is in its own part (the first process's, with
        # the pool, in the whole folder); older checkpoints kept only the first's.
        self.conventions.load(own if has_conventions_state(own) else folder)

    def read_shard(self, weights_path: str | Path) -> dict[str, torch.Tensor]:
        """This process's features from a whole SAE's ``sae_weights.safetensors`` (only
        its share is read), processed as plugin loading processes a whole state dict."""
        state: dict[str, torch.Tensor] = {}
        with safe_open(str(weights_path), framework="pt", device="cpu") as weights:
            names = list(weights.keys())
            missing = sorted({*SHARDED_DIMS, "b_dec"} - set(names))
            if missing:
                raise ValueError(f"{weights_path} has no {', '.join(missing)}.")
            for name in names:
                if name not in SHARDED_DIMS:
                    state[name] = weights.get_tensor(name)
                    continue
                tensor = weights.get_slice(name)
                dim = SHARDED_DIMS[name]
                width = tensor.get_shape()[dim]
                if width != self.d_sae_total:
                    raise ValueError(
                        f"{weights_path}: {name} has {width} features, expected "
                        f"d_sae={self.d_sae_total}."
                    )
                index = (slice(None),) * dim + (self.features,)
                state[name] = tensor[index]
        # Per-feature processing (e.g. folding non-unit decoder rows): shard by shard.
        self.process_state_dict_for_loading(state)
        return state


class LatentShardedPlan:
    """Sums ``b_dec``'s gradient across processes and clips by the whole SAE's norm.

    Args:
        sae: This process's share of the SAE.
    """

    def __init__(self, sae: LatentShardedGatedTrainingSAE) -> None:
        self.sae = sae
        self.ranks = sae.ranks
        # With clip_grad_norm=False the conventions undo SAELens's clip themselves.
        self.clip_undo = GradientClipUndo() if sae.cfg.clip_grad_norm else None
        self._handles: list[RemovableHandle] = []

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        """Hook ``b_dec``'s gradient sum, then (to run after it) the clip undo's records."""
        for handle in self._handles:
            handle.remove()
        self._handles = [
            p.register_post_accumulate_grad_hook(self._sum_b_dec)
            for p in params
            if p is self.sae.b_dec and p.requires_grad
        ]
        if self.clip_undo is not None:
            self.clip_undo.attach(params)

    @torch.no_grad()
    def _sum_b_dec(self, param: torch.Tensor) -> None:
        assert param.grad is not None
        self.ranks.all_reduce(param.grad, "summing the gradient of b_dec")

    def before_step(self) -> None:
        """Agree on finiteness; replace SAELens's per-process clip by the global one."""
        stop_everywhere_if_not_finite(
            self.sae.conventions, self.ranks, check_gradients=True
        )
        if self.clip_undo is None:
            return
        params = [p for p in self.sae.parameters() if p.grad is not None]
        self.clip_undo.restore(params)
        clip_grad_norm_across_shards(
            [p for p in params if p is not self.sae.b_dec],
            [p for p in params if p is self.sae.b_dec],
            self.ranks,
            SAELENS_MAX_GRAD_NORM,
        )

    @torch.no_grad()
    def after_step(self) -> None:
        """Give every process the first process's ``b_dec``.

        Undoing SAELens's per-process clip rescales each process's ``b_dec`` gradient by
        its own factor, equal up to rounding: without this, the copies of ``b_dec`` would
        drift apart by a few ulps per step.
        """
        self.ranks.broadcast(self.sae.b_dec.data, "copying the first process's b_dec")


@torch.no_grad()
def clip_grad_norm_across_shards(
    sharded: list[torch.nn.Parameter],
    replicated: list[torch.nn.Parameter],
    ranks: Ranks,
    max_norm: float,
) -> torch.Tensor:
    """Clip the gradients as ``torch.nn.utils.clip_grad_norm_`` clips a whole model's.

    The whole model's gradient norm: squared norms of the ``sharded`` gradients summed over
    processes, plus those of the ``replicated`` ones (identical everywhere) once.

    Returns:
        The whole model's gradient norm before clipping.
    """
    grads = [p.grad for p in [*sharded, *replicated] if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64, device=ranks.device)
    for p in sharded:
        if p.grad is not None:
            squares += torch.linalg.vector_norm(p.grad).double().pow(2).to(ranks.device)
    if ranks.is_first:
        for p in replicated:
            if p.grad is not None:
                squares += (
                    torch.linalg.vector_norm(p.grad).double().pow(2).to(ranks.device)
                )
    total = ranks.all_reduce(squares, "summing the squared gradient norms").sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    return total


class LatentShardedResampling(FirstProcessPool):
    """The resampler's collectives when each process holds some features and every row.

    The first process keeps the pool of recent inputs for all (one copy per run, not one
    per process). Scoring a pooled input takes every process's features, so at an event
    it sends every process each chunk of the pool in turn.

    Args:
        ranks: The processes of the run.
        features: The features this process holds.
    """

    def __init__(self, ranks: Ranks, features: slice) -> None:
        super().__init__(ranks)
        self.features = features

    def global_rows(self, rows: int) -> int:
        return rows

    def gather_rows(self, batch: torch.Tensor) -> torch.Tensor | None:
        # Every process holds the global batch; the first one pools it.
        return batch if self.ranks.is_first else None

    def combine_fired(self, fired: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_gather(
            fired.to(torch.uint8), "gathering the features' firing"
        ).bool()

    def local_features(self, d_sae: int) -> slice:
        del d_sae
        return self.features

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Every statistic on the values' device: torch.stack refuses to mix devices.
        wide = values.double()
        stats = torch.stack(
            [
                wide.where(mask, 0).sum(),
                mask.sum().double(),
                wide.sum(),
                wide.new_tensor(float(values.numel())),
            ]
        )
        self.ranks.all_reduce(stats, "averaging the alive features' encoder norms")
        alive_sum, n_alive, total, n = stats.unbind()
        return torch.where(n_alive > 0, alive_sum / n_alive, total / n).to(values.dtype)

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ranks.broadcast(tensor.clone(), "agreeing on the resampled inputs")

    def pool_chunks(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> tuple[int, Iterator[torch.Tensor]]:
        return -(-rows // chunk_rows), self._every_chunk(pool, rows, chunk_rows)

    def _every_chunk(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> Iterator[torch.Tensor]:
        dtype, d_in = self.pool_layout(pool)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            chunk = (
                torch.empty(stop - start, d_in, dtype=dtype)
                if pool is None
                else pool[start:stop]
            )
            yield self.ranks.broadcast(chunk, "sending the pooled inputs")

    def gather_scores(self, scores: torch.Tensor, rows: int) -> torch.Tensor:
        # Every process scored every row (summing the reconstructions of all features).
        return scores


def check_shardable(cfg: GatedTrainingSAEConfig, ranks: Ranks) -> None:
    """Raise a clear ``ValueError`` unless ``cfg`` can be split across ``ranks``."""
    if cfg.architecture() != "gated":
        raise ValueError(
            f"Latent sharding supports architecture 'gated', not {cfg.architecture()!r}."
        )
    if cfg.d_sae % ranks.world_size:
        raise ValueError(
            f"d_sae={cfg.d_sae} is not divisible by the {ranks.world_size} processes: "
            "latent sharding gives each process the same number of features."
        )


@torch.no_grad()
def shard_latents(
    sae: GatedTrainingSAE | None,
    cfg: GatedTrainingSAEConfig,
    ranks: Ranks | None = None,
    gather_batch: bool = False,
) -> LatentShardedGatedTrainingSAE:
    """Split the first process's whole SAE across processes. Collective.

    Each process receives its features one parameter at a time, ``b_dec`` and the
    resampler's state (so the run draws what the whole SAE's resampler would have).

    Args:
        sae: The whole SAE on the first process (ignored elsewhere; may be None there).
        cfg: The whole SAE's config (the same on every process).
        ranks: The processes of the run (default: the default process group).
        gather_batch: See :class:`LatentShardedGatedTrainingSAE`.
    """
    ranks = ranks or Ranks()
    if ranks.is_first and sae is None:
        raise ValueError("The first process must pass the whole SAE to shard_latents.")
    shard = LatentShardedGatedTrainingSAE(cfg, ranks, gather_batch=gather_batch)
    for name, target in shard.state_dict().items():
        chunks = None
        if ranks.is_first:
            assert sae is not None
            source = sae.state_dict()[name].detach()
            if name in SHARDED_DIMS:
                chunks = list(source.chunk(ranks.world_size, dim=SHARDED_DIMS[name]))
            else:
                chunks = [source] * ranks.world_size
        ranks.scatter(chunks, target, f"sending each process its share of {name}")
    resampler = shard.conventions.resampler
    if resampler is not None:
        whole_resampler = sae.conventions.resampler if sae is not None else None
        copy_first_resampler_state(
            whole_resampler, resampler, ranks, shard.W_dec.device
        )
    return shard


def _rows(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    """``tensor[rows]``, also for the sparse COO activations of a sparse step."""
    if not tensor.is_sparse:
        return tensor[rows]
    return tensor.narrow_copy(0, rows.start, rows.stop - rows.start)


def _summed_sparsity_metadata(sae: LatentShardedGatedTrainingSAE) -> dict[str, Any]:
    # SAELens's trainer records the mean L0 and dead-feature count of the features it saw,
    # this process's: the whole SAE's are their sums. Every process reaches this with the
    # same fields set (they are set at the end of training, everywhere).
    metadata = sae.cfg.metadata
    fields = [
        f for f in ("l0", "num_dead_features") if getattr(metadata, f, None) is not None
    ]
    if not fields:
        return {}
    values = torch.tensor(
        [float(getattr(metadata, f)) for f in fields], dtype=torch.float64
    )
    sae.ranks.all_reduce(values, "summing the shards' sparsity statistics")
    summed = dict(zip(fields, values.tolist()))
    if "num_dead_features" in summed:
        summed["num_dead_features"] = int(summed["num_dead_features"])
    return summed

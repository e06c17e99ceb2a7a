"""Dead-feature resampling (Bricken et al. 2023, adapted to gated SAEs as in the paper, App. D).

At each event, features that have not fired in the last ``resample_window`` training steps
get a new decoder row: a pooled recent training input (centered), chosen with probability
proportional to the square of its reconstruction loss and normalized to unit norm. Their
encoder column points the same way, scaled to ``resample_encoder_scale`` times the mean
encoder column norm of the alive features; their ``b_gate``, ``b_mag`` and ``r_mag`` are
reset to 0, and so are the optimizer moments of exactly those slices. The learning rate
then restarts at 0.1x and returns to its scheduled value on a cosine.

The state (step count, firing history, input pool, random generator, event counters) is a
plain tensor dict saved next to SAELens's checkpoints, so resuming is exact.

In a run of several processes (:mod:`sae_lens_gated.distributed`) every process keeps the
same resampler state, over all the SAE's features and the global batch (but for the pooled
inputs, which only the first process keeps): the few places where one process's view
differs from the whole go through :class:`ResamplingCollectives`.
"""

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae_lens_gated.metrics import widest_float

logger = logging.getLogger(__name__)

LR_DIP = 0.1  # Paper App. D.1: LR drops to 0.1x after each event.
_LOSS_CHUNK = 8192  # Pooled inputs per forward pass when scoring the pool.


ParameterSlice = tuple[torch.nn.Parameter, tuple[Any, ...]]


class ResampleTarget(Protocol):
    """What the resampler needs from an SAE."""

    W_dec: torch.nn.Parameter

    def per_example_reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """``||x - x_hat||^2`` per example, in the space the SAE is trained in."""
        ...

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """The input as the encoder sees it (normalized, minus ``b_dec``)."""
        ...

    def encoder_matrices(self) -> tuple[torch.nn.Parameter, ...]:
        """The ``(d_in, d_sae)`` encoder matrices, whose columns a restart rewrites."""
        ...

    def per_feature_encoder_parameters(self) -> tuple[torch.nn.Parameter, ...]:
        """The ``(d_sae,)`` encoder-side parameters, which a restart sets to 0."""
        ...


class ResamplingCollectives(Protocol):
    """How the resamplers of the processes of one training run act as one.

    In one process (:data:`SINGLE_PROCESS`) every method is the identity: the process holds
    the whole batch and every feature.
    """

    def global_rows(self, rows: int) -> int:
        """Rows of the global batch when this process holds ``rows`` of it."""
        ...

    def keeps_pool(self) -> bool:
        """Whether this process keeps the pooled inputs (where the processes hold the same
        SAE, one keeps them for all)."""
        ...

    def gather_rows(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The global batch, from this process's ``(rows, d_in)`` part of it, where
        :meth:`keeps_pool` (None elsewhere)."""
        ...

    def combine_fired(self, fired: torch.Tensor) -> torch.Tensor:
        """Which of all the SAE's features fired, from this process's ``fired`` flags."""
        ...

    def local_features(self, d_sae: int) -> slice:
        """The features this process holds, as a slice of all ``d_sae`` features."""
        ...

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of this process's per-feature ``values`` where ``mask`` over all processes
        (of all values if ``mask`` is empty everywhere)."""
        ...

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first process's ``tensor``, on every process."""
        ...

    def pool_chunks(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> tuple[int, Iterator[torch.Tensor]]:
        """The pooled inputs this process scores, in chunks of at most ``chunk_rows``.

        Args:
            pool: The ``(rows, d_in)`` pooled inputs where :meth:`keeps_pool`, else None.
            rows: How many inputs are pooled.
            chunk_rows: Most rows in one chunk.

        Returns:
            How many chunks there are (the same on every process, each of which must
            take every chunk: they may be sent as they are taken), and the chunks.
        """
        ...

    def gather_scores(self, scores: torch.Tensor, rows: int) -> torch.Tensor:
        """One score per pooled input, in the pool's order, on every process, from this
        process's ``scores`` of the rows of its :meth:`pool_chunks`."""
        ...

    def take_rows(
        self, pool: torch.Tensor | None, chosen: torch.Tensor
    ) -> torch.Tensor:
        """``pool[chosen]``, on every process (``pool`` as in :meth:`pool_chunks`)."""
        ...


class SingleProcess:
    """:class:`ResamplingCollectives` of a process that trains alone."""

    def global_rows(self, rows: int) -> int:
        return rows

    def keeps_pool(self) -> bool:
        return True

    def gather_rows(self, batch: torch.Tensor) -> torch.Tensor | None:
        return batch

    def combine_fired(self, fired: torch.Tensor) -> torch.Tensor:
        return fired

    def local_features(self, d_sae: int) -> slice:
        return slice(0, d_sae)

    def masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return values[mask].mean() if mask.any() else values.mean()

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def pool_chunks(
        self, pool: torch.Tensor | None, rows: int, chunk_rows: int
    ) -> tuple[int, Iterator[torch.Tensor]]:
        chunks = _kept(pool)[:rows].split(chunk_rows)
        return len(chunks), iter(chunks)

    def gather_scores(self, scores: torch.Tensor, rows: int) -> torch.Tensor:
        return scores

    def take_rows(
        self, pool: torch.Tensor | None, chosen: torch.Tensor
    ) -> torch.Tensor:
        pool = _kept(pool)
        return pool[chosen.to(pool.device)]


def _kept(pool: torch.Tensor | None) -> torch.Tensor:
    if pool is None:
        raise RuntimeError("This process keeps the resampling pool, but has none.")
    return pool


SINGLE_PROCESS = SingleProcess()


@dataclass(frozen=True)
class ResamplingSchedule:
    """When to resample and how.

    Args:
        event_steps: Explicit event steps (counted in completed training steps), or empty.
        every: Event period if ``event_steps`` is empty.
        window: A feature is dead if it has not fired in this many steps before an event.
        pool_size: Recent training inputs kept (only during the steps before an event).
        encoder_scale: New encoder columns get this times the mean alive column norm.
        lr_warmup_steps: Length of the cosine LR re-warm after an event (0: none).
        pool_device: Where the pooled inputs are kept (None: where the training inputs
            are). They are scored in chunks on the SAE's device.
    """

    event_steps: tuple[int, ...]
    every: int | None
    window: int
    pool_size: int
    encoder_scale: float
    lr_warmup_steps: int
    pool_device: str | None = None

    def next_event(self, completed_steps: int) -> int | None:
        """The first event step strictly after ``completed_steps``."""
        if self.event_steps:
            return next((s for s in self.event_steps if s > completed_steps), None)
        assert self.every is not None
        return (completed_steps // self.every + 1) * self.every


@dataclass(frozen=True)
class ResampleEvent:
    """What one resampling event did."""

    step: int
    n_dead: int
    resampled: torch.Tensor  # indices of resampled features


class DeadFeatureResampler:
    """Tracks firing and recent inputs, and resamples dead features at scheduled steps.

    Args:
        schedule: When and how to resample.
        d_sae: Number of features of the whole SAE (of all processes together).
        seed: Seed of the generator that draws the new directions.
        collectives: How this process's view combines with the other processes' of a run.
    """

    def __init__(
        self,
        schedule: ResamplingSchedule,
        d_sae: int,
        seed: int,
        collectives: ResamplingCollectives = SINGLE_PROCESS,
    ) -> None:
        self.schedule = schedule
        self.d_sae = d_sae
        self.collectives = collectives
        self.completed_steps = 0
        self.n_events = 0
        self.n_resampled = 0
        self.last_event_step: int | None = None
        self.last_event: ResampleEvent | None = None
        self.fired_in_window: torch.Tensor | None = None
        self.pool: torch.Tensor | None = None
        self.pool_count = 0  # rows written since the pool was allocated
        self.generator_state = torch.Generator().manual_seed(seed).get_state()
        self._batch_size_checked = False
        self._rewarm_checked = False

    # ---- during the forward pass ----------------------------------------------------------

    def observe(self, sae_in: torch.Tensor, feature_acts: torch.Tensor) -> None:
        """Record which features fired and, shortly before an event, the batch itself."""
        event = self.schedule.next_event(self.completed_steps)
        if event is None:
            return
        steps_left = event - self.completed_steps  # including this one
        if steps_left <= self.schedule.window:
            fired = self.collectives.combine_fired(fired_features(feature_acts))
            if self.fired_in_window is None or steps_left == self.schedule.window:
                self.fired_in_window = fired
            else:
                self.fired_in_window = self.fired_in_window | fired
        batch = sae_in.detach().reshape(-1, sae_in.shape[-1])
        rows = self.collectives.global_rows(batch.shape[0])
        self._check_batch_size(rows)
        if (steps_left - 1) * rows < self.schedule.pool_size:
            gathered = self.collectives.gather_rows(batch)
            self._add_to_pool(gathered, rows, batch.device)

    def _check_batch_size(self, batch_size: int) -> None:
        if self._batch_size_checked:
            return
        self._batch_size_checked = True
        if batch_size > self.schedule.pool_size:
            logger.warning(
                "resample_pool_size=%d is smaller than one training batch (%d inputs): "
                "resampling will only choose among the last %d inputs.",
                self.schedule.pool_size,
                batch_size,
                self.schedule.pool_size,
            )

    def _pool_device(self, inputs_device: torch.device) -> torch.device:
        pool_device = self.schedule.pool_device
        return inputs_device if pool_device is None else torch.device(pool_device)

    def _add_to_pool(
        self, batch: torch.Tensor | None, rows: int, inputs_device: torch.device
    ) -> None:
        """Write the global ``batch`` of ``rows`` rows into the ring buffer, or only count
        its rows where another process keeps the pool (``batch`` None)."""
        size = self.schedule.pool_size
        added = min(rows, size)
        if batch is not None:
            device = self._pool_device(inputs_device)
            if self.pool is None:
                self.pool = torch.empty(
                    size, batch.shape[1], dtype=batch.dtype, device=device
                )
            batch = batch[-size:].to(device)
            start = self.pool_count % size
            first = min(size - start, added)
            self.pool[start : start + first] = batch[:first]
            self.pool[: added - first] = batch[first:]
        self.pool_count += added

    # ---- around the optimizer step ------------------------------------------------------------

    def lr_factor(self) -> float:
        """LR multiplier for the step about to be taken (cosine from 0.1 back to 1)."""
        warmup = self.schedule.lr_warmup_steps
        if self.last_event_step is None or warmup <= 0:
            return 1.0
        t = self.completed_steps - self.last_event_step
        if t >= warmup:
            return 1.0
        return LR_DIP + (1 - LR_DIP) * 0.5 * (1 - math.cos(math.pi * t / warmup))

    def step_completed(
        self, sae: ResampleTarget, optimizer: torch.optim.Optimizer
    ) -> ResampleEvent | None:
        """Count a finished optimizer step and run the event scheduled after it, if any."""
        self.completed_steps += 1
        if self.schedule.next_event(self.completed_steps - 1) != self.completed_steps:
            return None
        self.last_event = self._run_event(sae, optimizer)
        return self.last_event

    @torch.no_grad()
    def _run_event(
        self, sae: ResampleTarget, optimizer: torch.optim.Optimizer
    ) -> ResampleEvent:
        start = time.perf_counter()
        step = self.completed_steps
        self.n_events += 1
        fired, pool, n_pooled = (
            self.fired_in_window,
            self.pool,
            min(self.pool_count, self.schedule.pool_size),
        )
        self.fired_in_window, self.pool, self.pool_count = None, None, 0
        dead = torch.zeros(self.d_sae, dtype=torch.bool) if fired is None else ~fired
        dead_idx = dead.nonzero().flatten().to(sae.W_dec.device)
        empty = torch.empty(0, dtype=torch.long)
        if dead_idx.numel() == 0 or n_pooled == 0:
            reason = (
                "no dead features"
                if dead_idx.numel() == 0
                else "the input pool is empty"
            )
            logger.info(
                "Resampling event %d at step %d: %s, nothing to do.",
                self.n_events,
                step,
                reason,
            )
            return ResampleEvent(
                step=step, n_dead=int(dead_idx.numel()), resampled=empty
            )

        inputs = self._sample_inputs(sae, pool, n_pooled, int(dead_idx.numel()))
        directions = sae.process_sae_in(inputs)
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        touched = reinitialize_features(
            sae,
            dead_idx,
            directions.to(sae.W_dec.dtype),
            ~dead.to(sae.W_dec.device),
            self.schedule.encoder_scale,
            self.collectives,
        )
        _reset_optimizer_slices(optimizer, touched)
        self._check_rewarm(optimizer)

        self.n_resampled += int(dead_idx.numel())
        self.last_event_step = step
        logger.info(
            "Resampling event %d at step %d: resampled %d dead features, choosing among "
            "%d pooled inputs (%.1f s).",
            self.n_events,
            step,
            dead_idx.numel(),
            n_pooled,
            time.perf_counter() - start,
        )
        return ResampleEvent(
            step=step, n_dead=int(dead_idx.numel()), resampled=dead_idx
        )

    def _check_rewarm(self, optimizer: torch.optim.Optimizer) -> None:
        """Warn once if the re-warm ends before Adam's zeroed moments have rebuilt."""
        if self._rewarm_checked:
            return
        self._rewarm_checked = True
        horizon = second_moment_horizon(optimizer)
        warmup = self.schedule.lr_warmup_steps
        if horizon is not None and warmup < round(horizon):
            logger.warning(
                "resample_lr_warmup_steps=%d is shorter than the optimizer's second-moment "
                "horizon, 1 / (1 - beta2) = %d steps: the restarted features' Adam moments "
                "are zeroed, so their updates are larger than usual (up to %.0fx at first) "
                "for about that many steps, and a shorter re-warm lets more of them die "
                "again (see the resampling docs). Consider resample_lr_warmup_steps >= %d.",
                warmup,
                round(horizon),
                math.sqrt(horizon),
                round(horizon),
            )

    def _sample_inputs(
        self, sae: ResampleTarget, pool: torch.Tensor | None, rows: int, n: int
    ) -> torch.Tensor:
        """``n`` of the ``rows`` pooled inputs, drawn with probability proportional to their
        squared loss (``pool`` is None where this process does not keep the pool)."""
        n_chunks, chunks = self.collectives.pool_chunks(pool, rows, _LOSS_CHUNK)
        # Scoring Bricken's 819,200 inputs is 100 forward passes: minutes at d_sae 2**20.
        scoring = tqdm(
            chunks,
            total=n_chunks,
            desc="Resampling: scoring the pooled inputs",
            unit="chunk",
            leave=False,
            disable=n_chunks < 2 or not _first_process(),
        )
        device = sae.W_dec.device
        wide = widest_float(device)
        scores = [
            sae.per_example_reconstruction_error(chunk.to(device)).to(wide)
            for chunk in scoring
            if chunk.shape[0]
        ]
        own = torch.cat(scores) if scores else torch.zeros(0, dtype=wide, device=device)
        losses = self.collectives.gather_scores(own, rows)
        weights = losses.pow(2).cpu()
        if not weights.sum() > 0:
            weights = torch.ones_like(weights)
        generator = torch.Generator()
        generator.set_state(self.generator_state)
        chosen = torch.multinomial(
            weights, n, replacement=n > int((weights > 0).sum()), generator=generator
        )
        chosen = self.collectives.agree(chosen)
        self.generator_state = generator.get_state()
        return self.collectives.take_rows(pool, chosen).to(sae.W_dec.device)

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self, include_pool: bool = True) -> dict[str, torch.Tensor]:
        """All resampler state as tensors (for a safetensors file).

        Args:
            include_pool: Include the pooled inputs (if this process keeps any).
        """
        state: dict[str, torch.Tensor] = {
            "completed_steps": torch.tensor(self.completed_steps),
            "n_events": torch.tensor(self.n_events),
            "n_resampled": torch.tensor(self.n_resampled),
            "last_event_step": torch.tensor(
                -1 if self.last_event_step is None else self.last_event_step
            ),
            "pool_count": torch.tensor(self.pool_count),
            "generator_state": self.generator_state.clone(),
        }
        if self.fired_in_window is not None:
            state["fired_in_window"] = self.fired_in_window.detach().cpu().clone()
        if self.pool is not None and include_pool:
            # The rows written so far: the rest of the buffer is uninitialized memory.
            filled = min(self.pool_count, self.schedule.pool_size)
            state["pool"] = self.pool[:filled].detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], device: Any) -> None:
        """Restore what :meth:`state_dict` returned."""
        required = {
            "completed_steps",
            "n_events",
            "n_resampled",
            "last_event_step",
            "pool_count",
            "generator_state",
        }
        missing = required - set(state)
        if missing:
            raise ValueError(f"Resampler state is missing {sorted(missing)}.")
        pool = state.get("pool") if self.collectives.keeps_pool() else None
        if self.collectives.keeps_pool() and pool is None and state["pool_count"] > 0:
            raise ValueError(
                f"Resampler state counts {int(state['pool_count'])} pooled inputs but "
                "holds none: it was saved by a process that does not keep the pool (not "
                "the first of a distributed run)."
            )
        self.completed_steps = int(state["completed_steps"])
        self.n_events = int(state["n_events"])
        self.n_resampled = int(state["n_resampled"])
        last = int(state["last_event_step"])
        self.last_event_step = None if last < 0 else last
        self.pool_count = int(state["pool_count"])
        self.generator_state = state["generator_state"].to(torch.uint8).clone()
        fired = state.get("fired_in_window")
        if fired is not None and fired.shape != (self.d_sae,):
            raise ValueError(
                f"Resampler state has fired_in_window of shape {tuple(fired.shape)}, "
                f"expected ({self.d_sae},)."
            )
        self.fired_in_window = None if fired is None else fired.to(device, torch.bool)
        # Where another process keeps the pool for all, this one keeps none.
        self.pool = (
            None
            if pool is None
            else self._pool_buffer(pool.to(self._pool_device(torch.device(device))))
        )

    def _pool_buffer(self, rows: torch.Tensor) -> torch.Tensor:
        """The pool buffer holding a saved pool's rows (all of them, or the rows written)."""
        size = self.schedule.pool_size
        filled = min(self.pool_count, size)
        if rows.ndim != 2 or rows.shape[0] not in (filled, size):
            raise ValueError(
                f"Resampler state has a pool of shape {tuple(rows.shape)}, expected "
                f"{filled} rows (pool_count {self.pool_count}, resample_pool_size {size})."
            )
        if rows.shape[0] == size:
            return rows
        pool = rows.new_empty(size, rows.shape[1])
        pool[:filled] = rows
        return pool


def _first_process() -> bool:
    """Whether this process shows progress: the only one, or the first of a run."""
    return not dist.is_initialized() or dist.get_rank() == 0


def fired_features(feature_acts: torch.Tensor) -> torch.Tensor:
    """Which features fired (``f > 0``) anywhere in a dense or sparse COO batch."""
    n_features = feature_acts.shape[-1]
    if feature_acts.layout == torch.sparse_coo:
        coalesced = feature_acts.detach().coalesce()
        fired = torch.zeros(n_features, dtype=torch.bool, device=feature_acts.device)
        fired[coalesced.indices()[-1][coalesced.values() > 0]] = True
        return fired
    # Activations are >= 0, so a column's maximum says whether it fired, without the
    # (batch, d_sae) boolean that `(acts > 0).any(0)` makes: 4 GiB at batch 4096 and d_sae
    # 2**20, in every step of the window before each event.
    return feature_acts.detach().reshape(-1, n_features).amax(dim=0) > 0


@torch.no_grad()
def reinitialize_features(
    sae: ResampleTarget,
    idx: torch.Tensor,
    directions: torch.Tensor,
    alive: torch.Tensor,
    encoder_scale: float,
    collectives: ResamplingCollectives = SINGLE_PROCESS,
) -> list[ParameterSlice]:
    """Restart features ``idx`` along unit ``directions``.

    The decoder rows become the directions; the columns of every encoder matrix point the
    same way with ``encoder_scale`` times that matrix's mean column norm over the ``alive``
    features; every per-feature encoder parameter (gate and magnitude biases, ``r_mag``)
    becomes 0, so both paths of a gated feature start identical.

    Args:
        sae: The SAE to rewrite in place.
        idx: Indices of the features to restart.
        directions: Unit vectors, one row per feature in ``idx``.
        alive: Boolean mask of the features that are not being restarted.
        encoder_scale: Relative norm of the new encoder columns (Bricken et al.: 0.2).
        collectives: Where ``sae`` holds only some of the features (latent-sharded
            training), ``idx``, ``directions`` and ``alive`` are over all features, and this
            process writes its own and takes the mean norms over all processes.

    Returns:
        The ``(parameter, index)`` slices written, whose optimizer state must be reset.
    """
    local = collectives.local_features(alive.numel())
    held = (idx >= local.start) & (idx < local.stop)
    idx, directions, alive = idx[held] - local.start, directions[held], alive[local]
    sae.W_dec.data[idx] = directions
    written: list[ParameterSlice] = [(sae.W_dec, (idx,))]
    for encoder in sae.encoder_matrices():
        mean_norm = collectives.masked_mean(encoder.norm(dim=0), alive)
        encoder.data[:, idx] = (directions * encoder_scale * mean_norm).T
        written.append((encoder, (slice(None), idx)))
    for parameter in sae.per_feature_encoder_parameters():
        parameter.data[idx] = 0
        written.append((parameter, (idx,)))
    return written


def second_moment_horizon(optimizer: torch.optim.Optimizer) -> float | None:
    """``1 / (1 - beta2)``: the steps over which Adam's zeroed second moment rebuilds (its
    bias correction counts the optimizer's steps, not the slice's), or None without betas.

    Until then a restarted slice's update is larger than usual by up to ``sqrt`` of it.
    """
    beta2 = [
        float(group["betas"][1])
        for group in optimizer.param_groups
        if isinstance(group.get("betas"), (tuple, list))
    ]
    if not beta2 or not 0 < max(beta2) < 1:
        return None
    return 1 / (1 - max(beta2))


def _reset_optimizer_slices(
    optimizer: torch.optim.Optimizer, slices: list[ParameterSlice]
) -> None:
    """Zero every per-element optimizer state (Adam's moments) of the resampled slices."""
    for param, index in slices:
        state = optimizer.state.get(param, {})
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value[index] = 0

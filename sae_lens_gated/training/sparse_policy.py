"""``sparse_step="auto"``: dense or sparse training steps, whichever the hardware runs faster.

A sparse step (everything after the encoder matmul on the open gates only) and a dense step
compute the same losses and gradients; which one is faster depends on the density of open
gates *and* on the hardware: the faster its matmuls, the less gathering and scattering a
sparse step can afford (on one 2-core CPU the break-even was 20-30% open gates, on another
about 5%, and on a GPU it may be far lower). So :class:`SparseStepPolicy` measures it, on
the device and the SAE it trains, with the real training steps:

- A step may be sparse only when the previous step opened at most
  :data:`~sae_lens_gated.saes.gated_function.SPARSE_STEP_MAX_DENSITY` of the gates: a
  sparse step's memory grows with the open gates, so above that ceiling it is never tried
  (a probe under way tolerates :data:`PROBE_CEILING_SLACK` times the ceiling).
- Once a step is eligible, the following steps *probe*: one untimed warm-up step in the
  mode the previous step did not run (the previous step warmed up its own), then
  :data:`PROBE_TIMED_STEPS` timed steps in each mode, alternating. Only the timed steps
  synchronize the device (before the forward pass and after the backward pass); since both
  modes compute the same step, a probe costs only the slower mode's steps.
- The mode with the lower median time wins; within :data:`TIE_MARGIN` dense wins, as it
  needs less memory and no host synchronisation.
- It probes again when the density (smoothed over about ten steps) has moved by
  :data:`REDECIDE_DENSITY_FACTOR` since the decision, or after a resampling event, but no
  sooner than :data:`REDECIDE_MIN_STEPS` steps after the previous probe started.
- It never tries a sparse step on a device whose PyTorch backend lacks the sparse step's
  ops (:func:`sparse_step_problem`; PyTorch's MPS backend has no sparse CSR tensors): there
  every step is dense, with one warning.

The clock and the device synchronisation are attributes, so tests can inject a clock.
"""

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from sae_lens_gated.saes.gated_function import (
    SPARSE_STEP_MAX_DENSITY,
    GatedFunctionOptions,
    compute_dtype,
    gated_sae_function,
)

logger = logging.getLogger(__name__)

SPARSE_POLICY_STATE_FILENAME = "gated_sparse_step_state.json"

# Timed steps per mode; the median of these decides.
PROBE_TIMED_STEPS = 3
# Sparse must be this much faster than dense (fraction of the dense median) to be chosen.
TIE_MARGIN = 0.05
# A density this many times higher or lower than at the decision asks for a new one.
REDECIDE_DENSITY_FACTOR = 2.0
# Weight of the newest step in the smoothed density compared with the decision's: one
# batch's density is noisy (2x between steps on small batches), a trend over ~10 steps less so.
DENSITY_SMOOTHING = 0.1
# Steps from the start of one probe to the start of the next, at least.
REDECIDE_MIN_STEPS = 300
# A probe under way goes on while a step opens at most this times the ceiling: one batch's
# density wobbles around its mean, and a probe started at 9.9% must not end at 10.1%.
PROBE_CEILING_SLACK = 1.1

# One untimed warm-up step (first-call allocations, caches), then the timed steps.
PROBE_STEPS = 1 + 2 * PROBE_TIMED_STEPS


def probe_modes(previous_sparse: bool) -> tuple[bool, ...]:
    """The modes of a probe's steps (True: sparse) after a step in ``previous_sparse``'s
    mode: the other mode's warm-up step, then both modes alternating, the previous first."""
    other = not previous_sparse
    return tuple(other if i % 2 == 0 else previous_sparse for i in range(PROBE_STEPS))


@dataclass(frozen=True)
class SparseStepDecision:
    """The outcome of one probe.

    Args:
        sparse: Whether the steps after it are sparse.
        dense_ms: Median time of the timed dense steps, in milliseconds.
        sparse_ms: Median time of the timed sparse steps, in milliseconds.
        density: Fraction of gates open at the end of the probe (smoothed over steps).
        step: The number of completed steps when it was made.
    """

    sparse: bool
    dense_ms: float
    sparse_ms: float
    density: float
    step: int

    @property
    def mode(self) -> str:
        return "sparse" if self.sparse else "dense"


def synchronize_device(device: torch.device) -> None:
    """Wait until ``device`` has run all the work queued on it (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type not in ("cpu", "meta") and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)  # PyTorch 2.6+: XPU and other backends


class SparseStepPolicy:
    """Chooses each training step's mode under ``sparse_step="auto"`` (see module docs).

    Call :meth:`begin_step` at the start of each training step's forward pass, read
    :meth:`next_sparse` for its mode, and call :meth:`end_step` after its backward pass
    with the fraction of gates it opened.

    Args:
        clock: Seconds from an arbitrary origin (default ``time.perf_counter``).
        synchronize: Waits for the device's queued work before the clock is read
            (default :func:`synchronize_device`).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        synchronize: Callable[[torch.device], None] = synchronize_device,
    ) -> None:
        self.clock = clock
        self.synchronize = synchronize
        self.steps = 0
        self.decision: SparseStepDecision | None = None
        self._density: float | None = None
        self._smoothed: float | None = None
        self._probe_position: int | None = None
        self._probe_started: int | None = None
        self._probe_first_sparse = True
        self._times: dict[str, list[float]] = {"dense": [], "sparse": []}
        self._redecide_pending = False
        self._timing: tuple[torch.device, float] | None = None
        # Why this process's device cannot run sparse steps (None: it can, or unknown yet).
        # Not saved with the state: a resumed run checks its own device.
        self.sparse_ruled_out: str | None = None
        self._plan()

    @property
    def probe_position(self) -> int | None:
        """The coming step's place in its probe (0: the warm-up step), None outside one."""
        return self._probe_position

    @property
    def density(self) -> float | None:
        """The fraction of gates the last step opened (None before the first)."""
        return self._density

    def next_sparse(self) -> bool:
        """Whether the coming step runs on the open gates only."""
        return self._next_sparse

    @property
    def times_next_step(self) -> bool:
        """Whether the coming step is a timed probe step (:meth:`begin_step` has work)."""
        return self._next_timed

    def _plan(self) -> None:
        # The coming step's mode, kept as two booleans: under torch.compile, reading them
        # guards on two flags, not on a density or a step count that change every step.
        position = self._probe_position
        if self._density is None or self.sparse_ruled_out is not None:
            self._next_sparse = False
        elif position is not None:  # the density is within the probe's slack
            self._next_sparse = self._probe_mode(position)
        elif self._density > SPARSE_STEP_MAX_DENSITY:
            self._next_sparse = False
        else:
            self._next_sparse = self.decision is not None and self.decision.sparse
        self._next_timed = position is not None and position >= 1

    def _probe_mode(self, position: int) -> bool:
        return probe_modes(previous_sparse=not self._probe_first_sparse)[position]

    def begin_step(self, device: torch.device) -> None:
        """Start the clock if the coming step is a timed probe step (before its forward).

        Runs outside ``torch.compile`` graphs (a clock and a synchronisation are not
        ops); callers that trace call it only when :attr:`times_next_step`.
        """
        _begin_step_eagerly(self, device)

    def _begin_step(self, device: torch.device) -> None:
        self._timing = None
        if self._next_timed:
            self.synchronize(device)
            self._timing = (device, self.clock())

    def stop_clock(self) -> None:
        """Record a timed probe step's time (right after its backward pass)."""
        if self._timing is None or self._probe_position is None:
            return
        device, start = self._timing
        self.synchronize(device)
        mode = "sparse" if self._probe_mode(self._probe_position) else "dense"
        self._times[mode].append(self.clock() - start)
        self._timing = None

    def end_step(self, density: float | None) -> None:
        """Count the step that just finished its backward pass and plan the next one.

        Args:
            density: The fraction of gates the step opened, None if not measured.
        """
        self.stop_clock()
        self.steps += 1
        self._advance(density)
        self._plan()

    def _advance(self, density: float | None) -> None:
        if density is None:
            return
        self._density = density
        smoothed = self._smoothed
        if smoothed is None or self._probe_position == 0:  # restart at a probe's start
            smoothed = density
        smoothed += DENSITY_SMOOTHING * (density - smoothed)
        self._smoothed = smoothed
        if self._probe_position is not None:
            if density > PROBE_CEILING_SLACK * SPARSE_STEP_MAX_DENSITY:
                self._end_probe()  # sparse steps are off now; retried after the interval
            elif self._probe_position + 1 == PROBE_STEPS:
                self._decide(smoothed)
            else:
                self._probe_position += 1
            return
        if density <= SPARSE_STEP_MAX_DENSITY and self._wants_probe(smoothed):
            # _next_sparse is still the mode of the step that just ended.
            self._probe_first_sparse = not self._next_sparse
            self._probe_position = 0
            self._probe_started = self.steps
            self._redecide_pending = False

    def request_decision(self) -> None:
        """Probe again when next allowed (after a resampling event)."""
        self._redecide_pending = True

    def rule_out_sparse(self, reason: str) -> None:
        """Keep every step dense from now on: this process's device cannot run sparse ones.

        Ends a probe under way and logs one warning.

        Args:
            reason: Why, for the warning (see :func:`sparse_step_problem`).
        """
        if self.sparse_ruled_out is None:
            logger.warning("sparse_step=auto keeps every step dense: %s", reason)
        self.sparse_ruled_out = reason
        self._end_probe()
        self._plan()

    def _wants_probe(self, density: float) -> bool:
        if self.sparse_ruled_out is not None:
            return False
        started = self._probe_started
        if started is not None and self.steps - started < REDECIDE_MIN_STEPS:
            return False
        if self.decision is None or self._redecide_pending:
            return True
        low, high = sorted((density, self.decision.density))
        return high > REDECIDE_DENSITY_FACTOR * low

    def _decide(self, density: float) -> None:
        if not (self._times["dense"] and self._times["sparse"]):
            # Steps run without begin_step (not through training_forward_pass): untimed.
            self._end_probe()
            return
        dense_ms = 1e3 * statistics.median(self._times["dense"])
        sparse_ms = 1e3 * statistics.median(self._times["sparse"])
        sparse = sparse_ms < (1 - TIE_MARGIN) * dense_ms
        self.decision = SparseStepDecision(
            sparse, dense_ms, sparse_ms, density, self.steps
        )
        self._end_probe()
        logger.info(
            "sparse_step=auto at step %d: dense %.2f ms, sparse %.2f ms (medians of %d) "
            "at %.3g%% open gates: %s steps",
            self.steps,
            dense_ms,
            sparse_ms,
            PROBE_TIMED_STEPS,
            100 * density,
            self.decision.mode,
        )

    def _end_probe(self) -> None:
        self._probe_position = None
        self._times = {"dense": [], "sparse": []}

    def metrics(self) -> dict[str, float]:
        """W&B values of the current decision (none before the first)."""
        if self.decision is None:
            return {}
        return {
            "sparse_step_sparse": float(self.decision.sparse),
            "sparse_step_dense_ms": self.decision.dense_ms,
            "sparse_step_sparse_ms": self.decision.sparse_ms,
        }

    # ---- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides future steps' modes (JSON-serializable)."""
        return {
            "steps": self.steps,
            "decision": None if self.decision is None else asdict(self.decision),
            "density": self._density,
            "smoothed_density": self._smoothed,
            "probe_position": self._probe_position,
            "probe_started": self._probe_started,
            "probe_first_sparse": self._probe_first_sparse,
            "times": {mode: list(times) for mode, times in self._times.items()},
            "redecide_pending": self._redecide_pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values.

        Raises:
            ValueError: If ``state`` is not such a dict.
        """
        try:
            decision = state["decision"]
            position = state["probe_position"]
            if position is not None and not 0 <= int(position) < PROBE_STEPS:
                raise ValueError(f"probe_position {position} out of range")
            times = {
                mode: [float(t) for t in state["times"][mode]]
                for mode in ("dense", "sparse")
            }
            loaded = (
                int(state["steps"]),
                None if decision is None else SparseStepDecision(**decision),
                None if state["density"] is None else float(state["density"]),
                None
                if state["smoothed_density"] is None
                else float(state["smoothed_density"]),
                None if position is None else int(position),
                None if state["probe_started"] is None else int(state["probe_started"]),
                bool(state["redecide_pending"]),
                bool(state["probe_first_sparse"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"Not a sparse-step policy state: {error}") from error
        (
            self.steps,
            self.decision,
            self._density,
            self._smoothed,
            self._probe_position,
            self._probe_started,
            self._redecide_pending,
            self._probe_first_sparse,
        ) = loaded
        self._times = times
        self._plan()

    def save(self, folder: str | Path) -> None:
        """Write the state next to a SAELens checkpoint."""
        path = Path(folder) / SPARSE_POLICY_STATE_FILENAME
        path.write_text(json.dumps(self.state_dict(), indent=1))

    def load(self, folder: str | Path) -> None:
        """Restore the state from a SAELens checkpoint folder (a fresh start without one).

        Raises:
            ValueError: If the file exists but cannot be read as a policy state.
        """
        path = Path(folder) / SPARSE_POLICY_STATE_FILENAME
        if not path.exists():
            logger.info(
                "%s has no %s: sparse_step=auto decides anew.", folder, path.name
            )
            return
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise ValueError("expected a JSON object")
            self.load_state_dict(state)  # pyright: ignore[reportUnknownArgumentType]
        except ValueError as error:
            raise ValueError(f"Could not read {path}: {error}") from error


# Answers of sparse_step_problem, by device, input dtype, parameter dtype and autocast dtype.
_SPARSE_PROBLEMS: dict[
    tuple[str, torch.dtype, torch.dtype, torch.dtype], str | None
] = {}


def _sparse_step_problem(
    device: torch.device, dtype: torch.dtype, param_dtype: torch.dtype
) -> str | None:
    key = (str(device), dtype, param_dtype, compute_dtype(device.type, dtype))
    if key not in _SPARSE_PROBLEMS:
        _SPARSE_PROBLEMS[key] = _try_sparse_step(device, dtype, param_dtype)
    return _SPARSE_PROBLEMS[key]


def _try_sparse_step(
    device: torch.device, dtype: torch.dtype, param_dtype: torch.dtype
) -> str | None:
    """One sparse forward and backward pass of the fused function on a tiny batch."""
    # A generator of its own: the global random state, which training draws from, stays.
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int, grad: bool = True) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator)
        return values.to(device, param_dtype if grad else dtype).requires_grad_(grad)

    d_in, d_sae = 3, 8
    sae_in = tensor(5, d_in, grad=False)
    params = [tensor(d_in, d_sae), tensor(d_sae), tensor(d_sae)]  # W_enc, b_gate, r_mag
    params += [tensor(d_sae), tensor(d_sae, d_in), tensor(d_in)]  # b_mag, W_dec, b_dec
    W_enc, b_gate, r_mag, b_mag, W_dec, b_dec = params
    options = GatedFunctionOptions(
        center=True, decode=True, aux_decoder_trainable=True, sparse=True
    )
    try:
        out = gated_sae_function(
            sae_in,
            W_enc,
            b_gate,
            r_mag,
            b_mag,
            W_dec,
            b_dec,
            None,
            options,
        )
        assert out.reconstruction is not None and out.aux_reconstruction is not None
        loss = out.reconstruction.square().sum() + out.aux_reconstruction.square().sum()
        torch.autograd.grad(loss + out.penalty, params)
    except (NotImplementedError, RuntimeError) as error:
        message = str(error).strip().splitlines() or [""]
        return f"{type(error).__name__}: {message[0]}"
    return None


def sparse_step_problem(
    device: torch.device, dtype: torch.dtype, param_dtype: torch.dtype
) -> str | None:
    """Why a sparse training step cannot run on ``device``, or None where it runs.

    The sparse step needs ops that PyTorch implements on CPUs and CUDA GPUs but not on every
    backend (``sampled_addmm`` and sparse CSR tensors, ``embedding_bag``, ...): PyTorch's MPS
    backend, for one, has no sparse CSR tensors. The first call for a device, dtypes and
    autocast state (the caller's) runs one sparse forward and backward pass of the fused
    function on a tiny batch there; later calls return its answer. Runs outside
    ``torch.compile`` graphs.

    Args:
        device: Where the SAE trains.
        dtype: The training batch's dtype.
        param_dtype: The SAE parameters' dtype.

    Returns:
        The error the tiny step raised (its type and first line), or None.
    """
    return _sparse_step_problem_eagerly(device, dtype, param_dtype)


_sparse_step_problem_eagerly = cast(
    Callable[[torch.device, torch.dtype, torch.dtype], str | None],
    torch.compiler.disable(_sparse_step_problem),
)


_begin_step_eagerly = cast(
    Callable[[SparseStepPolicy, torch.device], None],
    torch.compiler.disable(SparseStepPolicy._begin_step),  # pyright: ignore[reportPrivateUsage]
)

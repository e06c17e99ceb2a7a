"""Detection of non-finite training batches that adds no device synchronisation."""

from collections import deque

import torch


class NonFiniteBatchError(ValueError):
    """A training batch contained NaN or infinite values."""


_STOPPED_STEP = (
    "A training batch contained NaN or inf values; the optimizer step was stopped "
    "before updating any weights. Check the activation source."
)


class BatchGuard:
    """Checks that training batches are finite before they can reach the weights.

    On the CPU the check is immediate. On CUDA the finiteness flag is copied to pinned host
    memory asynchronously and read just before the optimizer step (:meth:`raise_if_bad`),
    waiting only on an event recorded in the forward pass, which the device has passed by the
    time the backward pass has been queued: no extra synchronisation of the device queue. A
    bad batch therefore raises before any weight or optimizer state is updated with it.

    Inside ``torch.compile`` no host round trip can be traced, so the finiteness flag is kept
    as a tensor and read in the optimizer pre-step hook instead (on CUDA that read waits for
    the queued work: one synchronisation per step in compiled mode).
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        self._deferred: torch.Tensor | None = None

    def check(self, sae_in: torch.Tensor) -> None:
        """Record (CUDA, compiled code) or check (otherwise) that ``sae_in`` is finite."""
        finite = torch.isfinite(sae_in).all()
        if torch.compiler.is_compiling():
            self._deferred = finite
            return
        if sae_in.device.type != "cuda":
            if not bool(finite):
                raise _error(sae_in)
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((flag, event))

    def raise_if_bad(self) -> None:
        """Raise :class:`NonFiniteBatchError` if a recorded batch was not finite."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None and not bool(deferred):
            raise NonFiniteBatchError(_STOPPED_STEP)
        while self._pending:
            flag, event = self._pending.popleft()
            event.synchronize()
            if not bool(flag):
                self._pending.clear()
                raise NonFiniteBatchError(_STOPPED_STEP)


def _error(sae_in: torch.Tensor) -> NonFiniteBatchError:
    n_nan = int(torch.isnan(sae_in).sum())
    n_inf = int(torch.isinf(sae_in).sum())
    return NonFiniteBatchError(
        f"Training batch of shape {tuple(sae_in.shape)} contains {n_nan} NaN and {n_inf} "
        "inf values; no weights were updated with it. Check the activation source."
    )

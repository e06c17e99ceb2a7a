"""Refuse a training step whose batch, loss or gradients are not finite.

A batch with NaN or inf values, or a finite batch so large that its loss overflows (a
batch x1e30), would write NaN into the weights and the optimizer moments at the next
``optimizer.step()``. The guard checks all three before the step and raises
:class:`NonFiniteBatchError`, so no weight or optimizer state is ever updated with them.
"""

import math
from collections import deque
from collections.abc import Callable, Sequence

import torch


class NonFiniteBatchError(ValueError):
    """A training batch, its loss or its gradients contained NaN or infinite values."""


_STOPPED_STEP = (
    "A training batch or its loss contained NaN or inf values; the optimizer step was "
    "stopped before updating any weights. Check the activation source."
)


class BatchGuard:
    """Checks training batches, losses and gradients before they can reach the weights.

    On the CPU the batch and loss checks are immediate. On CUDA each finiteness flag is
    copied to pinned host memory asynchronously and read just before the optimizer step
    (:meth:`raise_if_bad`), waiting only on an event recorded in the forward pass, which
    the device has passed by the time the backward pass has been queued. The gradient check
    (:meth:`check_gradients`) runs just before the step and reads one flag on the host: on
    CUDA that waits for the backward pass, one synchronization per step.

    Inside ``torch.compile`` no host round trip can be traced, so the flags are kept as
    tensors and read in the optimizer pre-step hook instead.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        self._deferred: list[torch.Tensor] = []

    def check_batch(self, sae_in: torch.Tensor) -> None:
        """Refuse an empty batch now; record (CUDA) or check that ``sae_in`` is finite."""
        if sae_in.numel() == 0:
            raise ValueError(
                f"Empty training batch of shape {tuple(sae_in.shape)}: a training step "
                "needs at least one activation vector."
            )
        self._check(torch.isfinite(sae_in).all(), lambda: _batch_error(sae_in))

    def check_loss(self, loss: torch.Tensor) -> None:
        """Record (CUDA) or check that the step's loss is finite."""
        self._check(torch.isfinite(loss.detach()).all(), lambda: _loss_error(loss))

    def _check(
        self, finite: torch.Tensor, error: Callable[[], NonFiniteBatchError]
    ) -> None:
        if torch.compiler.is_compiling():
            self._deferred.append(finite)
            return
        if finite.device.type != "cuda":
            if not bool(finite):
                raise error()
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((flag, event))

    def raise_if_bad(self) -> None:
        """Raise :class:`NonFiniteBatchError` if a recorded batch or loss was not finite."""
        deferred, self._deferred = self._deferred, []
        if any(not bool(flag) for flag in deferred):
            raise NonFiniteBatchError(_STOPPED_STEP)
        while self._pending:
            flag, event = self._pending.popleft()
            event.synchronize()
            if not bool(flag):
                self._pending.clear()
                raise NonFiniteBatchError(_STOPPED_STEP)

    @torch.no_grad()
    def check_gradients(
        self, named_params: Sequence[tuple[str, torch.nn.Parameter]]
    ) -> None:
        """Raise :class:`NonFiniteBatchError` if any gradient has a NaN or inf value.

        Args:
            named_params: ``(name, parameter)`` pairs; those without a gradient are skipped.
        """
        named_grads = [(n, p.grad) for n, p in named_params if p.grad is not None]
        if not named_grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g) for _, g in named_grads])
        if bool(torch.isfinite(norms).all()):
            return
        bad = [
            n
            for (n, _), norm in zip(named_grads, norms.tolist())
            if not math.isfinite(norm)
        ]
        raise NonFiniteBatchError(
            f"The gradients of {', '.join(bad)} are not finite; the optimizer step was "
            "stopped before updating any weights. Check the scale of the activations "
            "and the learning rate."
        )


def _batch_error(sae_in: torch.Tensor) -> NonFiniteBatchError:
    n_nan = int(torch.isnan(sae_in).sum())
    n_inf = int(torch.isinf(sae_in).sum())
    return NonFiniteBatchError(
        f"Training batch of shape {tuple(sae_in.shape)} contains {n_nan} NaN and {n_inf} "
        "inf values; no weights were updated with it. Check the activation source."
    )


def _loss_error(loss: torch.Tensor) -> NonFiniteBatchError:
    return NonFiniteBatchError(
        f"The loss of this training batch is {float(loss.detach())} although the batch "
        "is finite (its values are too large for the SAE's dtype, or the weights are); "
        "no weights were updated with it. Check the scale of the activations "
        "(normalize_activations) and the learning rate."
    )

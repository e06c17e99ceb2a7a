"""Restore gradients that a training loop clipped, when the recipe says not to clip.

SAELens's ``SAETrainer`` clips the global gradient norm to 1.0 between ``backward()`` and
``optimizer.step()`` with no way to turn it off; the paper does not clip. The global norm of
each backward pass is recorded as gradients are accumulated, and just before the optimizer
step the gradients are rescaled by (recorded norm / current norm), which undoes any uniform
rescaling in between (and is exactly 1 when nothing was clipped).
"""

from collections.abc import Iterable

import torch
from torch.utils.hooks import RemovableHandle


class GradientClipUndo:
    """Records pre-clipping gradient norms and restores them before the optimizer step."""

    def __init__(self) -> None:
        self._norms: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self, params: Iterable[torch.nn.Parameter]) -> None:
        """(Re)attach to ``params``, e.g. after loading replaced the parameter objects."""
        for handle in self._handles:
            handle.remove()
        self._handles = [
            p.register_post_accumulate_grad_hook(self._record)
            for p in params
            if p.requires_grad
        ]
        self._norms.clear()

    def _record(self, param: torch.Tensor) -> None:
        assert param.grad is not None
        self._norms[id(param)] = torch.linalg.vector_norm(param.grad.detach())

    @torch.no_grad()
    def restore(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Undo any uniform rescaling of the gradients since they were recorded."""
        held = [p for p in params if p.grad is not None and id(p) in self._norms]
        grads = [p.grad for p in held if p.grad is not None]
        recorded = [self._norms[id(p)] for p in held]
        self._norms.clear()
        if not grads:
            return
        before = torch.linalg.vector_norm(torch.stack(recorded))
        now = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        )
        ratio = torch.where(now > 0, before / now, torch.ones_like(now))
        torch._foreach_mul_(grads, ratio)

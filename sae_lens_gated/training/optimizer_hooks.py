"""Callbacks around optimizer steps, inside SAELens's unmodified ``SAETrainer``.

SAELens's trainer owns its optimizer and offers no step callbacks, so the plugin installs
PyTorch's global optimizer step hooks once. Before and after any optimizer steps, they call
the plugin SAEs whose parameters that optimizer holds. They find them by parameter identity
at each step, so they keep working after ``load_from_disk`` replaces parameter objects, on
resume (a new optimizer), and with ``MultiSAETrainer`` or hand-written loops.
"""

import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle


class OptimizerStepListener(Protocol):
    """An SAE that wants to run code around the optimizer steps that update it."""

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...


_LISTENERS: "weakref.WeakSet[OptimizerStepListener]" = weakref.WeakSet()
_HANDLES: list[RemovableHandle] = []


def attach_to_optimizer_steps(listener: OptimizerStepListener) -> None:
    """Call ``listener``'s hooks around every optimizer step that updates its parameters."""
    if not _HANDLES:
        _HANDLES.append(register_optimizer_step_pre_hook(_before_step))
        _HANDLES.append(register_optimizer_step_post_hook(_after_step))
    _LISTENERS.add(listener)


def listeners_of(optimizer: torch.optim.Optimizer) -> list[OptimizerStepListener]:
    """The attached listeners that own at least one parameter ``optimizer`` updates."""
    if not _LISTENERS:
        return []
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [
        listener
        for listener in list(_LISTENERS)
        if any(id(p) in held for p in listener.parameters())
    ]


def _before_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for listener in listeners_of(optimizer):
        listener.before_optimizer_step(optimizer)


def _after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for listener in listeners_of(optimizer):
        listener.after_optimizer_step(optimizer)

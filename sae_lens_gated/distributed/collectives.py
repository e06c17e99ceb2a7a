"""The processes of a distributed run, the collectives training uses, and their failures.

Everything goes through PyTorch's ``torch.distributed`` (gloo on CPUs, NCCL on GPUs), in a
process group that ``torchrun`` sets up. :class:`Ranks` wraps the few collectives training
needs so that each names what it was doing when it fails: if another process crashes or
stops answering, a collective raises within the process group's timeout and becomes one
:class:`DistributedTrainingError`.

Every collective must be issued in the same order on every process. The training code
issues them only at points every process reaches: in the forward and backward passes, in
the optimizer step hooks, at resampling events and when saving, never in code that only
logging or evaluation on the first process runs.
"""

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective waits for the other processes before the run stops (seconds)."""

T = TypeVar("T")

ReduceOp = Literal["sum", "max", "min"]
_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class DistributedTrainingError(RuntimeError):
    """A process of a distributed run failed, or stopped answering within the timeout."""


def world_size() -> int:
    """The number of processes ``torchrun`` (or another launcher) started (1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_with_several_processes() -> bool:
    """Whether ``torchrun`` (or another launcher) started this process as one of several."""
    return world_size() > 1


def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None
) -> "Ranks":
    """Join the process group that ``torchrun`` describes in the environment.

    Uses NCCL with one GPU per process (``LOCAL_RANK``) when CUDA is available, else gloo.
    Already initialized: returns the default group as it is.

    Args:
        timeout_s: How long a collective waits for the others before failing.
        backend: ``"gloo"`` or ``"nccl"`` (default: by device).
    """
    if not dist.is_available():
        raise DistributedTrainingError(
            "This PyTorch build has no torch.distributed support."
        )
    if not dist.is_initialized():
        missing = [
            v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if v not in os.environ
        ]
        if missing:
            raise DistributedTrainingError(
                f"{', '.join(missing)} not set: launch with torchrun, e.g. `torchrun "
                "--standalone --nproc-per-node 2 ...`."
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Ranks(timeout_s=timeout_s)


class Ranks:
    """The processes of one training run, and this process's place among them.

    Args:
        group: The process group (None: the default one).
        timeout_s: The group's collective timeout, for error messages.
    """

    def __init__(self, group: Any = None, timeout_s: float | None = None) -> None:
        if not dist.is_initialized():
            raise DistributedTrainingError(
                "torch.distributed is not initialized: call init_distributed() (under "
                "torchrun) first."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout_s = timeout_s
        # NCCL moves GPU tensors only; gloo moves CPU tensors.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )

    @property
    def is_first(self) -> bool:
        """Whether this is the process that writes files and logs (rank 0)."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    def _run(self, what: str, collective: Callable[[], T]) -> T:
        try:
            return collective()
        except RuntimeError as error:
            within = (
                f"within {self.timeout_s:g} s"
                if self.timeout_s is not None
                else "within the process group's timeout"
            )
            raise DistributedTrainingError(
                f"{what} failed on rank {self.rank} of {self.world_size}: another "
                f"process crashed or did not answer {within}. Stopping this process "
                f"too. ({type(error).__name__}: {error})"
            ) from error

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def all_reduce(
        self, tensor: torch.Tensor, what: str, op: ReduceOp = "sum"
    ) -> torch.Tensor:
        """Reduce ``tensor`` over all processes, in place; returns it."""
        work = self._on_device(tensor)
        self._run(what, lambda: dist.all_reduce(work, op=_OPS[op], group=self.group))
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Every process's ``tensor`` (same shape everywhere), concatenated along dim 0."""
        work = self._on_device(tensor.contiguous())
        parts = [torch.empty_like(work) for _ in range(self.world_size)]
        self._run(what, lambda: dist.all_gather(parts, work, group=self.group))
        return torch.cat(parts).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, what: str, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` with process ``src``'s, in place; returns it."""
        work = self._on_device(tensor)
        self._run(
            what, lambda: dist.broadcast(work, src=self._global(src), group=self.group)
        )
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast_object(self, value: T, what: str) -> T:
        """The first process's ``value`` (anything picklable), on every process."""
        box: list[Any] = [value]
        self._run(
            what,
            lambda: dist.broadcast_object_list(
                box, src=self._global(0), group=self.group
            ),
        )
        return box[0]

    def gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor] | None:
        """Every process's ``tensor`` (same shape), on the CPU of the first process (None
        elsewhere), in rank order; the first process receives one at a time."""
        work = self._on_device(tensor.contiguous())
        if not self.is_first:
            self._run(
                what, lambda: dist.send(work, dst=self._global(0), group=self.group)
            )
            return None
        parts = [work.cpu().clone()]
        buffer = torch.empty_like(work)
        for rank in range(1, self.world_size):
            self._run(
                what,
                lambda: dist.recv(buffer, src=self._global(rank), group=self.group),
            )
            parts.append(buffer.cpu().clone())
        return parts

    def scatter(
        self, chunks: list[torch.Tensor] | None, out: torch.Tensor, what: str
    ) -> torch.Tensor:
        """Fill ``out`` with the first process's ``chunks[rank]``, one chunk at a time (no
        process holds more than one chunk on the collective device)."""
        if self.is_first:
            if chunks is None or len(chunks) != self.world_size:
                raise ValueError("The first process must pass one chunk per process.")
            out.copy_(chunks[0])
            for rank in range(1, self.world_size):
                chunk = self._on_device(chunks[rank].contiguous())
                self._run(
                    what,
                    lambda: dist.send(chunk, dst=self._global(rank), group=self.group),
                )
            return out
        work = self._on_device(out)
        self._run(what, lambda: dist.recv(work, src=self._global(0), group=self.group))
        if work is not out:
            out.copy_(work)
        return out

    def barrier(self, what: str) -> None:
        """Wait for every process."""
        # A barrier as a one-element all-reduce: it honours the timeout on every backend.
        self.all_reduce(torch.zeros(1, device=self.device), what)

    def _global(self, rank: int) -> int:
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)


def sum_across_ranks(tensor: torch.Tensor, ranks: Ranks, what: str) -> torch.Tensor:
    """The sum of every process's ``tensor``; its gradient passes through unchanged.

    Each process computes the same loss of the sum and back-propagates it; the gradient
    with respect to this process's part is that of the sum.
    """
    return _SumAcrossRanks.apply(tensor, ranks, what)


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged, with its gradient multiplied by ``factor``."""
    return _ScaleGradient.apply(tensor, factor)


class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, tensor: torch.Tensor, ranks: Ranks, what: str
    ) -> torch.Tensor:  # type: ignore[override]
        del ctx
        return ranks.all_reduce(tensor.clone(), what)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        del ctx
        return grad, None, None


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None

"""Run a function on several local processes joined by a gloo process group (tests only).

The processes are forked from the test process (no re-import: each starts in well under a
second) with one CPU thread each, and join the group through the same environment
variables torchrun sets, so the code under test calls ``init_distributed()`` itself (which
joins through gloo in these processes, also where CUDA is available).
Processes that use CUDA are spawned instead: a forked child cannot use CUDA once its
parent has, and the parent of a CUDA test has.
"""

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from sae_lens_gated.distributed import collectives


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    torch.set_num_threads(1)
    # The processes join through gloo on every machine: init_distributed() would choose NCCL
    # where CUDA is available, which wants a GPU per process (and the CPU variants' forked
    # processes must not touch CUDA).
    collectives.init_distributed.__defaults__ = (collectives.DEFAULT_TIMEOUT_S, "gloo")
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        # Pickled here, by value: the process may exit before the test reads the result.
        results.put((rank, "ok", pickle.dumps(fn(rank, *args))))
    except BaseException as error:  # reported to the test, which fails with it
        results.put(
            (rank, "error", (type(error).__name__, str(error), traceback.format_exc()))
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout_s: float = 120.0,
    expect_errors: bool = False,
    device: str = "cpu",
) -> dict[int, Any]:
    """``fn(rank, *args)`` on ``world_size`` local processes; their return values by rank.

    Args:
        fn: Runs in each process; its return value must be picklable.
        args: More arguments of ``fn``.
        world_size: Number of processes.
        timeout_s: The test fails if the processes take longer.
        expect_errors: Return ``("error", type name, message)`` for processes that raised
            (and None for processes that died without reporting) instead of failing.
        device: Where ``fn`` computes: ``"cuda"`` spawns the processes (every one on the
            current GPU, their collectives through gloo on the CPU), and ``fn`` must then
            be importable from its module.
    """
    context = (
        multiprocessing.get_context("spawn")
        if device == "cuda"
        else multiprocessing.get_context("fork")
    )
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_child, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                if all(not p.is_alive() for p in processes) and results.empty():
                    if expect_errors:
                        break
                    raise AssertionError(
                        f"Ranks {sorted(set(range(world_size)) - set(outcomes))} died "
                        "without a result."
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"Processes did not finish within {timeout_s} s; results so "
                        f"far: {sorted(outcomes)}"
                    ) from None
                continue
            if status == "error" and not expect_errors:
                name, message, trace = value
                raise AssertionError(f"Rank {rank} raised {name}: {message}\n{trace}")
            outcomes[rank] = (
                ("error", value[0], value[1])
                if status == "error"
                else pickle.loads(value)
            )
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    for rank in range(world_size):
        outcomes.setdefault(rank, None)
    return outcomes

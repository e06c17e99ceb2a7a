"""Train one paper-recipe gated SAE on several processes, on the embedded synthetic data.

Launch with torchrun (gloo on CPUs, NCCL with one GPU per process):

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py \\
        --mode data --steps 300 --out gated-distributed

- ``--mode data``: every process holds the whole SAE and trains on its slice of each
  global batch; gradients are averaged during the backward pass.
- ``--mode latent``: each process holds ``d_sae / N`` of the features and sees the whole
  global batch; partial reconstructions are summed every step.

Each step's global batch is the same whatever the number of processes (every process
draws it from the same seeded stream), so ``--nproc-per-node 1`` and ``2`` train the same
SAE up to float rounding. Every process runs SAELens's own ``SAETrainer``. The first
process writes the final SAE to ``--out`` as an ordinary SAELens folder and prints a JSON
line with the throughput. Run without torchrun, it trains in one process.
"""

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.synthetic import SyntheticModel
from sae_lens.synthetic.training import SyntheticActivationIterator
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_gated import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.distributed import (
    Ranks,
    enable_data_parallel,
    init_distributed,
    shard_latents,
)
from sae_lens_gated.repro.experiments import DEFAULT_SYNTHETIC_MODEL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("data", "latent"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="A new folder.")
    parser.add_argument("--batch-size", type=int, default=1024, help="Global batch.")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--l1", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resample-every", type=int, default=None, help="Default: steps // 2."
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per process."
    )
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.steps < 1:
        parser.error("--steps must be at least 1.")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty; choose a new folder.")
    if args.mode == "data" and args.batch_size % world:
        parser.error(
            f"--batch-size {args.batch_size} is not divisible by {world} processes."
        )
    if args.mode == "latent" and args.d_sae % world:
        parser.error(f"--d-sae {args.d_sae} is not divisible by {world} processes.")
    return args


def join_processes() -> Ranks:
    """The torchrun process group, or a group of one when started without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
    return init_distributed()


class Rows(Iterator[torch.Tensor]):
    """This process's rows of every batch of ``source``."""

    def __init__(self, source: Iterator[torch.Tensor], rows: slice) -> None:
        self.source, self.rows = source, rows

    def __next__(self) -> torch.Tensor:
        return next(self.source)[self.rows]


def build_sae(args: argparse.Namespace, ranks: Ranks, device: str) -> GatedTrainingSAE:
    resample_every = args.resample_every or max(1, args.steps // 2)
    cfg = GatedTrainingSAEConfig(
        d_in=DEFAULT_SYNTHETIC_MODEL.hidden_dim,
        d_sae=args.d_sae,
        l1_coefficient=args.l1,
        resample_every=resample_every,
        resample_window=max(1, resample_every // 2),
        resample_pool_size=4 * args.batch_size,
        resample_lr_warmup_steps=max(1, args.steps // 20),
        device=device,
        dtype=args.dtype,
    )
    torch.manual_seed(args.seed)
    if args.mode == "data":
        # Every process builds a replica; the first process's weights are copied to all.
        sae = GatedTrainingSAE(cfg)
        enable_data_parallel(sae, ranks)
        return sae
    # The first process builds the whole SAE on the CPU and sends each its features.
    whole = (
        GatedTrainingSAE(dataclasses.replace(cfg, device="cpu"))
        if ranks.is_first
        else None
    )
    return shard_latents(whole, cfg, ranks)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = join_processes()
    device = str(ranks.device)
    sae = build_sae(args, ranks, device)

    # The same global batches on every process, whatever their number.
    source = SyntheticModel(DEFAULT_SYNTHETIC_MODEL, device=device)
    torch.manual_seed(args.seed + 1)
    batches = SyntheticActivationIterator(
        source.feature_dict, source.activation_generator, args.batch_size
    )
    if args.mode == "data":
        width = args.batch_size // ranks.world_size
        data: Iterator[torch.Tensor] = Rows(
            batches, slice(ranks.rank * width, (ranks.rank + 1) * width)
        )
    else:
        width, data = args.batch_size, batches

    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * width,
        train_batch_size_samples=width,
        lr=args.lr,
        lr_end=args.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=0,
        n_restart_cycles=1,
        adam_beta1=0.0,  # paper App. D.1
        adam_beta2=0.999,
        device=device,
        autocast=False,
        dead_feature_window=max(1, args.steps // 10),
        feature_sampling_window=max(1, args.steps // 10),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
    ranks.barrier("starting the clock")
    start = time.perf_counter()
    trainer.fit()
    ranks.barrier("stopping the clock")
    seconds = time.perf_counter() - start

    if args.mode == "latent" or ranks.is_first:
        # Collective in latent mode (the first process gathers the features and writes).
        sae.save_inference_model(args.out)
    resampler = sae.conventions.resampler
    summary = {
        "mode": args.mode,
        "processes": ranks.world_size,
        "threads_per_process": args.threads,
        "d_in": DEFAULT_SYNTHETIC_MODEL.hidden_dim,
        "d_sae": args.d_sae,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(args.steps * args.batch_size / seconds, 1),
        "resampled": 0 if resampler is None else resampler.n_resampled,
    }
    if ranks.is_first:
        print(json.dumps(summary))
        return summary
    return None


if __name__ == "__main__":
    import torch.distributed as dist

    try:
        main(sys.argv[1:])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""What dead-feature resampling does to a training run: paired runs with and without it.

Each seed trains the paper-recipe gated SAE twice from the same initialisation on the same
synthetic stream (SAELens's synthetic model: many ground-truth directions crowded into few
dimensions, trained at a high lambda, so features keep dying while directions are left to
learn): once with resampling events, once without. Until the first event the two runs are
the same run. For each run it prints the features dead over the last window, L0, explained
variance, dead fraction and ground-truth MCC on held-out data, and how many of the last
event's features fire in the last window; it writes ``dead_features.png`` (dead features
over a trailing window against the step, the first seed's pair) and ``results.json`` into
OUT_DIR, and prints that JSON as its last line.

    python scripts/resampling_effect.py OUT_DIR [--seeds 0 1 2] [--steps 3000] [--l1 2.0]
        [--events 1000 2000] [--window 500] [--rewarm 1000]
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from sae_lens.synthetic import SyntheticModelConfig, ZipfianFiringProbabilityConfig
from tqdm.auto import tqdm

from sae_lens_gated import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens_gated.repro.experiments import (
    SyntheticSource,
    TrainingSettings,
    Variant,
    evaluate,
    prepare_output_folder,
)
from sae_lens_gated.training.resampling import fired_features

# 256 directions in 32 dimensions, each firing on 1-10% of inputs.
CROWDED = SyntheticModelConfig(
    num_features=256,
    hidden_dim=32,
    bias=False,
    seed=0,
    mean_firing_magnitudes=1.0,
    std_firing_magnitudes=0.1,
    firing_probability=ZipfianFiringProbabilityConfig(
        exponent=0.5, max_prob=0.1, min_prob=0.01
    ),
)
D_SAE = 512
BATCH = 256
EVAL_SAMPLES = 20_000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--l1", type=float, default=2.0, help="lambda")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--events", type=int, nargs="+", help="event steps (default: thirds)"
    )
    parser.add_argument(
        "--window", type=int, help="dead-feature window (default: steps / 6)"
    )
    parser.add_argument(
        "--rewarm", type=int, default=1000, help="resample_lr_warmup_steps"
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    args.events = args.events or [args.steps // 3, 2 * args.steps // 3]
    args.window = args.window or args.steps // 6
    if args.steps < 1 or args.lr <= 0 or args.l1 < 0 or args.rewarm < 0:
        parser.error("--steps and --lr must be positive, --l1 and --rewarm >= 0")
    if args.window < 1 or args.events != sorted(set(args.events)):
        parser.error("--window must be positive and --events strictly increasing")
    if args.events[0] < args.window or args.events[-1] >= args.steps:
        parser.error(
            f"--events must lie in [window, steps) = [{args.window}, {args.steps})"
        )
    try:
        prepare_output_folder(args.out, args.overwrite)
    except OSError as error:
        parser.error(str(error))
    return args


def train_pair_member(
    args: argparse.Namespace, source: SyntheticSource, seed: int, resample: bool
) -> dict[str, Any]:
    """Train one SAE of a pair and measure it."""
    torch.manual_seed(seed)
    sae = GatedTrainingSAE(
        GatedTrainingSAEConfig(
            d_in=CROWDED.hidden_dim,
            d_sae=D_SAE,
            l1_coefficient=args.l1,
            l1_warm_up_steps=args.steps // 10,
            resample_dead=resample,
            resample_steps=args.events if resample else None,
            resample_window=args.window,
            resample_pool_size=50 * BATCH,
            resample_lr_warmup_steps=args.rewarm,
            # Dense steps only: `auto` picks modes by timing, and their rounding differences
            # alone would make the two runs of a pair drift apart.
            sparse_step="never",
        )
    )
    fired: list[torch.Tensor] = []

    def record(acts: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
        if torch.is_grad_enabled():  # training passes, not the resampler's scoring
            fired.append(fired_features(acts))

    sae.hook_sae_acts_post.add_hook(record)  # type: ignore[arg-type]
    settings = TrainingSettings(
        steps=args.steps, batch_size=BATCH, lr=args.lr, l1_warm_up_fraction=0.1
    )
    source.train(sae, settings)
    fired_by_step = torch.stack(fired)
    window = args.window
    ends = sorted({*range(window, args.steps, max(1, window // 4)), args.steps})
    dead_curve = [
        [t, int((~fired_by_step[t - window : t].any(dim=0)).sum())] for t in ends
    ]
    resampler = sae.conventions.resampler
    last_event = None if resampler is None else resampler.last_event
    last_idx = None if last_event is None else last_event.resampled.cpu()
    result = evaluate(
        sae, Variant("gated (paper)", "gated"), args.l1, seed, source, 0.0
    )
    last_window = fired_by_step[-window:].any(dim=0)
    return {
        "seed": seed,
        "resampling": resample,
        "n_resampled": 0 if resampler is None else resampler.n_resampled,
        "last_event_resampled": 0 if last_idx is None else int(last_idx.numel()),
        "last_event_firing_at_end": (
            None if last_idx is None else int(last_window[last_idx].sum())
        ),
        "dead_last_window": int((~last_window).sum()),
        "l0": result.l0,
        "explained_variance": result.explained_variance,
        "dead_fraction_held_out": result.dead_fraction,
        "ground_truth_mcc": result.ground_truth_mcc,
        "dead_curve": dead_curve,
    }


def plot(runs: list[dict[str, Any]], events: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        steps, dead = zip(*run["dead_curve"], strict=True)
        label = "with resampling" if run["resampling"] else "without"
        ax.plot(steps, dead, label=f"{label} (seed {run['seed']})")
    for event in events:
        ax.axvline(event, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"features dead over the trailing window (of {D_SAE})")
    ax.set_title("Gated SAE (paper recipe): resampling events (dotted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| seed | resampling | dead (last window) | L0 | EV | dead (held out) | GT MCC "
        "| last event: resampled / firing at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        last = (
            f"{run['last_event_resampled']} / {run['last_event_firing_at_end']}"
            if run["resampling"]
            else "-"
        )
        lines.append(
            f"| {run['seed']} | {'on' if run['resampling'] else 'off'} "
            f"| {run['dead_last_window']} | {run['l0']:.2f} "
            f"| {run['explained_variance']:.3f} | {run['dead_fraction_held_out']:.0%} "
            f"| {run['ground_truth_mcc']:.3f} | {last} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_args(argv)
    source = SyntheticSource(CROWDED, EVAL_SAMPLES)
    runs: list[dict[str, Any]] = []
    with tqdm(total=2 * len(args.seeds), desc="paired runs") as bar:
        for seed in args.seeds:
            for resample in (False, True):
                runs.append(train_pair_member(args, source, seed, resample))
                bar.update()
    plot(
        [r for r in runs if r["seed"] == args.seeds[0]],
        args.events,
        args.out / "dead_features.png",
    )
    summary = {
        "settings": {
            "steps": args.steps,
            "l1": args.l1,
            "lr": args.lr,
            "events": args.events,
            "window": args.window,
            "rewarm": args.rewarm,
            "d_sae": D_SAE,
            "batch": BATCH,
            "synthetic_model": CROWDED.to_dict(),
        },
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    sys.stdout.write(table(runs) + "\n")
    sys.stdout.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

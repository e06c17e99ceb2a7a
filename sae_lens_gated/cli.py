"""Command line interface: ``sae-lens-gated`` or ``python -m sae_lens_gated``."""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sae_lens_gated import __version__
from sae_lens_gated.conversion import (
    EXPORT_FORMATS,
    GatedSAEExportError,
    check_new_folder,
    export_sae,
)
from sae_lens_gated.loading import GatedSAELoadError, load_gated_sae
from sae_lens_gated.registration import register

T = TypeVar("T")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-gated",
        description="Gated SAEs (Rajamanoharan et al. 2024) for SAELens.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="Gated SAE vs a 1.5x wider baseline on synthetic data (offline).",
        description="Train the paper-recipe gated SAE and SAELens's standard SAE at 1.5x "
        "the width on the embedded synthetic default (or a model's activations with "
        "--model/--hook), print a side-by-side table, write demo.png and save the gated SAE.",
    )
    demo.add_argument("--out", type=Path, default=Path("gated-demo"))
    demo.add_argument("--steps", type=int, default=3000)
    demo.add_argument("--batch-size", type=int, default=1024)
    demo.add_argument("--gated-l1", type=float, nargs="+", default=[0.5, 1.0])
    demo.add_argument("--baseline-l1", type=float, nargs="+", default=[0.35, 1.0])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    _add_model_arguments(demo)

    sweep = commands.add_parser(
        "sweep",
        help="Lambda sweeps of gated SAEs, their ablations and a baseline; claims, plots.",
        description="Train every variant over a lambda grid on synthetic activations with "
        "known features (or a model's with --model/--hook), check the paper's claims, and "
        "write results.json and PNG plots to --out.",
    )
    sweep.add_argument("--out", type=Path, default=Path("gated-sweep"))
    sweep.add_argument(
        "--quick", action="store_true", help="The small grid (<10 min on CPU)."
    )
    sweep.add_argument("--steps", type=int, default=None)
    sweep.add_argument("--seeds", type=int, nargs="+", default=None)
    sweep.add_argument("--variants", nargs="+", default=None)
    sweep.add_argument(
        "--l1",
        type=float,
        nargs="+",
        default=None,
        help="Lambdas for every selected variant.",
    )
    sweep.add_argument("--device", default="cpu")
    _add_model_arguments(sweep)

    bench = commands.add_parser(
        "bench",
        help="Time training steps and encoding against SAELens's gated and standard SAEs.",
        description="Interleaved, median-of-repeats timings of a full SAETrainer step for "
        "the plugin (paper and april_update recipes), SAELens's built-in gated SAE and "
        "SAELens's standard SAE; inference encode; peak memory; fraction of the dense "
        "matmul roofline. The last line is a JSON summary.",
    )
    bench.add_argument("--d-in", type=int, default=512)
    bench.add_argument("--d-sae", type=int, default=8192)
    bench.add_argument("--batch", type=int, default=4096)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--seed", type=int, default=0)

    commands.add_parser(
        "train",
        help="Run SAELens's training runner CLI with the plugin registered.",
        description="All arguments go to SAELens's LanguageModelSAETrainingRunner CLI, "
        "e.g. `sae-lens-gated train --architecture gated --model_name gpt2 ...`.",
        add_help=False,
    )
    _add_convert_parser(commands)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("language-model activations (needs the network)")
    group.add_argument("--model", default=None, help="TransformerLens model name.")
    group.add_argument(
        "--hook", default=None, help="Hook name, e.g. blocks.6.hook_resid_post."
    )
    group.add_argument(
        "--dataset",
        default="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
        help="Tokenized Hugging Face dataset.",
    )
    group.add_argument("--context-size", type=int, default=128)
    group.add_argument("--expansion", type=float, default=8.0)


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for name in ("model", "hook", "dataset", "context_size", "expansion")
    }


def _add_convert_parser(commands: "argparse._SubParsersAction[Any]") -> None:
    convert = commands.add_parser(
        "convert",
        help="Convert a gated SAE to SAELens gated, SAELens JumpReLU or dictionary_learning.",
        description="Load SRC (a local SAELens or dictionary_learning folder, a SAELens "
        "release, or a Hugging Face repo id) and write it to the new folder DST.",
    )
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST", type=Path)
    convert.add_argument("--to", required=True, choices=EXPORT_FORMATS)
    convert.add_argument(
        "--folder", default=None, help="Subfolder of SRC, or the SAE id in a release."
    )
    convert.add_argument("--device", default="cpu")
    convert.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float64", "float16", "bfloat16"),
        help="Default: as SRC records it.",
    )


def _convert(args: argparse.Namespace) -> int:
    try:
        check_new_folder(args.dst)  # fail before a possibly long download
        sae = load_gated_sae(
            args.src, args.folder, device=args.device, dtype=args.dtype
        )
        written = export_sae(sae, args.dst, args.to)
    except (GatedSAELoadError, GatedSAEExportError, FileExistsError) as error:
        sys.stderr.write(f"sae-lens-gated convert: error: {error}\n")
        return 1
    sys.stdout.write(
        f"Wrote {args.to} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) to "
        f"{args.dst}: {', '.join(p.name for p in written)}\n"
    )
    return 0


def _settings(parser: argparse.ArgumentParser, build: Callable[[], T]) -> T:
    # Invalid combinations of options exit like an argparse error, with usage, not a trace.
    try:
        return build()
    except ValueError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-gated`` command."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    register()
    if args_list[:1] == ["train"]:
        from sae_lens.llm_sae_training_runner import _run_cli

        _run_cli(args_list[1:])
        return 0

    parser = _build_parser()
    args = parser.parse_args(args_list)
    if args.command == "demo":
        from sae_lens_gated.repro.demo import DemoConfig, format_table, run_demo

        runs = run_demo(
            _settings(
                parser,
                lambda: DemoConfig(
                    out=args.out,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    gated_l1=tuple(args.gated_l1),
                    baseline_l1=tuple(args.baseline_l1),
                    seed=args.seed,
                    device=args.device,
                    **_model_options(args),
                ),
            ),
        )
        sys.stdout.write(format_table(runs) + "\n")
        sys.stdout.write(
            f"Saved the gated SAE, demo.png and demo_results.json to {args.out}\n"
        )
    elif args.command == "sweep":
        from sae_lens_gated.repro.sweep import SweepConfig, format_claims, run_sweep

        results = run_sweep(
            _settings(
                parser,
                lambda: SweepConfig(
                    out=args.out,
                    quick=args.quick,
                    steps=args.steps,
                    seeds=args.seeds,
                    variants=args.variants,
                    l1=args.l1,
                    device=args.device,
                    **_model_options(args),
                ),
            ),
        )
        sys.stdout.write(format_claims(results) + "\n")
    elif args.command == "bench":
        from sae_lens_gated.repro.bench import BenchConfig, format_report, run_benchmark

        result = run_benchmark(
            _settings(
                parser,
                lambda: BenchConfig(
                    d_in=args.d_in,
                    d_sae=args.d_sae,
                    batch=args.batch,
                    device=args.device,
                    dtype=args.dtype,
                    repeats=args.repeats,
                    seed=args.seed,
                ),
            ),
        )
        sys.stdout.write(format_report(result) + "\n")
    elif args.command == "convert":
        return _convert(args)
    return 0

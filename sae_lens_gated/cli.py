"""Command line interface: ``sae-lens-gated`` or ``python -m sae_lens_gated``.

The options of ``demo``, ``sweep`` and ``bench`` are the fields of their settings dataclasses
(:class:`DemoConfig`, :class:`SweepConfig`, :class:`BenchConfig`), turned into options by
simple_parsing as SAELens's runner CLI does: ``batch_size`` is ``--batch-size``, and the help
and defaults come from the dataclasses, so they are written down once. ``convert`` has its
own options; ``train`` hands its arguments to SAELens's runner CLI.
"""

import argparse
import contextlib
import io
import logging
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner
from simple_parsing import ArgumentParser, DashVariant, SimpleHelpFormatter
from simple_parsing.wrappers import DataclassWrapper
from typing_extensions import override

from sae_lens_gated import __version__
from sae_lens_gated.conversion import (
    EXPORT_FORMATS,
    GatedSAEExportError,
    check_new_folder,
    export_sae,
)
from sae_lens_gated.distributed.collectives import (
    launched_with_several_processes,
    world_size,
)
from sae_lens_gated.distributed.runner import distributed_arguments, run_training
from sae_lens_gated.loading import GatedSAELoadError, load_gated_sae
from sae_lens_gated.registration import register
from sae_lens_gated.repro.bench import BenchConfig, format_report, run_benchmark
from sae_lens_gated.repro.demo import DemoConfig, format_table, run_demo
from sae_lens_gated.repro.experiments import check_device, prepare_output_folder
from sae_lens_gated.repro.sweep import SweepConfig, format_claims, run_sweep
from sae_lens_gated.training.cached_activations import check_cached_activations
from sae_lens_gated.training.multi_runner import (
    SWEEP_HELP,
    SWEEP_OPTIONS,
    CachedMultiSAETrainingRunner,
    is_sweep,
    multi_runner_config,
    split_sweep_arguments,
)

# Sphinx roles and literals of the docstrings, shown as plain text in --help.
_DOCSTRING_MARKUP = re.compile(r":\w+:`~?([^`]+)`|``([^`]+)``")


def _plain(text: str) -> str:
    return _DOCSTRING_MARKUP.sub(lambda m: m.group(1) or m.group(2), text)


class _HelpFormatter(SimpleHelpFormatter):
    """simple_parsing's help (types and defaults) without the docstrings' markup."""

    @override
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        return None if text is None else _plain(text)

    @override
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # Wrap command descriptions to the terminal (simple_parsing keeps line breaks).
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


class _SettingsWrapper(DataclassWrapper[Any]):
    """The options of a settings dataclass, listed under "settings"."""

    @property
    @override
    def title(self) -> str:
        return "settings"

    @property
    @override
    def description(self) -> str:
        return argparse.SUPPRESS  # the command's description says it


class _Parser(ArgumentParser):
    """simple_parsing's parser with ``--dashed-names`` and one-line usage errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("add_option_string_dash_variants", DashVariant.DASH)
        kwargs.setdefault("add_config_path_arg", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    @override
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")

    @override
    def parse_known_args(
        self,
        args: Sequence[str] | None = None,
        namespace: argparse.Namespace | None = None,
        attempt_to_reorder: bool = False,
    ) -> tuple[argparse.Namespace, list[str]]:
        try:
            return super().parse_known_args(args, namespace, attempt_to_reorder)
        except ValueError as error:  # a settings dataclass refused a value
            self.error(str(error))


# The commands whose options are the fields of a settings dataclass.
_SETTINGS_COMMANDS: dict[str, tuple[type[Any], str, str]] = {
    "demo": (
        DemoConfig,
        "Gated SAE vs a 1.5x wider baseline on synthetic data (offline).",
        "Train the paper-recipe gated SAE and SAELens's standard SAE at 1.5x the width on "
        "the embedded synthetic default (or a model's activations with --model/--hook), "
        "print a side-by-side table, write demo.png and save the gated SAE.",
    ),
    "sweep": (
        SweepConfig,
        "Lambda sweeps of gated SAEs, their ablations and a baseline; claims, plots.",
        "Train every variant over a lambda grid on synthetic activations with known "
        "features (or a model's with --model/--hook), check the paper's claims, and write "
        "results.json and PNG plots to --out.",
    ),
    "bench": (
        BenchConfig,
        "Time training steps and encoding against SAELens's gated and standard SAEs.",
        "Interleaved, median-of-repeats timings of a full SAETrainer step for the plugin "
        "(paper and april_update recipes), SAELens's built-in gated SAE and SAELens's "
        "standard SAE; inference encode; peak memory; fraction of the dense matmul "
        "roofline. The last line is a JSON summary.",
    ),
}


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="sae-lens-gated",
        description="Gated SAEs (Rajamanoharan et al. 2024) for SAELens.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (settings, summary, description) in _SETTINGS_COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description)
        command.add_arguments(
            settings, dest="settings", dataclass_wrapper_class=_SettingsWrapper
        )
    commands.add_parser(
        "train",
        help="Run SAELens's training runner CLI with the plugin registered.",
        description="All arguments go to SAELens's LanguageModelSAETrainingRunner CLI, "
        "e.g. `sae-lens-gated train --architecture gated --model_name gpt2 ...`. Several "
        "values for --l1_coefficient and/or --d_sae train one SAE per combination from one "
        "activation stream, with SAELens's MultiSAETrainingRunner, each saved to "
        "OUTPUT_PATH/d_sae-D_l1-L (the output folder must be new or empty). Under "
        "torchrun with several processes, one SAE trains on all of them: "
        "--distributed {data,latent} (default data), --distributed-timeout SECONDS.",
        add_help=False,
    )
    _add_convert_parser(commands)
    return parser


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
        "--folder",
        default=None,
        metavar="FOLDER",
        help="Subfolder of SRC, or the SAE id in a release.",
    )
    convert.add_argument(
        "--device", default="cpu", metavar="DEVICE", help="Torch device to load on."
    )
    convert.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float64", "float16", "bfloat16"),
        help="Default: as SRC records it.",
    )


def _convert(args: argparse.Namespace) -> int:
    # Everything about the command line, the destination included, before a possibly
    # long download.
    try:
        check_device(args.device)
        check_new_folder(args.dst)
    except (ValueError, OSError) as error:
        return _fail("convert", error, 2)
    try:
        sae = load_gated_sae(
            args.src, args.folder, device=args.device, dtype=args.dtype
        )
        written = export_sae(sae, args.dst, args.to)
    except Exception as error:
        return _fail("convert", error, 1)
    sys.stdout.write(
        f"Wrote {args.to} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) to "
        f"{args.dst}: {', '.join(p.name for p in written)}\n"
    )
    return 0


def _train(args: list[str]) -> int:
    """SAELens's runner CLI with the config built first: a bad field is a usage error
    before any model or dataset is loaded. Several values of a sweep option make it a
    sweep, trained by SAELens's MultiSAETrainingRunner."""
    try:
        options, runner_args = distributed_arguments().parse_known_args(args)
        if not options.distributed_timeout > 0:
            raise ValueError("--distributed-timeout must be positive.")
        if {"-h", "--help"} & set(runner_args):
            _parse_runner_args(runner_args)  # prints the help and exits
        runner_args, sweep_values = split_sweep_arguments(runner_args)
        cfg = _parse_runner_args(runner_args)
        multi_cfg = None
        if is_sweep(sweep_values):
            if launched_with_several_processes():
                raise ValueError(
                    "A sweep (several --l1_coefficient or --d_sae values) trains in one "
                    "process: launch it without torchrun."
                )
            run_name_given = any(a.partition("=")[0] == "--run_name" for a in args)
            multi_cfg = multi_runner_config(cfg, sweep_values, run_name_given)
        check_cached_activations(cfg, world_size())
    except (argparse.ArgumentError, ValueError, TypeError, OSError) as error:
        return _fail("train", error, 2)
    try:
        if multi_cfg is None:
            run_training(cfg, options.distributed, options.distributed_timeout)
        else:
            if cfg.use_cached_activations:
                CachedMultiSAETrainingRunner(multi_cfg, cfg).run()
            else:
                MultiSAETrainingRunner(multi_cfg).run()
            path = multi_cfg.output_path
            where = f", saved to {path}" if path else ""
            sys.stdout.write(
                f"Trained {len(multi_cfg.saes)} SAEs from one activation stream{where}: "
                f"{', '.join(multi_cfg.saes)}\n"
            )
    except Exception as error:
        return _fail("train", error, 1)
    return 0


def _parse_runner_args(args: list[str]) -> Any:
    # SAELens's parser prints its whole usage before "unrecognized arguments"; keep only
    # the message. Its --help gets a note on the sweep options.
    captured = io.StringIO()
    help_text = io.StringIO()
    try:
        with (
            contextlib.redirect_stderr(captured),
            contextlib.redirect_stdout(help_text),
            _program_name("sae-lens-gated train"),
        ):
            cfg = _parse_cfg_args(args)
    except SystemExit as exit_info:
        if exit_info.code in (0, None):
            sys.stdout.write(_with_sweep_help(help_text.getvalue()))
            raise
        lines = captured.getvalue().strip().splitlines() or ["invalid arguments"]
        raise ValueError(_explain(lines[-1].split("error: ", 1)[-1], args)) from None
    sys.stdout.write(help_text.getvalue())
    sys.stderr.write(captured.getvalue())
    return cfg


@contextlib.contextmanager
def _program_name(name: str) -> Iterator[None]:
    """Make ``name`` the program SAELens's parser names in its usage line: it reads
    ``sys.argv[0]``, which is ``__main__.py`` under ``python -m sae_lens_gated``."""
    saved = sys.argv[:1]
    sys.argv[:1] = [name]
    try:
        yield
    finally:
        sys.argv[:1] = saved


def _explain(message: str, args: list[str]) -> str:
    """SAELens's "unrecognized arguments: 3e-4" for ``--lr 1e-4 3e-4``, said plainly."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    extra = message.removeprefix(prefix).split()[0]
    for i in range(2, len(args)):
        values = args[i - 1 : i + 1]
        if args[i] == extra and not any(v.startswith("--") for v in values):
            option = next(
                (a for a in reversed(args[: i - 1]) if a.startswith("--")), None
            )
            if option is not None:
                several = " and ".join(SWEEP_OPTIONS)
                return (
                    f"{option.partition('=')[0]} takes one value, got several "
                    f"(...{' '.join(values)}); only {several} accept several values "
                    "(a sweep)."
                )
    return message


def _with_sweep_help(text: str) -> str:
    """SAELens's runner help with the sweep options marked as taking several values."""
    indent = " " * 24  # argparse's column for help text
    note = textwrap.wrap(
        SWEEP_HELP,
        width=79,
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
    )
    option_line = re.compile(rf"  ({'|'.join(SWEEP_OPTIONS)}) ")
    out: list[str] = []
    pending = False  # a sweep option's help lines are being copied
    for line in text.splitlines():
        if pending and not line.startswith(indent):
            out += note
            pending = False
        for option in SWEEP_OPTIONS:
            line = re.sub(rf"\[{option} (\w+)\]", rf"[{option} \1 [\1 ...]]", line)
        out.append(line)
        pending = pending or bool(option_line.match(line))
    return "\n".join(out + (note if pending else [])) + "\n"


def _run_settings_command(command: str, settings: Any) -> int:
    if isinstance(settings, DemoConfig | SweepConfig):
        try:  # a folder that is not free is a command-line problem: refuse it now
            prepare_output_folder(settings.out, settings.overwrite)
        except OSError as error:
            return _fail(command, error, 2)
    try:
        if isinstance(settings, DemoConfig):
            runs = run_demo(settings)
            sys.stdout.write(format_table(runs) + "\n")
            sys.stdout.write(
                f"Saved the gated SAE, demo.png and demo_results.json to {settings.out}\n"
            )
        elif isinstance(settings, SweepConfig):
            sys.stdout.write(format_claims(run_sweep(settings)) + "\n")
        else:
            sys.stdout.write(format_report(run_benchmark(settings)) + "\n")
    except Exception as error:
        return _fail(command, error, 1)
    return 0


def _fail(command: str, error: BaseException, code: int) -> int:
    """Report ``error`` as one line on stderr, return the exit code ``code``."""
    message = str(error)
    if not isinstance(
        error,
        argparse.ArgumentError
        | ValueError
        | OSError
        | GatedSAELoadError
        | GatedSAEExportError,
    ):
        # An unexpected error: its type is the most useful part of a one-line report.
        message = (
            f"{type(error).__name__}: {message}" if message else type(error).__name__
        )
    sys.stderr.write(f"sae-lens-gated {command}: error: {_one_line(message)}\n")
    return code


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-gated`` command.

    Returns:
        0 on success, 2 for a usage error (checked before any work starts), 1 for an error
        during the work; either error is one line on stderr.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    register()
    try:
        if args_list[:1] == ["train"]:
            return _train(args_list[1:])
        args = _build_parser().parse_args(args_list)
        if args.command == "convert":
            return _convert(args)
        return _run_settings_command(args.command, args.settings)
    except KeyboardInterrupt:
        sys.stderr.write("sae-lens-gated: interrupted\n")
        return 130

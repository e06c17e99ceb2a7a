"""The GPU check behind ``scripts/gpu_check.sh``: every step, one JSON summary, one plot.

Steps, each a subprocess with its own time limit, so that one failure or hang leaves the
others' results (each step records ``ok``, its seconds, and its result or error):

- ``cuda_tier``: ``pytest -m cuda`` on the equivalence tests (counts from a JUnit report,
  or from the results printed before a time-out), but for torch.compile's;
- ``cuda_compile``: torch.compile's CUDA tests, slow to compile, under their own limit;
- ``cuda_paths``: ``pytest -m cuda`` on the users' paths beyond the math: two processes on
  the GPU (latent-sharded and data-parallel, through gloo), SAELens's runners, loading and
  exports;
- ``bench_fresh``, ``bench_0.003``, ``bench_0.01``: ``sae-lens-gated bench`` at the fresh
  SAEs' density and at 0.3% and 1% open gates, each with ``--auto-steps``; the last also
  profiles one step of the standard SAE and of each mode (``profile_0.01.txt``);
- ``sparse_ops``: ``scripts/sparse_ops_probe.py`` at 1% open gates: each heavy op of the
  sparse step, and the formulations that could replace it, against one dense matmul;
- ``density_sweep``: step time against gate density, the PNG written into OUT_DIR;
- ``memory_1m``: ``bench --memory-only`` at d_sae 1,048,576;
- ``nccl``: ``examples/train_distributed.py`` under torchrun, one process (NCCL on a GPU),
  in each mode (``data`` and ``latent``).

Then ``targets`` checks issue 21's numbers against the results. ``--dry-run`` runs the same
steps on the CPU at small shapes, with the same JSON keys.

usage: python scripts/gpu_check.py [--dry-run] [--steps STEP,...] OUT_DIR
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from typing_extensions import override

ROOT = Path(__file__).resolve().parents[1]
# bench's names of its memory variants (sae_lens_gated.repro.bench PAPER_DENSE ...), kept
# here so that the summary is written even where the package fails to import.
MEMORY_VARIANTS = {
    "dense": "plugin (paper, dense steps)",
    "sparse": "plugin (paper, sparse steps)",
    "builtin": "SAELens built-in gated",
}
SUMMARY_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"
PLOT_NAME = "step_vs_gate_density.png"
# Where the profiled bench writes every op's time: where a GPU step's time goes. One bench
# only: the profiler's start-up and the profiled steps come out of that bench's limit.
PROFILE_NAME = "profile_0.01.txt"


@dataclass(frozen=True)
class Shape:
    """The settings of every step: the GPU check's, or the dry run's."""

    device: str
    dtype: str
    d_in: int
    d_sae: int
    batch: int
    auto_steps: int
    repeats: int
    sweep: tuple[str, ...]
    memory_d_sae: int
    memory_batch: int
    nccl_steps: int
    # Decoder rows per tile of the probe's tiled decodes.
    probe_tiles: tuple[int, ...]
    # Seconds each step may take (the benches each): within 8 minutes together.
    limits: dict[str, float] = field(default_factory=dict[str, float])


GPU = Shape(
    device="cuda",
    dtype="bfloat16",
    d_in=2304,
    d_sae=65536,
    batch=4096,
    auto_steps=60,
    repeats=5,
    # Trained SAEs at d_sae 65536 open 0.03-1% of their gates (L0 20-650).
    sweep=("0.0003", "0.001", "0.003", "0.01", "0.03"),
    memory_d_sae=1_048_576,
    memory_batch=1024,
    nccl_steps=150,
    # 9, 19, 38 and 75 MB of bf16 rows at d_in 2304: about the L2 of one H100 partition,
    # of both, and more (on the 2-core CPU 38-75 MB tiles were the fastest).
    probe_tiles=(2048, 4096, 8192, 16384),
    limits={
        "cuda_tier": 85,
        "cuda_compile": 55,
        "cuda_paths": 68,
        "bench": 37,
        "sparse_ops": 20,
        "sweep": 60,
        "memory": 40,
        "nccl": 40,
    },
)
DRY_RUN = Shape(
    device="cpu",
    dtype="float32",
    d_in=32,
    d_sae=512,
    batch=256,
    auto_steps=12,
    repeats=2,
    sweep=("0.01", "0.1"),
    memory_d_sae=1024,
    memory_batch=256,
    nccl_steps=150,
    probe_tiles=(64, 256),
    limits={
        "cuda_tier": 120,
        "cuda_compile": 60,
        "cuda_paths": 120,
        "bench": 120,
        "sparse_ops": 60,
        "sweep": 120,
        "memory": 60,
        "nccl": 120,
    },
)


# Where every command's whole output is appended (OUT_DIR/gpu_check.log): the summary keeps
# only the end of a failure's output, and a lent GPU is gone before a second look.
_full_log: Path | None = None
_LOG_BYTES_PER_COMMAND = 2 * 2**20


def _keep(command: list[str], status: str, output: str) -> None:
    if _full_log is None:
        return
    if len(output) > _LOG_BYTES_PER_COMMAND:
        output = "[... start cut ...]\n" + output[-_LOG_BYTES_PER_COMMAND:]
    with open(_full_log, "a") as log:
        log.write(f"\n===== {' '.join(command)}\n===== {status}\n{output}\n")


def _run(
    command: list[str], limit_s: float, cwd: Path = ROOT, log: Path | None = None
) -> tuple[bool, str]:
    """Run ``command``; True and its standard output if it exits 0 within ``limit_s``,
    else False and the end of everything it wrote. With ``log``, its standard output goes
    to that file as it is written, so that what came before a time-out is kept. Either
    way all of it is kept in the check's log."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    with open(log or os.devnull, "w") as sink:
        try:
            done = subprocess.run(
                command,
                cwd=cwd,
                stdout=sink if log else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                timeout=limit_s,
                check=False,
                env=env,
            )
        except subprocess.TimeoutExpired as error:
            out = log.read_text() if log else error.stdout
            out = out.decode() if isinstance(out, bytes) else out
            err = error.stderr.decode() if isinstance(error.stderr, bytes) else ""
            _keep(command, f"timed out after {limit_s} s", (out or "") + err)
            return False, f"timed out after {limit_s} s\n{(out or '')[-2000:]}"
    stdout = log.read_text() if log else done.stdout
    _keep(command, f"exit status {done.returncode}", stdout + done.stderr)
    if done.returncode == 0:
        return True, stdout
    return False, (stdout + done.stderr)[-3000:]


def _step(name: str, summary: dict[str, Any], work: Any) -> None:
    start = time.perf_counter()
    try:
        ok, result = work()
    except Exception as error:  # a broken step must not lose the others' results
        ok, result = False, f"{type(error).__name__}: {error}"
    record: dict[str, Any] = {
        "ok": ok,
        "seconds": round(time.perf_counter() - start, 1),
    }
    record["result" if ok else "error"] = result
    summary["steps"][name] = record
    sys.stdout.write(
        f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} in {record['seconds']} s\n"
    )
    sys.stdout.flush()


def _bench(args: list[str], limit_s: float) -> tuple[bool, Any]:
    ok, output = _run([sys.executable, "-m", "sae_lens_gated", "bench", *args], limit_s)
    if not ok:
        return False, output
    return True, json.loads(output.strip().splitlines()[-1])


# pytest -v's line for each test: "tests/x.py::test_name[cuda] PASSED   [ 10%]".
_RESULT_LINE = re.compile(r"^\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def printed_counts(output: str) -> dict[str, int]:
    """Test counts from the result lines ``pytest -v`` printed."""
    results = [m.group(1) for m in map(_RESULT_LINE.match, output.splitlines()) if m]
    return {
        "tests": len(results),
        "failures": results.count("FAILED"),
        "errors": results.count("ERROR"),
        "skipped": results.count("SKIPPED"),
    }


def _cuda_tier(shape: Shape, step: str) -> tuple[bool, Any]:
    """CUDA-marked tests: of the math and the training conventions, torch.compile's
    (``cuda_compile``, slow to compile on a GPU) or all the others (``cuda_tier``); or
    those of every other part (``cuda_paths``). Counts come from pytest's JUnit report,
    or, where pytest wrote none (out of time), from the results it printed before."""
    with tempfile.TemporaryDirectory() as folder:
        report, log = Path(folder) / "junit.xml", Path(folder) / "pytest.log"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs"]
        command += ["-p", "no:cacheprovider", f"--junitxml={report}"]
        if step == "cuda_paths":
            command += ["tests", "--ignore=tests/saes", "--ignore=tests/training"]
        else:
            command += ["-k", "compiled" if step == "cuda_compile" else "not compiled"]
            command += ["tests/saes", "tests/training"]
        ok, output = _run(command, shape.limits[step], log=log)
        slowest: list[tuple[str, float]] = []
        if report.exists():
            suite = ElementTree.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            counts: dict[str, Any] = {
                k: int(suite.get(k, "0"))
                for k in ("tests", "failures", "errors", "skipped")
            }
            # The slowest tests, to size the next check's limits.
            times = [
                (case.get("name", "?"), float(case.get("time", "0")))
                for case in suite.iter("testcase")
            ]
            slowest = sorted(times, key=lambda t: -t[1])[:5]
        else:
            # Out of time, or pytest stopped before its report (a collection error).
            timed_out = output.startswith("timed out after")
            counts = {**printed_counts(log.read_text()), "timed_out": timed_out}
        counts["passed"] = (
            counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        )
        if slowest:
            counts["slowest_s"] = [[name, round(t, 2)] for name, t in slowest]
        return ok and counts["tests"] > 0, counts if ok else {**counts, "log": output}


def _sparse_ops(shape: Shape) -> tuple[bool, Any]:
    """The probe of the sparse step's ops at 1% open gates; its JSON summary. It fails
    where an alternative formulation disagrees with the op it would replace."""
    command = [sys.executable, "scripts/sparse_ops_probe.py", "--device", shape.device]
    command += ["--dtype", shape.dtype, "--d-in", str(shape.d_in)]
    command += ["--d-sae", str(shape.d_sae), "--batch", str(shape.batch)]
    command += ["--density", "0.01", "--repeats", str(shape.repeats)]
    command += ["--tiles", *map(str, shape.probe_tiles)]
    ok, output = _run(command, shape.limits["sparse_ops"])
    lines = [line for line in output.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):  # no summary: the probe failed early
        return False, output
    return ok, result


# Small batches and a strong penalty: features die, so the run goes through a resampling
# event (and, latent-sharded, its collectives) on the device.
NCCL_SETTINGS = ["--batch-size", "64", "--l1", "5", "--lr", "1e-2"]


def _nccl(shape: Shape) -> tuple[bool, Any]:
    """The example in each mode, within the step's limit together; its JSON line each. A
    mode that resampled nothing fails: its event path did not run."""
    results: dict[str, Any] = {}
    deadline = time.monotonic() + shape.limits["nccl"]
    for mode in ("data", "latent"):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc-per-node", "1", "examples/train_distributed.py"]
            command += ["--mode", mode, "--steps", str(shape.nccl_steps)]
            command += [*NCCL_SETTINGS, "--out", str(Path(folder) / "sae")]
            ok, output = _run(command, max(1.0, deadline - time.monotonic()))
            if not ok:
                return False, {**results, mode: output}
            lines = [line for line in output.splitlines() if line.startswith("{")]
            results[mode] = json.loads(lines[-1])
            if results[mode]["resampled"] == 0:
                return False, {**results, "error": f"{mode}: no feature resampled"}
    return True, results


def _targets(steps: dict[str, Any]) -> dict[str, Any]:
    """Issue 21's targets, each with the measured value and whether it was met."""

    def summary(name: str) -> dict[str, Any] | None:
        step = steps.get(name, {})
        return step.get("result") if step.get("ok") else None

    def check(value: float | None, bound: float, below: bool = True) -> dict[str, Any]:
        met = None if value is None else (value <= bound if below else value >= bound)
        return {"value": value, "bound": bound, "met": met}

    def memory_check(mode: str) -> dict[str, Any]:
        ratio = memory.get(f"{mode}_peak_mem_ratio_vs_builtin")
        result = check(ratio, 1.0)
        out = memory.get("out_of_memory", [])
        if MEMORY_VARIANTS["builtin"] in out:
            # The built-in ran out of memory: a mode that fit allocated less.
            result["met"] = MEMORY_VARIANTS[mode] not in out
            result["out_of_memory"] = out
        return result

    one = summary("bench_0.01") or {}
    fresh = summary("bench_fresh") or {}
    memory = summary("memory_1m") or {}
    autos = [
        (summary(name) or {}).get("auto_vs_best")
        for name in ("bench_fresh", "bench_0.003", "bench_0.01")
    ]
    known = [a for a in autos if a is not None]
    return {
        "step_vs_standard_at_1pct": check(one.get("step_ratio_vs_standard"), 0.5),
        "speedup_vs_builtin_at_1pct": check(one.get("speedup_vs_builtin"), 4.0, False),
        "step_vs_standard_fresh": check(fresh.get("step_ratio_vs_standard"), 1.2),
        "auto_vs_best_worst": check(max(known) if known else None, 1.05),
        "peak_mem_vs_builtin_at_1pct": check(one.get("peak_mem_ratio_vs_builtin"), 1.0),
        "memory_1m_dense_vs_builtin": memory_check("dense"),
        "memory_1m_sparse_vs_builtin": memory_check("sparse"),
    }


STEPS = (
    "cuda_tier",
    "cuda_compile",
    "cuda_paths",
    "bench_fresh",
    "bench_0.003",
    "bench_0.01",
    "sparse_ops",
    "density_sweep",
    "memory_1m",
    "nccl",
)


def _steps(value: str) -> list[str]:
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown step {unknown[0]!r}" if unknown else "no step named"
        )
    return names


class _OneLineParser(argparse.ArgumentParser):
    """A command-line mistake is one line, and exit status 2, before any work."""

    @override
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gpu_check: {message}\n")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--dry-run", action="store_true", help="The CPU at small shapes."
    )
    parser.add_argument(
        "--steps",
        type=_steps,
        default=list(STEPS),
        help=f"Comma-separated steps to run (default all: {','.join(STEPS)}), to rerun "
        "some on a GPU with little time left.",
    )
    parser.add_argument(
        "--check-args", action="store_true", help="Only check these arguments."
    )
    return parser.parse_args(argv)


def _write_summary(summary: dict[str, Any], out: Path) -> None:
    summary["targets"] = _targets(summary["steps"])
    summary["all_steps_ok"] = all(step["ok"] for step in summary["steps"].values())
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> int:
    global _full_log
    args = _arguments(argv)
    if args.check_args:
        return 0
    out: Path = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _full_log = out / LOG_NAME
    _full_log.write_text("")
    shape = DRY_RUN if args.dry_run else GPU
    import torch

    summary: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": shape.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "shape": {k: v for k, v in asdict(shape).items() if k != "limits"},
        "steps": {},
    }
    common = ["--device", shape.device, "--dtype", shape.dtype]
    common += ["--d-in", str(shape.d_in)]
    base = [*common, "--batch", str(shape.batch), "--d-sae", str(shape.d_sae)]
    base += ["--repeats", str(shape.repeats)]
    timed = [*base, "--auto-steps", str(shape.auto_steps)]
    sweep = [*base, "--density-sweep", *shape.sweep, "--plot", str(out / PLOT_NAME)]
    memory = [*common, "--memory-only", "--d-sae", str(shape.memory_d_sae)]
    memory += ["--batch", str(shape.memory_batch), "--gate-density", "0.01"]
    bench_s = shape.limits["bench"]
    one_pct = [*timed, "--gate-density", "0.01", "--profile", str(out / PROFILE_NAME)]
    work: dict[str, Callable[[], tuple[bool, Any]]] = {
        "cuda_tier": lambda: _cuda_tier(shape, "cuda_tier"),
        "cuda_compile": lambda: _cuda_tier(shape, "cuda_compile"),
        "cuda_paths": lambda: _cuda_tier(shape, "cuda_paths"),
        "bench_fresh": lambda: _bench(timed, bench_s),
        "bench_0.003": lambda: _bench([*timed, "--gate-density", "0.003"], bench_s),
        "bench_0.01": lambda: _bench(one_pct, bench_s),
        "sparse_ops": lambda: _sparse_ops(shape),
        "density_sweep": lambda: _bench(sweep, shape.limits["sweep"]),
        "memory_1m": lambda: _bench(memory, shape.limits["memory"]),
        "nccl": lambda: _nccl(shape),
    }
    for name in STEPS:
        if name in args.steps:
            _step(name, summary, work[name])
            _write_summary(summary, out)  # so far: a run stopped from outside keeps it
    sys.stdout.write(json.dumps(summary["targets"]) + "\n")
    return 0 if summary["all_steps_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

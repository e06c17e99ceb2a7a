"""The GPU check's summary as Markdown, for docs/performance.md.

usage: python scripts/gpu_report.py OUT_DIR/gpu_check.json
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The bench numbers each row shows, with their column titles.
BENCH_COLUMNS = {
    "gate_density": "gate density",
    "step_ratio_vs_standard": "step / standard",
    "speedup_vs_builtin": "speedup vs built-in",
    "peak_mem_ratio_vs_builtin": "peak mem / built-in",
    "auto_choice": "auto chose",
    "auto_vs_best": "auto / best",
}

# The slowest ops of each profiled step the report names.
PROFILE_OPS = 6


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def report(summary: dict[str, Any]) -> str:
    """Markdown: the machine, each step, the bench numbers, and the targets.

    Args:
        summary: ``gpu_check.json``'s content.
    """
    shape = summary["shape"]
    steps: dict[str, Any] = summary["steps"]
    lines = [
        f"GPU check on {summary['gpu'] or summary['device']} (torch {summary['torch']}"
        f"{', dry run' if summary['dry_run'] else ''}): {shape['dtype']}, d_in "
        f"{shape['d_in']}, d_sae {shape['d_sae']}, batch {shape['batch']}.",
        "",
        *_table(
            ["step", "ok", "seconds"],
            [[name, step["ok"], step["seconds"]] for name, step in steps.items()],
        ),
    ]
    benches = [
        [name, *(step["result"].get(key) for key in BENCH_COLUMNS)]
        for name, step in steps.items()
        if name.startswith("bench_") and step["ok"]
    ]
    sweep = steps.get("density_sweep", {})
    if sweep.get("ok"):
        benches += [
            ["density_sweep", *(run.get(key) for key in BENCH_COLUMNS)]
            for run in sweep["result"]["density_sweep"]
        ]
    if benches:
        lines += ["", *_table(["bench", *BENCH_COLUMNS.values()], benches)]
    for name, step in steps.items():
        slowest = step.get("result", {}).get("profile_top_ms") if step["ok"] else None
        if slowest:
            lines += ["", f"{name}, one profiled step, slowest ops by self time:", ""]
            lines += [
                f"- {mode}: "
                + ", ".join(f"`{op}` {ms:.3g} ms" for op, ms in ops[:PROFILE_OPS])
                for mode, ops in slowest.items()
            ]
    probe = steps.get("sparse_ops", {})
    if probe.get("ok"):
        result = probe["result"]
        lines += [
            "",
            f"sparse_ops at {result['density']:.3g} open ({result['nnz']} gates), "
            "each op against one dense matmul:",
            "",
            *_table(
                ["op", "ms", "x matmul", "error"],
                [
                    [op, ms, result["vs_matmul"][op], result["errors"].get(op)]
                    for op, ms in result["ms"].items()
                ],
            ),
        ]
    for tier in ("cuda_tier", "cuda_compile", "cuda_paths"):
        step = steps.get(tier)
        if step is not None:
            counts = step.get("result") or step.get("error")
            if isinstance(counts, dict):
                lines += [
                    "",
                    f"{tier}: {counts['passed']} passed, {counts['failures']} failed, "
                    f"{counts['errors']} errors, {counts['skipped']} skipped"
                    f"{' (out of time)' if counts.get('timed_out') else ''}.",
                ]
    targets = [
        [name, t["value"], t["bound"], t["met"]]
        for name, t in summary["targets"].items()
    ]
    lines += ["", *_table(["target", "measured", "bound", "met"], targets)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path)
    args = parser.parse_args(argv)
    sys.stdout.write(report(json.loads(args.summary.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The prepared GPU check (issue 21): at most 8 minutes on one H100.
#
#   scripts/gpu_check.sh OUT_DIR            on the GPU machine (device tool: carry .whl)
#   scripts/gpu_check.sh --dry-run OUT_DIR  the same steps on the CPU at small shapes
#   scripts/gpu_check.sh --steps bench_0.01,nccl OUT_DIR   only those (a rerun after a fix)
#
# On the GPU machine (Python 3.12, PyTorch 2.11, no network) it first installs what that
# machine lacks from the wheels in .whl/ (git-ignored; scripts/gpu_wheels.txt lists them,
# scripts/gpu_wheels.sh downloads them; OUT_DIR/wheels_check.txt says whether they and the
# machine's packages hold every requirement), then runs scripts/gpu_check.py, which writes
# OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.log (every command's whole output) and
# OUT_DIR/step_vs_gate_density.png.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/gpu_check.sh [--dry-run] [--steps STEP,...] OUT_DIR"
dry_run=false
args=()
out=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --dry-run) dry_run=true ;;
    --steps)
        [[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
        args+=(--steps "$2")
        shift
        ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) out+=("$1") ;;
    esac
    shift
done
if [[ ${#out[@]} -ne 1 ]]; then
    echo "$usage" >&2
    exit 2
fi
if $dry_run; then
    args+=(--dry-run)
fi
args+=("${out[0]}")

python="${PYTHON:-python3}"
# A mistake in the steps is named before anything is installed or run.
"$python" scripts/gpu_check.py --check-args "${args[@]}"
wheels="${GPU_CHECK_WHEELS:-.whl}"
if ! $dry_run; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: no wheels in $wheels: run scripts/gpu_wheels.sh first" >&2
        exit 2
    fi
    # What the image and the wheels lack, if anything, named before the steps fail on it.
    mkdir -p "${out[0]}"
    "$python" scripts/gpu_wheels_check.py --installed "$wheels" 2>&1 |
        tee "${out[0]}/wheels_check.txt" || true
    site=/tmp/gpu-check-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site:$PWD"
fi
exec "$python" scripts/gpu_check.py "${args[@]}"

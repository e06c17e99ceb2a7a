#!/usr/bin/env bash
# Rehearse the GPU machine's Python on this CPU machine, before a GPU is lent: a virtualenv
# with the image's packages (scripts/gpu_image.txt, at the versions read there where this
# Python has them), none of the carried ones, and the carried wheels installed the way
# scripts/gpu_check.sh installs them there (pip --target, then PYTHONPATH). In it, runs the
# wheels check, the GPU check's dry run and the whole test suite.
#
#   scripts/gpu_rehearsal.sh WORK_DIR     (needs .whl/ from scripts/gpu_wheels.sh; ~8 min)
#
# What it cannot rehearse: the GPU machine's Python 3.12 and PyTorch 2.11 (this uses the
# local Python and the CPU build of PyTorch 2.13), and its numpy 2.5 (Python >= 3.12 only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 1 ]]; then
    echo "usage: scripts/gpu_rehearsal.sh WORK_DIR" >&2
    exit 2
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_rehearsal: no wheels in .whl: run scripts/gpu_wheels.sh first" >&2
    exit 2
fi
work=$(realpath -m "$1")
venv="$work/venv"
site="$work/site"
python="$venv/bin/python"
rm -rf "$venv" "$site"
python3 -m venv "$venv"
"$python" -m pip install -q --upgrade pip
"$python" -m pip install -q torch==2.13.0

# The image's packages that sae-lens-gated and the wheels require, at the versions read
# there, but for PyTorch (installed above) and numpy (2.5 needs Python 3.12); and those the
# tests and SAELens import without declaring them.
"$python" -m pip install -q packaging
image=$("$python" scripts/gpu_wheels_check.py --image-needs | grep -v '^torch==' |
    sed 's/^numpy==.*/numpy/')
# shellcheck disable=SC2086
"$python" -m pip install -q $image scipy pytest pytest-xdist
"$python" -m pip install -q --no-deps --group references
# The carried packages come from the wheels alone, as on the GPU machine.
carried=$(grep -v '^#' scripts/gpu_wheels.txt | grep . | cut -d= -f1)
# shellcheck disable=SC2086
"$python" -m pip uninstall -q -y $carried 2>/dev/null || true

# Wheels built for Python 3.12 only are fetched again, at the same versions, for this one.
local_wheels="$work/wheels"
rm -rf "$local_wheels" && mkdir -p "$local_wheels"
for wheel in .whl/*.whl; do
    case "$wheel" in
    *-cp312-* | *-py312-*)
        name=$(basename "$wheel" | cut -d- -f1-2 | tr _ - | sed 's/-\([^-]*\)$/==\1/')
        "$python" -m pip download -q --no-deps --only-binary=:all: -d "$local_wheels" "$name"
        ;;
    *) cp "$wheel" "$local_wheels/" ;;
    esac
done
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$local_wheels"/*.whl

"$python" scripts/gpu_wheels_check.py --installed "$local_wheels"
export PYTHONPATH="$site:$PWD" WANDB_MODE=offline
"$python" scripts/gpu_check.py --dry-run "$work/gpu-check"
"$python" -m pytest -q -p no:cacheprovider -n 2 tests

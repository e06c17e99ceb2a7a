#!/usr/bin/env bash
# Download the wheels scripts/gpu_wheels.txt lists into .whl/ (git-ignored), for the GPU
# machine's Python 3.12 on x86-64, without their dependencies (the list is the closure).
# A package published only as a source archive (pure Python) is built into a wheel here.
# Run where PyPI is reachable; scripts/gpu_check.sh installs them on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in $(grep -v '^#' scripts/gpu_wheels.txt | grep .); do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec" \
        2>/dev/null ||
        python3 -m pip wheel -q --no-deps -w .whl "$spec" 2>/dev/null ||
        { echo "gpu_wheels: no wheel for $spec" >&2; exit 1; }
done
du -sh .whl
# Every requirement carried or in the GPU image (scripts/gpu_image.txt), at a version it admits.
python3 scripts/gpu_wheels_check.py .whl

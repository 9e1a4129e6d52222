#!/usr/bin/env bash
# Fills benchmarks/wheels/ (git-ignored) with the wheels that benchmarks/device_check.sh
# installs on a GPU host without network: the distributions of benchmarks/device_wheels.txt,
# built for Python 3.12 on manylinux x86-64 (about 26 MB). Run it on any connected machine
# (any OS or Python with pip), then carry the folder along with the checkout:
#
#   benchmarks/fetch_wheels.sh [DEST] [PYTHON_VERSION]     # defaults: benchmarks/wheels 3.12
set -euo pipefail
cd "$(dirname "$0")"
DEST="${1:-wheels}"
PYVER="${2:-3.12}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
# Binary wheels for the target, whatever this machine is, and no dependency resolution: the
# list already names every distribution the GPU images lack.
grep -v '^promise==' device_wheels.txt | "$PYTHON" -m pip download --quiet --no-deps \
    --only-binary=:all: --python-version "$PYVER" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest "$DEST" -r /dev/stdin
# promise (imported by tensorflow-datasets) is published only as a source archive; it is pure
# Python, so a wheel built here installs anywhere.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DEST" "$(grep '^promise==' device_wheels.txt)"
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST"

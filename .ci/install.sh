#!/usr/bin/env bash
# Create ./.venv and install MedVol-R1 with everything the tests, the demo and CPU training need.
# Idempotent: a second run only checks. torch/torchvision are pinned for this CPU machine (constraints-cpu.txt);
# a GPU server installs its own torch first and then `pip install -e .[train]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.medvolr1-installed"
# dciodvfy (Debian's dicom3tools) validates the DICOM SEG in the tests, which skip with a reason without it
if ! command -v dciodvfy >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -q dicom3tools; } >/dev/null 2>&1 || echo "note: dicom3tools not installed; the dciodvfy check will skip" >&2
fi
if [ -f "$STAMP" ] && cmp -s "$STAMP" <(cat pyproject.toml constraints-cpu.txt); then
  exit 0
fi
$PIP install -q --upgrade "pip>=23" "setuptools>=68" wheel
# 1. torch first: sam2 builds against it without build isolation (isolation would pull a second, CUDA torch)
$PIP install -q -c constraints-cpu.txt torch torchvision
# 2. sam2 is an sdist; build without the CUDA extension (its "cannot import _C" warning is harmless)
SAM2_BUILD_CUDA=0 $PIP install -q --no-build-isolation -c constraints-cpu.txt sam2
# 3. the project with training and test extras
$PIP install -q -c constraints-cpu.txt -e ".[test]"
$PIP check
cat pyproject.toml constraints-cpu.txt > "$STAMP"

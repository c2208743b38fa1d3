#!/usr/bin/env bash
# Wheels for the lent GPU machines (docs/gpu.md), saved into .whl/ (ignored by git): run it here, where pip
# reaches an index; benchmarks/gpu_check.sh installs them there with --no-deps (no network there).
#
# The machine (Linux x86_64, CPython 3.12) already holds torch 2.11, torchvision, timm, huggingface-hub, regex,
# tqdm, numpy, packaging, typing-extensions, pyyaml, typer, rich, safetensors, matplotlib, jinja2, pytest and
# tensorboard; missing are open_clip and zarr, their dependencies ftfy (wcwidth), donfig and google-crc32c,
# numcodecs, av, and optuna with alembic (Mako), SQLAlchemy and colorlog. Versions: those mad is tested with; one
# version of each (two stop the install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    av==18.1.0
    optuna==5.1.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 colorlog==6.12.0
)
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl

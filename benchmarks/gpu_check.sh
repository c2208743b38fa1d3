#!/usr/bin/env bash
# The one GPU check (docs/gpu.md): every CUDA path of mad once, and the memory/speed figures, in under 8 minutes.
#
#   benchmarks/gpu_check.sh --out DIR            on a CUDA machine; DIR/gpu_check.json holds every step's result
#   benchmarks/gpu_check.sh --smoke --out DIR    every step on the CPU at tiny sizes (tests/test_gpu_check.py)
#
# A machine without open_clip, zarr, numcodecs, av or optuna (the lent GPU machines: no network) gets them from the
# wheels that benchmarks/gpu_wheels.sh saved in .whl/, installed without dependencies into $MAD_SITE.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MAD_SITE=${MAD_SITE:-/tmp/mad-site}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# mad's own import of open_clip (it works around a torchvision whose compiled ops do not load)
if ! "$PYTHON" -c "import zarr, numcodecs, av, optuna; from mad._compat import import_open_clip; import_open_clip()" \
        2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check: open_clip, zarr, numcodecs, av or optuna is missing and .whl/ holds no wheels;" \
             "run benchmarks/gpu_wheels.sh where there is network, and carry .whl" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$MAD_SITE" "${wheels[@]}"
    export PYTHONPATH="$PWD:$MAD_SITE:${PYTHONPATH#"$PWD:"}"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# The GPU check of a borrowed machine (docs/testing.md, "On a borrowed GPU"): prepare here, then two short
# commands there, each well under 5 minutes on an H100, so one can be rerun inside a 15-minute loan.
#
#   bash tools/gpu_check.sh wheels      # here, before borrowing: what the GPU image lacks (diffusers), into .whl/
#   bash tools/gpu_check.sh tests       # there: pytest tests/test_cuda.py, then bench/bench_gpu.py --part speed
#   bash tools/gpu_check.sh budgets     # there: bench/bench_gpu.py --part budgets (8, 12, 16, 24 GiB)
#
# There, the repository travels with `.whl` carried; results go to $OUT (or out/): the pytest log and JUnit XML,
# and the bench's JSON beside its printed tables. PYTHON (default python3) is the interpreter that has torch.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-$REPO/out}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

# the GPU image has torch, transformers, safetensors, numpy, Pillow and pytest; these it lacks
WHEELS=("diffusers==0.42.1" "importlib_metadata==10.2.0")

install_carried_wheels() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lance-site .whl/*.whl
        export PYTHONPATH=/tmp/lance-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PYTHON" -c 'import diffusers, torch; assert torch.cuda.is_available(), "no CUDA device"' \
        || { echo "gpu_check: needs a CUDA device and diffusers (run 'bash tools/gpu_check.sh wheels' here first)" >&2; exit 2; }
}

case "${1:-}" in
    wheels)
        mkdir -p .whl
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "${WHEELS[@]}"
        ls -la .whl
        ;;
    tests)
        install_carried_wheels
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$RESULTS/test_cuda.xml" 2>&1 \
            | tee "$RESULTS/test_cuda.log" || true
        "$PYTHON" bench/bench_gpu.py --part speed --json "$RESULTS/bench_gpu_speed.json"
        ;;
    budgets)
        install_carried_wheels
        "$PYTHON" bench/bench_gpu.py --part budgets --json "$RESULTS/bench_gpu_budgets.json"
        ;;
    *)
        echo "usage: bash tools/gpu_check.sh wheels | tests | budgets" >&2
        exit 2
        ;;
esac

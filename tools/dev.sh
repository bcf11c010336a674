#!/usr/bin/env bash
# Developer entry point (README's two commands):
#   bash tools/dev.sh demo [task args...]    a Lance task end to end (default: text-to-image -> out/t2i.png)
#   bash tools/dev.sh test [pytest args...]  the test suite
# Both first make sure the environment exists: .venv/ in the checkout, built from pyproject.toml's [test] extra
# (a CPU torch where no NVIDIA GPU is found). A stamp of pyproject.toml, requirements.txt, the Python version and
# the torch choice makes a warm run skip pip. LANCE_PYTHON=/path/to/python uses that interpreter as it is instead
# (CI: the shared ComfyUI venv). The demo runs on the tiny random checkpoint in tests/golden/checkpoint (its output
# is noise) unless LANCE_MODEL names a release folder.
#
# Environment: LANCE_PYTHON (use this interpreter, install nothing), LANCE_BASE_PYTHON (interpreter that creates
# .venv, default python3), LANCE_TORCH (pip requirement for torch, default torch==2.13.0: the CPU build from
# PyTorch's CPU index without an NVIDIA GPU, PyPI's CUDA build with one), LANCE_TORCH_INDEX
# (the CPU index), LANCE_MODEL (demo model folder).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
TORCH_VERSION=2.13.0
CPU_TORCH_INDEX=${LANCE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

log() { echo "[dev] $*" >&2; }

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

torch_build() { if has_nvidia_gpu; then echo cuda; else echo cpu; fi; }

install_torch() {  # $1 requirement, $2 build. CPU: the +cpu wheel (PyTorch's CPU index, or a local wheel folder
    # that pip is configured with; an unreachable index is given up at once) ranks above PyPI's CUDA build
    local pip=("$PY" -m pip install --no-input --progress-bar off "$1")
    if [ "$2" = cpu ]; then
        "${pip[@]}" --extra-index-url "$CPU_TORCH_INDEX" --retries 0 --timeout 20
    else
        "${pip[@]}"
    fi
}

ensure_env() {
    if [ -n "${LANCE_PYTHON:-}" ]; then
        "$LANCE_PYTHON" -c 'import torch' 2>/dev/null || { log "LANCE_PYTHON=$LANCE_PYTHON cannot import torch"; exit 1; }
        PY=$LANCE_PYTHON
        return
    fi
    local base=${LANCE_BASE_PYTHON:-python3} torch build stamp
    command -v "$base" >/dev/null 2>&1 || { log "$base not found: install Python >= 3.10 or set LANCE_BASE_PYTHON"; exit 1; }
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { log "$base is older than Python 3.10"; exit 1; }
    torch=${LANCE_TORCH:-torch==$TORCH_VERSION}
    build=$(torch_build)
    stamp=$( { "$base" -c 'import sys; print(sys.version)'; echo "$torch $build"; cat "$REPO/pyproject.toml" "$REPO/requirements.txt"; } \
             | sha256sum | cut -d' ' -f1)
    PY=$VENV/bin/python
    if [ -x "$PY" ] && [ "$(cat "$VENV/.lance-stamp" 2>/dev/null)" = "$stamp" ]; then
        return
    fi
    local started=$SECONDS
    log "setting up $VENV ($torch, $build build; pip log: $VENV/pip.log)"
    rm -rf "$VENV"
    "$base" -m venv "$VENV"
    if ! { install_torch "$torch" "$build" && "$PY" -m pip install --no-input --progress-bar off -e "$REPO[test]"; } \
            > "$VENV/pip.log" 2>&1; then
        tail -n 40 "$VENV/pip.log" >&2
        log "pip failed; full log: $VENV/pip.log"
        exit 1
    fi
    local cuda
    cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
    log "torch $("$PY" -c 'import torch; print(torch.__version__)')"
    if [ "$build" = cpu ] && [ -n "$cuda" ]; then
        log "note: no CPU torch was reachable ($CPU_TORCH_INDEX), so pip took PyPI's CUDA build (it runs on CPU too)"
    fi
    echo "$stamp" > "$VENV/.lance-stamp"
    log "environment ready in $((SECONDS - started)) s"
}

case "${1:-}" in
    demo)
        shift
        ensure_env
        cd "$REPO"
        export LANCE_MODEL=${LANCE_MODEL:-$REPO/tests/golden/checkpoint}
        if [ $# -eq 0 ]; then
            set -- t2i --prompt "A red cat holds a blue sign that says STOP." --out out/t2i
        fi
        exec "$PY" -m lance_model "$@"
        ;;
    test)
        shift
        ensure_env
        cd "$REPO"
        exec "$PY" -m pytest -q "$@"
        ;;
    *)
        echo "usage: bash tools/dev.sh demo [task args...] | test [pytest args...]" >&2
        exit 2
        ;;
esac

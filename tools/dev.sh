#!/usr/bin/env bash
# Developer entry point. `demo` runs a Lance task end to end (the tiny test checkpoint unless LANCE_MODEL points
# at a release folder); `test` runs the whole test suite. Both first make sure the environment exists
# (../shared/comfyui/setup.sh: a venv with torch, transformers, diffusers and a real ComfyUI; ~2 min cold,
# instant when warm).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${LANCE_SHARED:-$REPO/../shared}
export LANCE_GOLDEN=${LANCE_GOLDEN:-$SHARED/golden}
PY=${LANCE_COMFY_HOME:-$HOME/.cache/lance-comfyui}/venv/bin/python

setup() {
    # --browser installs Debian's chromium when missing (the UI-workflow check needs it)
    bash "$SHARED/comfyui/setup.sh" --project "$REPO" ${LANCE_SETUP_ARGS---browser} >&2
}

case "${1:-}" in
    demo)
        shift
        setup
        cd "$REPO"
        if [ $# -eq 0 ]; then
            set -- t2i --prompt "A red cat holds a blue sign that says STOP." --out out/t2i
        fi
        exec "$PY" -m lance_model "$@"
        ;;
    test)
        shift
        setup
        cd "$REPO"
        exec "$PY" -m pytest -q "$@"
        ;;
    *)
        echo "usage: bash tools/dev.sh demo [task args...] | test [pytest args...]" >&2
        exit 2
        ;;
esac

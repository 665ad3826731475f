#!/usr/bin/env bash
# The README's first command: set everything up, then run the example graph in a real ComfyUI
# with this package, on tiny random-weight models built here, and print where the video is.
#
#   COMFYUI_DIR     an existing ComfyUI to use, 0.3.64 or 0.33.0 (default: clone v0.33.0 into .comfyui/)
#   COMFYUI_PYTHON  its Python (default: $COMFYUI_DIR/.venv/bin/python, created if missing)
#   COMFYUI_REF     the ComfyUI tag to clone (default: v0.33.0)
#   STEADYDANCER_VENV, STEADYDANCER_TORCH: see scripts/install.sh (the project's own venv)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${STEADYDANCER_VENV:-.venv}
TORCH_SPEC=${STEADYDANCER_TORCH:-torch==2.13.0}

step() { printf '\n== %s\n' "$*" >&2; }

step "project venv ($VENV)"
bash scripts/install.sh

step "ComfyUI"
COMFY=${COMFYUI_DIR:-$REPO/.comfyui}
if [ ! -f "$COMFY/main.py" ]; then
  [ -z "${COMFYUI_DIR:-}" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 1; }
  git clone --quiet --depth 1 --branch "${COMFYUI_REF:-v0.33.0}" https://github.com/comfyanonymous/ComfyUI.git "$COMFY"
fi
COMFY=$(cd "$COMFY" && pwd)
PY=${COMFYUI_PYTHON:-$COMFY/.venv/bin/python}
if [ ! -x "$PY" ]; then
  [ -z "${COMFYUI_PYTHON:-}" ] || { echo "COMFYUI_PYTHON=$COMFYUI_PYTHON is not executable" >&2; exit 1; }
  echo "creating $COMFY/.venv with $TORCH_SPEC and ComfyUI's requirements ..." >&2
  python3 -m venv "$COMFY/.venv"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$TORCH_SPEC" torchvision torchaudio
  "$PY" -m pip install -q -r "$COMFY/requirements.txt"
fi
echo "ComfyUI $(cd "$COMFY" && "$PY" -c 'import comfyui_version; print(comfyui_version.__version__)') at $COMFY ($PY)" >&2

step "this package's requirements in ComfyUI's Python (what ComfyUI-Manager installs; onnx builds the demo's pose stand-ins)"
"$PY" -m pip install -q -r requirements.txt onnx 2>&1 | grep -vE '^WARNING: Location|^\[notice\]' || true
"$PY" install.py  # what ComfyUI-Manager runs next: the ONNX runtime that fits this machine

step "tiny models, ComfyUI with this package, the example graph"
"$VENV/bin/python" scripts/comfyui_demo.py --comfyui "$COMFY" --python "$PY"

#!/usr/bin/env bash
# Create (or update) the project's virtualenv with everything the tests and the demo need.
# usage: scripts/install.sh            -> .venv (or $STEADYDANCER_VENV)
# torch is pinned to the CPU build that CI uses; a GPU user keeps ComfyUI's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${STEADYDANCER_VENV:-.venv}
TORCH_SPEC=${STEADYDANCER_TORCH:-torch==2.13.0}
stamp="$VENV/.installed"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -vE '^WARNING: Location|^\[notice\]' || true; }
echo "installing into $VENV ($TORCH_SPEC, the package with [dev]) ..."
pip install -q --upgrade pip
pip install -q "$TORCH_SPEC"
pip install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, gguf, safetensors, onnxruntime" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"

#!/usr/bin/env bash
# The test command: lint, then the whole test suite. CI runs exactly this (.ci/run).
# Tests that need a GPU, a real ComfyUI (COMFYUI_DIR), a Docker engine or the mmpose stack
# skip with their reason printed in the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${STEADYDANCER_VENV:-.venv}
bash scripts/install.sh
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"

"""A real ComfyUI (COMFYUI_DIR) with this package and the tiny demo models, for the session.

The tiny models are built once into the repository's `tiny_models/` (git-ignored) by
`scripts/make_tiny_models.py`, run with ComfyUI's Python; later sessions reuse them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts.comfyui_demo import build_demo
from scripts.comfyui_server import REPO_ROOT, ComfyServer, comfyui_python

TINY_MODELS = REPO_ROOT / "tiny_models"


def _comfyui_dir() -> Path:
    path = os.environ.get("COMFYUI_DIR")
    if not path:
        pytest.skip("needs a real ComfyUI: set COMFYUI_DIR (and COMFYUI_PYTHON)")
    return Path(path)


@pytest.fixture(scope="session")
def api_workflow() -> dict:
    return json.loads((REPO_ROOT / "workflows" / "api" / "steadydancer_api.json").read_text())


@pytest.fixture(scope="session")
def demo_graph(comfy_server: ComfyServer) -> dict:
    """The example API graph on the tiny models (written by make_tiny_models.py --graph)."""
    return json.loads((comfy_server.work / "demo_graph.json").read_text())


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory):
    comfyui = _comfyui_dir()
    work = tmp_path_factory.mktemp("comfyui")
    build_demo(comfyui_python(comfyui), comfyui, TINY_MODELS, work)
    server = ComfyServer(comfyui, work, TINY_MODELS)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        out = REPO_ROOT / "test-output"
        out.mkdir(exist_ok=True)
        (out / "comfyui.log").write_text(server.log_path.read_text(errors="replace"))

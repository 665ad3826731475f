"""Shared fixtures and skip rules.

Tests that need something CI does not have (a CUDA GPU, a real ComfyUI, a Docker engine,
the mmpose stack) skip with a reason that `pytest -ra` prints.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.comfyui_inprocess import load_package  # noqa: E402  (the package as ComfyUI loads it)


def _comfyui_reason() -> str | None:
    path = os.environ.get("COMFYUI_DIR")
    if not path:
        return "needs a real ComfyUI: set COMFYUI_DIR (and COMFYUI_PYTHON) to a ComfyUI checkout (0.3.64 or 0.33.0)"
    if not (Path(path) / "main.py").is_file():
        return f"COMFYUI_DIR={path} has no main.py"
    return None


def _docker_reason() -> str | None:
    if shutil.which("docker") is None:
        return "needs a Docker engine: no docker command"
    try:
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return None if ok else "needs a Docker engine: `docker info` failed (no running dockerd)"


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs torch"
    return None if torch.cuda.is_available() else "needs a CUDA GPU (none here)"


def _mmpose_reason() -> str | None:
    for mod in ("mmcv", "mmdet", "mmpose"):
        if importlib.util.find_spec(mod) is None:
            return f"needs the mmpose stack (`pip install .[mmpose]`, see README): {mod} is not installed"
    return None


_REASONS = {"comfyui": _comfyui_reason, "docker": _docker_reason, "gpu": _gpu_reason, "mmpose": _mmpose_reason}
_cache: dict[str, str | None] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, check in _REASONS.items():
            if marker in item.keywords:
                if marker not in _cache:
                    _cache[marker] = check()
                if _cache[marker]:
                    item.add_marker(pytest.mark.skip(reason=_cache[marker]))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def package():
    return load_package()

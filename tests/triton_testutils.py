"""Running Triton kernels on the CPU, for the tests of the fused kernels.

Triton chooses between its compiler and its CPU interpreter when a kernel module is first
imported (TRITON_INTERPRET=1 at that moment selects the interpreter), so interpreter checks
run as a script in a fresh Python process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton)")


def run_in_interpreter(
    script: str, repo_root: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `script` with TRITON_INTERPRET=1 and the repository importable; its output as text."""
    path = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=repo_root,
    )

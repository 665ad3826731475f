"""Run a check script in ComfyUI's own Python and read the JSON report it writes.

Some checks need ComfyUI's modules (model management, samplers, folder_paths) in-process;
they run in one subprocess per test module, and each test asserts one entry of the report.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from scripts.comfyui_server import comfyui_python


def run_checks(script: Path, out_dir: Path, timeout: int, args: tuple[str, ...] = ()) -> dict:
    """Run `script OUT.json ARGS` with ComfyUI's Python; fail the test with its stderr if it breaks.

    A script may answer {"unsupported": why} (the running ComfyUI lacks what ARGS ask for):
    the tests that use the report are skipped with that reason.
    """
    out = out_dir / "report.json"
    python = comfyui_python(Path(os.environ["COMFYUI_DIR"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, str(script), str(out), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the ComfyUI check process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(out.read_text())
    if "unsupported" in report:
        pytest.skip(report["unsupported"])
    return report


def result(report: dict, name: str) -> dict:
    """One check's entry; a check that raised fails with its own traceback."""
    entry = report[name]
    assert entry["ok"], f"{entry['error']}\n{entry['traceback']}"
    return entry

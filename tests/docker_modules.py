"""Import the scripts under docker/ as modules, the way they run in the image, and start a
real ComfyUI for the tests that need one (COMFYUI_DIR).

The scripts are standalone files (not a package): each runs with docker/ as its own folder
on sys.path, so sibling imports (`import comfy_client`) resolve the same way here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def load_docker_module(name: str) -> ModuleType:
    """docker/<name>.py as module `name` (registered in sys.modules for sibling imports)."""
    if str(DOCKER) not in sys.path:
        sys.path.insert(0, str(DOCKER))
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def running_comfyui(work: Path, *extra_args: str, timeout: float = 180) -> Iterator[str]:
    """A real ComfyUI (COMFYUI_DIR, core nodes only, CPU) on a free loopback port, with its
    input/output/temp folders under `work`; yields its URL."""
    comfy_dir = Path(os.environ["COMFYUI_DIR"])
    python = os.environ.get("COMFYUI_PYTHON") or str(comfy_dir / ".venv" / "bin" / "python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--disable-all-custom-nodes", "--input-directory", str(work / "input"),
               "--output-directory", str(work / "output"), "--temp-directory", str(work), *extra_args]
    url = f"http://127.0.0.1:{port}"
    with open(work / "comfyui.log", "w") as log:
        process = subprocess.Popen(command, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/system_stats", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start: see {work / 'comfyui.log'}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

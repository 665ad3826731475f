"""What ComfyUI-Manager and the Comfy Registry read: pyproject's [tool.comfy], requirements.txt,
.comfyignore and install.py (whose choice of ONNX runtime is tested with made-up machines)."""

from __future__ import annotations

import fnmatch
import subprocess
import sys

import tomllib
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import install  # the repository root's install.py, as ComfyUI-Manager runs it

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
REGISTRY_URL_PREFIX = "https://raw.githubusercontent.com/comfyui-steadydancer/comfyui-steadydancer/main/"


def test_registry_metadata_points_at_files_that_exist() -> None:
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["Icon"].startswith(REGISTRY_URL_PREFIX)
    assert (REPO_ROOT / comfy["Icon"].removeprefix(REGISTRY_URL_PREFIX)).is_file()
    assert comfy["requires-comfyui"] == ">=0.3.64"  # comfy_entrypoint (V3 nodes), the oldest tested


def test_requirements_never_pin_torch_or_an_onnx_runtime() -> None:
    names = [line.split(">")[0].split("=")[0].strip().lower() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    assert not {"torch", "torchvision", "torchaudio"} & set(names)
    assert not [n for n in names if n.startswith("onnxruntime")]  # install.py decides (no CPU build shadowing a GPU one)


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(path.startswith(p.rstrip("/") + "/") if p.endswith("/") else fnmatch.fnmatch(path, p) for p in patterns)


def test_registry_archive_leaves_out_development_files_and_keeps_the_package() -> None:
    patterns = [line.strip() for line in (REPO_ROOT / ".comfyignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    shipped = [path for path in tracked if not _ignored(path, patterns)]
    assert not [p for p in shipped if p.startswith(("tests/", "docker/", "benchmarks/", ".ci/"))]
    for needed in ("__init__.py", "install.py", "requirements.txt", "nodes/model_loader.py", "steadydancer/model.py",
                   "pose/render.py", "workflows/steadydancer.json", "docs/icon.png"):  # fmt: skip
        assert needed in shipped, needed


def test_install_script_chooses_one_onnx_runtime() -> None:
    none = dict.fromkeys(install.RUNTIMES)
    # PyPI's onnxruntime-gpu wheels need CUDA 12 up to 1.26 and CUDA 13 from 1.27 (their metadata)
    assert install.choose_runtime(none, "12.8") == "onnxruntime-gpu<1.27"
    assert install.choose_runtime(none, "13.0") == "onnxruntime-gpu>=1.27"
    assert install.choose_runtime(none, "11.8") == "onnxruntime"  # no build for it: torch runs the files
    assert install.choose_runtime(none, None) == "onnxruntime"  # CPU, Apple, AMD
    assert install.choose_runtime({**none, "onnxruntime-gpu": "1.22.0"}, None) is None  # never a second build
    assert install.choose_runtime({**none, "onnxruntime-directml": "1.20.0"}, "12.8") is None


def test_install_script_runs_and_says_what_it_decided() -> None:
    out = subprocess.run([sys.executable, str(REPO_ROOT / "install.py"), "--dry-run"], capture_output=True, text=True, check=True)
    assert "onnxruntime" in out.stdout

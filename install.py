"""Run by ComfyUI-Manager after it installs requirements.txt: the ONNX runtime for DWPose.

requirements.txt does not list onnxruntime: pip would then install the CPU build next to an
`onnxruntime-gpu` a user already has, and the two share one import name, so the CPU build
can shadow the GPU one. This script decides instead, once, at install time:
- any onnxruntime build already installed (GPU, CPU, DirectML, OpenVINO, ROCm ...): nothing;
- PyTorch built for CUDA 12: `onnxruntime-gpu<1.27` (PyPI's builds for CUDA 12 end at 1.26);
- PyTorch built for CUDA 13: `onnxruntime-gpu>=1.27` (PyPI's builds for CUDA 13 start there);
- otherwise (CPU, Apple, AMD ...): `onnxruntime`. The pose loader's `onnx_runtime: auto` then
  runs the same files with PyTorch on whatever GPU torch has.
torch is never touched: pip gets the installed torch as a constraint. Run it by hand the
same way: `python install.py` with ComfyUI's Python; `--dry-run` prints the decision.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile

RUNTIMES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-rocm",
            "onnxruntime-silicon", "onnxruntime-qnn")  # fmt: skip
PINNED = ("torch", "torchvision", "torchaudio")


def installed(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# The first onnxruntime-gpu on PyPI built for CUDA 13 (its wheels before it need CUDA 12).
FIRST_CUDA13_ORT = "1.27"


def choose_runtime(present: dict[str, str | None], torch_cuda: str | None) -> str | None:
    """The onnxruntime requirement to install (None: one is there already)."""
    if any(present.get(name) for name in RUNTIMES):
        return None
    major = torch_cuda.split(".")[0] if torch_cuda else None
    if major == "12":
        return f"onnxruntime-gpu<{FIRST_CUDA13_ORT}"
    if major == "13":
        return f"onnxruntime-gpu>={FIRST_CUDA13_ORT}"
    return "onnxruntime"


def torch_cuda_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda if torch.cuda.is_available() else None


def main(argv: list[str]) -> int:
    package = choose_runtime({name: installed(name) for name in RUNTIMES}, torch_cuda_version())
    if package is None:
        print("comfyui-steadydancer: an onnxruntime build is installed; nothing to do")
        return 0
    print(f"comfyui-steadydancer: installing {package} for the onnx DWPose backend")
    if "--dry-run" in argv:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("".join(f"{name}=={installed(name)}\n" for name in PINNED if installed(name)))
        constraints.flush()
        return subprocess.call([sys.executable, "-m", "pip", "install", "-c", constraints.name, package])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""DWPose backends behind one interface: `load_detector(backend, model_dir)`.

"onnx" needs yolox_l.onnx + dw-ll_ucoco_384.onnx and onnxruntime or PyTorch; "mmpose" needs the
mmcv/mmdet/mmpose stack and the two .pth checkpoints. Both are imported only when loaded.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PoseFormatError
from .base import COLOUR_ORDERS, PoseDetector, check_colour_order
from .files import DWPOSE_ONNX, DWPOSE_PTH, YOLOX_ONNX, YOLOX_PTH, resolve

BACKENDS: tuple[str, ...] = ("onnx", "mmpose")

__all__ = ["BACKENDS", "COLOUR_ORDERS", "PoseDetector", "load_detector"]


def load_detector(
    backend: str,
    model_dir: str | Path,
    *,
    device: str | None = None,
    flip_test: bool = True,
    colour_order: str = "reference",
    runtime: str = "auto",
) -> PoseDetector:
    """Load the person detector + DWPose model of `backend` from model_dir.

    device: "cpu", "cuda", "cuda:N" or None (CUDA when available). flip_test: average the
    pose model over the crop and its mirror, as the reference config does (2x pose cost).
    colour_order: "reference" (the channel orders the reference pipeline hands the networks,
    what SteadyDancer's training poses came from) or "trained" (each network's own).
    runtime (onnx backend): "auto", "onnxruntime" or "torch" (the ONNX graph run with
    PyTorch operators; onnx_backend.py says which `auto` picks where).
    Raises PoseDependencyError (package to install), CheckpointNotFoundError (file to
    put where), InvalidCheckpointError (a file that is not the expected model).
    """
    check_colour_order(colour_order)
    detector = _load(backend, model_dir, device, flip_test, runtime)
    detector.colour_order = colour_order
    return detector


def _load(backend: str, model_dir: str | Path, device: str | None, flip_test: bool, runtime: str) -> PoseDetector:
    if backend == "onnx":
        from .onnx_backend import OnnxPoseDetector

        return OnnxPoseDetector(
            resolve(model_dir, YOLOX_ONNX),
            resolve(model_dir, DWPOSE_ONNX),
            device=device,
            flip_test=flip_test,
            runtime=runtime,
        )
    if backend == "mmpose":
        from .mmpose_backend import MMPoseDetector, import_stack

        import_stack()
        return MMPoseDetector(
            resolve(model_dir, YOLOX_PTH),
            resolve(model_dir, DWPOSE_PTH),
            device=device,
            flip_test=flip_test,
        )
    raise PoseFormatError(f"unknown pose backend {backend!r}: use one of {BACKENDS}")

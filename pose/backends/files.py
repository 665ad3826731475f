"""Checkpoint names, where users get them, and the errors when they are not there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointNotFoundError


@dataclass(frozen=True)
class Checkpoint:
    filename: str
    what: str
    url: str


YOLOX_PTH = Checkpoint(
    "yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth",
    "YOLOX-L person detector (mmdet)",
    "https://download.openmmlab.com/mmdetection/v2.0/yolox/yolox_l_8x8_300e_coco/"
    "yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth",
)
DWPOSE_PTH = Checkpoint(
    "dw-ll_ucoco_384.pth",
    "DWPose-L whole-body model (mmpose)",
    "https://huggingface.co/wanghaofan/dw-ll_ucoco_384/resolve/main/dw-ll_ucoco_384.pth",
)
YOLOX_ONNX = Checkpoint(
    "yolox_l.onnx",
    "YOLOX-L person detector (ONNX)",
    "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx",
)
DWPOSE_ONNX = Checkpoint(
    "dw-ll_ucoco_384.onnx",
    "DWPose-L whole-body model (ONNX)",
    "https://huggingface.co/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx",
)


def resolve(model_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """The checkpoint's path in model_dir, or CheckpointNotFoundError saying what to put where."""
    directory = Path(model_dir).expanduser()
    path = directory / checkpoint.filename
    if path.is_file():
        return path
    raise CheckpointNotFoundError(
        f"{checkpoint.what} not found: put {checkpoint.filename} into {directory} "
        f"(ComfyUI: models/dwpose/). Download: {checkpoint.url}"
    )

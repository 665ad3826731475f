"""Pose extraction and preparation for SteadyDancer (DWPose, alignment, augmentation, rendering).

Plain Python/NumPy/PyTorch; nothing here imports ComfyUI, nothing heavy happens at import:
the public names below are resolved lazily (PEP 562), so `import pose` loads no cv2,
torch, onnxruntime or mmpose.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Pose": ".types",
    "to_pose_keypoint": ".types",
    "from_pose_keypoint": ".types",
    "wholebody_to_pose": ".keypoints",
    "load_detector": ".backends",
    "PoseDetector": ".backends",
    "align_poses": ".align",
    "augment_poses": ".augment",
    "render_pose": ".render",
    "render_sequence": ".render",
    "reference_frame": ".render",
}

__all__ = [
    "Pose",
    "PoseDetector",
    "align_poses",
    "augment_poses",
    "from_pose_keypoint",
    "load_detector",
    "reference_frame",
    "render_pose",
    "render_sequence",
    "to_pose_keypoint",
    "wholebody_to_pose",
]

if TYPE_CHECKING:
    from .align import align_poses
    from .augment import augment_poses
    from .backends import PoseDetector, load_detector
    from .keypoints import wholebody_to_pose
    from .render import reference_frame, render_pose, render_sequence
    from .types import Pose, from_pose_keypoint, to_pose_keypoint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

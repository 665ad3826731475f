"""Backend selection and the messages users get when something is missing."""

from __future__ import annotations

import importlib.util

import pytest

from pose.backends import load_detector
from pose.errors import CheckpointNotFoundError, PoseDependencyError, PoseFormatError


def test_unknown_backend():
    with pytest.raises(PoseFormatError, match="onnx"):
        load_detector("tensorrt", ".")


@pytest.mark.skipif(
    importlib.util.find_spec("mmpose") is not None, reason="mmpose is installed here"
)
def test_mmpose_backend_without_the_stack_says_what_to_install(tmp_path):
    with pytest.raises(PoseDependencyError, match=r"mmcv 2\.1\.0.*README"):
        load_detector("mmpose", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_missing_checkpoint_names_file_folder_and_source(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        load_detector("onnx", tmp_path)
    message = str(info.value)
    assert (
        "yolox_l.onnx" in message
        and str(tmp_path) in message
        and "huggingface.co/yzd-v/DWPose" in message
    )


def test_import_pose_is_light():
    import subprocess
    import sys

    code = "import sys, pose; pose.Pose; print(sorted(m for m in ('cv2', 'torch', 'onnxruntime', 'mmpose') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"

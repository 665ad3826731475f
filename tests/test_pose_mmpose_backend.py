"""The mmpose backend end to end with randomly initialised YOLOX-L + DWPose-L (CPU).

Also checks the onnx backend against it: the same random networks exported to ONNX must
give the same boxes and keypoints, which pins the onnx backend's hand-written pre- and
post-processing to mmdet/mmpose's.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.mmpose, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

DETECT_RESOLUTION = 256  # small frames keep YOLOX-L/RTMPose-L on the CPU to a few seconds


class Payload:
    """An arbitrary object: a checkpoint holding one needs a full unpickle, which is refused."""


def frames(count: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = rng.integers(0, 60, (count, 256, 320, 3), dtype=np.uint8)
    out[:, 40:220, 120:200] = rng.integers(150, 255, (count, 180, 80, 3), dtype=np.uint8)
    return out


@pytest.fixture(scope="module")
def random_models():
    import torch

    from pose.backends.mmpose_backend import build_models

    torch.manual_seed(0)
    detector, pose_model = build_models(None, None, "cpu", flip_test=True)
    # Freshly initialised YOLOX heads give every anchor the same ~1% score. Make the scores
    # depend on the image (large objectness weights) with distinct maxima, every anchor a
    # person, and boxes of tens of pixels, so box selection and the crop are exercised.
    with torch.no_grad():
        for conv in detector.bbox_head.multi_level_conv_obj:
            conv.weight.mul_(3000.0)
            conv.bias.fill_(0.5)
        for conv in detector.bbox_head.multi_level_conv_cls:
            conv.bias[0] = 3.0
        for conv in detector.bbox_head.multi_level_conv_reg:
            conv.weight.mul_(1000.0)
            conv.bias[2:] = float(np.log(6.0))
    return detector, pose_model


@pytest.fixture(scope="module")
def mm_detector(random_models):
    from pose.backends.mmpose_backend import MMPoseDetector

    return MMPoseDetector.from_models(*random_models, device="cpu", flip_test=True)


def test_random_models_detect_end_to_end():
    from pose.backends.mmpose_backend import MMPoseDetector

    detector = MMPoseDetector(None, None, device="cpu", flip_test=False)
    calls = []
    poses = detector.detect(
        frames(),
        detect_resolution=DETECT_RESOLUTION,
        batch_size=2,
        progress=lambda d, t: calls.append(d),
    )
    assert len(poses) == 2 and calls == [2]
    for pose in poses:
        assert pose is None or (
            pose.body.shape == (18, 2) and (pose.width, pose.height) == (320, 256)
        )


def test_flip_pairs_match_mmpose_metadata(random_models):
    from pose.backends.geometry import wholebody_flip_indices

    _, pose_model = random_models
    np.testing.assert_array_equal(wholebody_flip_indices(), pose_model.dataset_meta["flip_indices"])


def test_onnx_export_reproduces_the_mmpose_pipeline(random_models, mm_detector, tmp_path):
    pytest.importorskip("onnxruntime")
    from pose.backends.base import validate_frames
    from pose.backends.export_onnx import export_models
    from pose.backends.geometry import resize_for_detection
    from pose.backends.onnx_backend import OnnxPoseDetector

    det_path, pose_path = export_models(*random_models, tmp_path)
    onnx = OnnxPoseDetector(det_path, pose_path, device="cpu", flip_test=True)
    images = [
        np.ascontiguousarray(resize_for_detection(f, DETECT_RESOLUTION)[..., ::-1])
        for f in validate_frames(frames())
    ]

    mm_boxes, ort_boxes = mm_detector.person_boxes(images), onnx.person_boxes(images)
    for a, b in zip(mm_boxes, ort_boxes, strict=True):
        assert len(a) > 0
        np.testing.assert_allclose(a[0], b[0], atol=0.05)  # the box the pose model uses

    mm, ort = mm_detector.estimate(images), onnx.estimate(images)
    for (mk, ms), (ok, os) in zip(mm, ort, strict=True):
        np.testing.assert_allclose(ms, os, atol=1e-3)
        close = np.linalg.norm(mk - ok, axis=1) < 1.0
        assert close.mean() > 0.97, f"only {close.mean():.1%} of keypoints agree"


def test_checkpoints_are_loaded_weights_only(random_models, tmp_path):
    import torch

    from pose.backends import load_detector
    from pose.backends.files import DWPOSE_PTH, YOLOX_PTH
    from pose.errors import InvalidCheckpointError

    detector, pose_model = random_models
    torch.save(
        {"meta": {"epoch": 300}, "state_dict": detector.state_dict()}, tmp_path / YOLOX_PTH.filename
    )
    torch.save({"state_dict": pose_model.state_dict()}, tmp_path / DWPOSE_PTH.filename)
    loaded = load_detector("mmpose", tmp_path, device="cpu")
    for name, tensor in pose_model.state_dict().items():
        assert torch.equal(loaded._pose.state_dict()[name], tensor), name
    assert torch.equal(loaded._det.bbox_head.multi_level_conv_obj[0].bias, torch.full((1,), 0.5))

    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / DWPOSE_PTH.filename)
    with pytest.raises(InvalidCheckpointError, match="weights-only"):
        load_detector("mmpose", tmp_path, device="cpu")
    torch.save({"state_dict": {"head.bogus": torch.zeros(1)}}, tmp_path / DWPOSE_PTH.filename)
    with pytest.raises(InvalidCheckpointError, match="does not fit"):
        load_detector("mmpose", tmp_path, device="cpu")

"""The onnx backend end to end on ONNX files built here (real input/output signatures)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pose_onnx_models import (  # noqa: E402
    ConstantDetector,
    ProfilePoseNet,
    RandomDetector,
    RandomPoseNet,
    cross_frame,
    export,
)

from pose.backends import geometry as g  # noqa: E402
from pose.backends import load_detector  # noqa: E402
from pose.errors import (  # noqa: E402
    CheckpointNotFoundError,
    InvalidCheckpointError,
    PoseCancelled,
    PoseFormatError,
)

# Letterbox pixels of a 512x640 (h x w) detection image are its own pixels (ratio 1).
PERSON = (200.0, 100.0, 400.0, 460.0, 0, 0.9)
WEAK_PERSON = (10.0, 10.0, 100.0, 200.0, 0, 0.4)  # score <= 0.5: dropped
CAR = (420.0, 300.0, 600.0, 500.0, 2, 0.95)  # not a person


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dwpose_onnx")
    # Fixed batch 1 like the public yolox_l.onnx; dynamic batch for the pose model.
    export(
        ConstantDetector([PERSON, WEAK_PERSON, CAR]),
        directory / "yolox_l.onnx",
        "detector",
        dynamic_batch=False,
    )
    export(ProfilePoseNet(), directory / "dw-ll_ucoco_384.onnx", "pose")
    return directory


@pytest.fixture(scope="module")
def detector(model_dir):
    return load_detector("onnx", model_dir, device="cpu")


def expected_tolerance(box) -> float:
    """One crop pixel in image pixels (SimCC quantisation + bilinear spread)."""
    _, scale = g.box_to_centre_scale(np.array(box[:4]))
    return 1.5 * float(scale[0]) / g.POSE_INPUT_SIZE[0]


def test_person_box_is_the_reference_selection(detector):
    boxes = detector.person_boxes([np.zeros((512, 640, 3), np.uint8)])
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0], [PERSON[:4]], atol=1e-3)


def test_keypoints_land_on_the_cross_in_normalised_coordinates(detector):
    frame = cross_frame(512, 640, x=300, y=250)
    (pose,) = detector.detect(frame[None], detect_resolution=512)
    assert pose is not None and (pose.width, pose.height) == (640, 512)
    tol = expected_tolerance(PERSON)
    visible = pose.body_present
    assert visible.all()
    np.testing.assert_allclose(pose.body[:, 0] * 640, 300, atol=tol)
    np.testing.assert_allclose(pose.body[:, 1] * 512, 250, atol=tol)
    np.testing.assert_allclose(pose.hands[..., 0] * 640, 300, atol=tol)
    np.testing.assert_allclose(pose.face[:, 1] * 512, 250, atol=tol)
    assert pose.feet is not None and pose.body_scores[1] == 1.0


def test_resize_to_detect_resolution_keeps_normalised_positions(detector):
    # 256x320 is upscaled to 512x640 (cubic) before detection: same normalised result.
    frame = cross_frame(256, 320, x=150, y=125)
    (pose,) = detector.detect(frame[None], detect_resolution=512)
    assert (pose.width, pose.height) == (320, 256)
    tol = expected_tolerance(PERSON) / 2 + 1.0
    np.testing.assert_allclose(pose.body[0] * [320, 256], [150, 125], atol=tol)


def test_flip_test_agrees_with_a_single_pass_for_a_mirror_equivariant_net(model_dir):
    frame = cross_frame(512, 640, x=321, y=200)
    single = load_detector("onnx", model_dir, device="cpu", flip_test=False).detect(
        frame[None], detect_resolution=512
    )
    flipped = load_detector("onnx", model_dir, device="cpu", flip_test=True).detect(
        frame[None], detect_resolution=512
    )
    np.testing.assert_allclose(single[0].body, flipped[0].body)


def test_no_person_box_uses_the_whole_image_and_an_empty_result_is_none(tmp_path):
    export(ConstantDetector([CAR]), tmp_path / "yolox_l.onnx", "detector")
    export(ProfilePoseNet(), tmp_path / "dw-ll_ucoco_384.onnx", "pose")
    detector = load_detector("onnx", tmp_path, device="cpu")
    frames = np.stack([cross_frame(512, 640, x=600, y=40), np.zeros((512, 640, 3), np.uint8)])
    poses = detector.detect(frames, detect_resolution=512)
    # The cross is outside every box; the whole-image box still finds it.
    _, scale = g.box_to_centre_scale(np.array([0, 0, 640, 512]))
    np.testing.assert_allclose(poses[0].body[0] * [640, 512], [600, 40], atol=1.5 * scale[0] / 288)
    assert poses[1] is None  # all-black: every SimCC maximum is <= 0


def test_batches_progress_and_cancellation(detector):
    frames = np.stack([cross_frame(512, 640, x=250 + 10 * i, y=200) for i in range(5)])
    calls = []
    poses = detector.detect(
        frames, detect_resolution=512, batch_size=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]
    xs = [p.body[0, 0] * 640 for p in poses]
    assert np.all(np.diff(xs) > 5)  # each frame's own keypoints, in order
    checks = iter([False, True])
    with pytest.raises(PoseCancelled, match="after 2 of 5"):
        detector.detect(
            frames, detect_resolution=512, batch_size=2, should_cancel=lambda: next(checks)
        )


class SlicedFrames:
    """A FrameSource over an array that records the slices asked for (and is no array itself)."""

    dtype = np.uint8

    def __init__(self, frames: np.ndarray) -> None:
        self._frames, self.shape, self.slices = frames, frames.shape, []

    def __getitem__(self, index: slice) -> np.ndarray:
        self.slices.append((index.start, index.stop))
        return self._frames[index]


def test_a_frame_source_is_read_one_batch_at_a_time_with_the_same_result(detector):
    frames = np.stack([cross_frame(512, 640, x=250 + 10 * i, y=200) for i in range(5)])
    source = SlicedFrames(frames)
    lazily = detector.detect(source, detect_resolution=512, batch_size=2)
    assert source.slices == [(0, 2), (2, 4), (4, 6)]
    eagerly = detector.detect(frames, detect_resolution=512, batch_size=2)
    for a, b in zip(lazily, eagerly, strict=True):
        np.testing.assert_array_equal(a.body, b.body)
    with pytest.raises(PoseFormatError, match="uint8 RGB"):
        bad = SlicedFrames(frames.astype(np.float32))
        bad.dtype = np.float32
        detector.detect(bad)


def test_random_networks_give_well_formed_poses(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    export(RandomDetector(), tmp_path / "yolox_l.onnx", "detector")
    export(RandomPoseNet(), tmp_path / "dw-ll_ucoco_384.onnx", "pose")
    detector = load_detector("onnx", tmp_path, device="cpu")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 120, 160, 3), dtype=np.uint8)
    poses = detector.detect(frames, detect_resolution=128, batch_size=2)
    assert len(poses) == 3
    for pose in poses:
        assert pose is None or (
            pose.body.shape == (18, 2) and (pose.width, pose.height) == (160, 120)
        )


def test_missing_and_wrong_files(tmp_path, model_dir):
    with pytest.raises(CheckpointNotFoundError, match=r"yolox_l\.onnx.*models/dwpose"):
        load_detector("onnx", tmp_path)
    (tmp_path / "yolox_l.onnx").write_bytes((model_dir / "dw-ll_ucoco_384.onnx").read_bytes())
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes(
        (model_dir / "dw-ll_ucoco_384.onnx").read_bytes()
    )
    with pytest.raises(InvalidCheckpointError, match="not a YOLOX detector"):
        load_detector("onnx", tmp_path, device="cpu")
    (tmp_path / "yolox_l.onnx").write_bytes(b"not onnx")
    with pytest.raises(InvalidCheckpointError, match="could not be loaded"):
        load_detector("onnx", tmp_path, device="cpu")


def test_letterbox_scale_maps_boxes_back_to_the_detection_image(tmp_path):
    # A 384x768 detection image is letterboxed at 640/768: 640x320 (w x h), 1.2 px per box px.
    export(
        ConstantDetector([(100.0, 50.0, 300.0, 300.0, 0, 0.8)]),
        tmp_path / "yolox_l.onnx",
        "detector",
    )
    export(ProfilePoseNet(), tmp_path / "dw-ll_ucoco_384.onnx", "pose")
    detector = load_detector("onnx", tmp_path, device="cpu", flip_test=False)
    (boxes,) = detector.person_boxes([np.zeros((384, 768, 3), np.uint8)])
    np.testing.assert_allclose(boxes, [[120, 60, 360, 360]], atol=1e-3)


def test_bench_cli_reports_frames_per_second(model_dir, capsys):
    import json

    from benchmarks.pose_extract import main

    argv = [
        "--backend",
        "onnx",
        "--model-dir",
        str(model_dir),
        "--frames",
        "2",
        "--batch-size",
        "1",
    ]
    argv += [
        "--height",
        "64",
        "--width",
        "80",
        "--detect-resolution",
        "64",
        "--device",
        "cpu",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["backend"] == "onnx" and result["frames"] == 2 and result["frames_per_s"] > 0

"""133 COCO-WholeBody points -> OpenPose layout, and the POSE_KEYPOINT JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pose_testutils import make_pose

from pose.errors import PoseFormatError
from pose.keypoints import BODY_FROM_COCO, wholebody_to_pose
from pose.types import MISSING, Pose, from_pose_keypoint, to_pose_keypoint


def wholebody(width: float = 200.0, height: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """Point i at pixel (i + 1, 2 * (i + 1)) % size, all scores 0.9."""
    index = np.arange(133, dtype=np.float64) + 1
    return np.stack([index % width, (2 * index) % height], axis=1), np.full(133, 0.9)


def test_body_order_neck_and_normalisation():
    kp, sc = wholebody()
    pose = wholebody_to_pose(kp, sc, 200, 100)
    for body_index, coco in enumerate(BODY_FROM_COCO):
        if coco >= 0:
            np.testing.assert_allclose(pose.body[body_index], kp[coco] / [200, 100])
    np.testing.assert_allclose(pose.body[1], (kp[5] + kp[6]) / 2 / [200, 100])
    assert pose.body_scores[1] == 1.0
    np.testing.assert_allclose(pose.feet, kp[17:23] / [200, 100])
    np.testing.assert_allclose(pose.face, kp[23:91] / [200, 100])
    np.testing.assert_allclose(pose.hands[0], kp[91:112] / [200, 100])  # 133-layout left hand
    np.testing.assert_allclose(pose.hands[1], kp[112:133] / [200, 100])
    assert pose.body[14].tolist() == (kp[2] / [200, 100]).tolist()  # r-eye is COCO 2


def test_thresholds_and_missing_markers():
    kp, sc = wholebody()
    sc[0] = 0.34  # nose below 0.35 -> missing
    sc[5] = 0.31  # l-shoulder: kept as a point? no, < 0.35; neck still visible (> 0.3)
    sc[100] = 0.1  # a left-hand point
    sc[30] = 0.35  # a face point exactly at the threshold is kept (masked at < 0.35)
    pose = wholebody_to_pose(kp, sc, 200, 100)
    assert pose.body[0].tolist() == [MISSING, MISSING]
    assert pose.body[5].tolist() == [MISSING, MISSING]
    assert pose.body_present[1] and pose.body_scores[1] == 1.0
    assert pose.hands[0, 100 - 91].tolist() == [MISSING, MISSING]
    assert pose.face[30 - 23].tolist() != [MISSING, MISSING]
    sc[6] = 0.3  # both shoulders needed > 0.3 for the neck
    pose = wholebody_to_pose(kp, sc, 200, 100)
    assert not pose.body_present[1] and pose.body_scores[1] == 0.0


def test_source_size_is_recorded_and_detection_size_normalises():
    kp, sc = wholebody()
    pose = wholebody_to_pose(kp, sc, 1920, 1080, detect_size=(200, 100))
    assert (pose.width, pose.height) == (1920, 1080)
    np.testing.assert_allclose(pose.body[0], kp[0] / [200, 100])


def test_bad_shapes():
    with pytest.raises(PoseFormatError, match="133"):
        wholebody_to_pose(np.zeros((17, 2)), np.zeros(17), 10, 10)
    with pytest.raises(PoseFormatError, match="body"):
        Pose(
            body=np.zeros((17, 2)), body_scores=np.zeros(18), hands=np.zeros((2, 21, 2)),
            hand_scores=np.zeros((2, 21)), face=np.zeros((68, 2)), face_scores=np.zeros(68),
            width=1, height=1,
        )  # fmt: skip


def test_json_round_trip_matches_controlnet_aux_layout():
    pose = make_pose(width=640, height=480)
    pose.body[3] = MISSING
    frames = to_pose_keypoint([pose, None])
    text = json.dumps(frames)  # plain JSON types only
    frames = json.loads(text)
    person = frames[0]["people"][0]
    assert frames[0]["canvas_width"] == 640 and frames[0]["canvas_height"] == 480
    assert len(person["pose_keypoints_2d"]) == 18 * 3
    assert person["pose_keypoints_2d"][9:12] == [0.0, 0.0, 0.0]
    assert person["pose_keypoints_2d"][2] == 1.0
    assert len(person["hand_left_keypoints_2d"]) == 63 and len(person["face_keypoints_2d"]) == 204
    assert frames[1] == {"people": [], "canvas_width": 640, "canvas_height": 480}
    back = from_pose_keypoint(frames)
    assert back[1] is None
    np.testing.assert_allclose(back[0].body, pose.body)
    np.testing.assert_allclose(back[0].hands, pose.hands)
    np.testing.assert_allclose(back[0].face, pose.face)
    assert back[0].body_scores[3] == 0.0 and back[0].body_scores[0] == 1.0


def test_json_pixel_coordinates_are_normalised():
    frame = {
        "canvas_width": 200,
        "canvas_height": 100,
        "people": [{"pose_keypoints_2d": [100.0, 50.0, 0.8] + [0.0, 0.0, 0.0] * 17}],
    }
    pose = from_pose_keypoint([frame])[0]
    np.testing.assert_allclose(pose.body[0], [0.5, 0.5])
    assert pose.body_scores[0] == pytest.approx(0.8)
    assert not pose.body_present[1:].any() and pose.hands.min() == MISSING
    with pytest.raises(PoseFormatError, match="18 points"):
        from_pose_keypoint(
            [{"canvas_width": 1, "canvas_height": 1, "people": [{"pose_keypoints_2d": [0, 0, 1]}]}]
        )
    with pytest.raises(PoseFormatError, match="canvas_width"):
        from_pose_keypoint([{"people": []}])


def test_json_points_slightly_outside_the_image_stay_normalised():
    pose = make_pose(width=64, height=48)
    pose.body[10] = (0.5, 1.08)  # an ankle predicted just below the frame
    back = from_pose_keypoint(to_pose_keypoint([pose]))[0]
    np.testing.assert_allclose(back.body, pose.body)

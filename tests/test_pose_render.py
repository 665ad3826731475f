"""OpenPose-style rendering: exact pixels of the reference drawing (docs/REFERENCE.md, "Drawing")."""

from __future__ import annotations

import numpy as np
import pytest
from pose_testutils import make_pose

from pose.errors import PoseFormatError
from pose.render import HAND_EDGE_COLOURS, hsv_to_rgb, render_pose, render_sequence
from pose.types import Pose


def only(points: dict[int, tuple[float, float]]) -> Pose:
    pose = Pose.empty(100, 100)
    for index, xy in points.items():
        pose.body[index] = xy
        pose.body_scores[index] = 0.9
    return pose


def test_joint_colour_and_radius():
    img = render_pose(only({0: (0.5, 0.5)}), 100, 100)
    # Joint 0 palette (255, 0, 0) is written in BGR order; the saved RGB frame shows (0, 0, 255).
    assert tuple(img[50, 50]) == (0, 0, 255)
    ys, xs = np.nonzero(img.any(axis=-1))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (46, 54, 46, 54)  # radius 4
    assert tuple(img[50, 54]) == (0, 0, 255) and not img[50, 55].any()
    # Neck (joint 1): palette (255, 85, 0) -> RGB (0, 85, 255).
    img = render_pose(only({1: (0.5, 0.5)}), 100, 100)
    assert tuple(img[50, 50]) == (0, 85, 255)


def test_limb_is_a_dimmed_ellipse_with_half_width_4():
    # Limb 0 joins body points 1 (neck) and 2 (r-shoulder): 40 px long, horizontal.
    img = render_pose(only({1: (0.3, 0.5), 2: (0.7, 0.5)}), 100, 100)
    # Limb 0 palette (255, 0, 0) * 0.6 = 153, reversed to RGB: (0, 0, 153).
    assert tuple(img[50, 50]) == (0, 0, 153)
    assert tuple(img[54, 50]) == (0, 0, 153) and not img[55, 50].any()
    assert tuple(img[46, 50]) == (0, 0, 153) and not img[45, 50].any()
    # The joints on top are not dimmed: neck (0, 85, 255), r-shoulder (0, 170, 255).
    assert tuple(img[50, 30]) == (0, 85, 255)
    assert tuple(img[50, 70]) == (0, 170, 255)


def test_controlnet_colouring_is_the_palette_as_written():
    pose = only({1: (0.3, 0.5), 2: (0.7, 0.5)})
    img = render_pose(pose, 100, 100, colours="controlnet")
    assert tuple(img[50, 50]) == (153, 0, 0)
    assert tuple(img[50, 30]) == (255, 85, 0)
    np.testing.assert_array_equal(img, render_pose(pose, 100, 100)[..., ::-1])


def test_hands_joints_edges_and_the_eps_rule():
    pose = Pose.empty(100, 100)
    pose.hands[0, 0] = (0.2, 0.5)  # wrist
    pose.hands[0, 1] = (0.6, 0.5)  # first thumb joint: edge 0 between them
    pose.hands[1, 0] = (0.005, 0.5)  # int(0.5 px) = 0 -> not drawn
    img = render_pose(pose, 100, 100)
    assert tuple(img[50, 20]) == (255, 0, 0)  # hand joint (0, 0, 255) as written -> RGB red
    assert tuple(img[50, 60]) == (255, 0, 0)
    # Edge 0 colour is HSV(0, 1, 1) = (255, 0, 0) as written -> RGB (0, 0, 255), width 2, undimmed.
    assert tuple(img[50, 40]) == (0, 0, 255)
    column = img[:, 40].any(axis=-1)
    assert 2 <= column.sum() <= 3
    assert not img[45:56, 0:5].any()


def test_hand_edge_colours_follow_matplotlib_hsv():
    assert hsv_to_rgb(0.0) == (1.0, 0.0, 0.0)
    assert hsv_to_rgb(0.5) == (0.0, 1.0, 1.0)
    assert HAND_EDGE_COLOURS[1] == pytest.approx((255.0, 76.5, 0.0))
    assert HAND_EDGE_COLOURS[10] == pytest.approx((0.0, 255.0, 255.0))


def test_missing_points_and_faces():
    pose = make_pose()
    pose.body[:] = -1
    pose.hands[:] = -1
    assert not render_pose(pose, 64, 64).any()  # face is not drawn by default
    face = render_pose(pose, 64, 64, draw_face=True)
    assert set(map(tuple, face.reshape(-1, 3))) == {(0, 0, 0), (255, 255, 255)}
    assert not render_pose(None, 8, 8).any()


def test_sequence_is_drawn_at_twice_the_size_and_resized():
    poses = [make_pose(), None]
    seen = []
    frames = render_sequence(poses, 48, 64, progress=lambda done, total: seen.append((done, total)))
    assert frames.shape == (2, 48, 64, 3) and frames.dtype == np.uint8
    assert frames[0].any() and not frames[1].any()
    assert seen == [(1, 2), (2, 2)]
    big = render_pose(poses[0], 96, 128)
    import cv2

    np.testing.assert_array_equal(
        frames[0], cv2.resize(big, (64, 48), interpolation=cv2.INTER_CUBIC)
    )
    exact = render_sequence(poses, 48, 64, supersample=1)
    np.testing.assert_array_equal(exact[0], render_pose(poses[0], 48, 64))


def test_bad_render_options():
    with pytest.raises(PoseFormatError):
        render_pose(make_pose(), 10, 10, colours="rainbow")
    with pytest.raises(PoseFormatError):
        render_pose(make_pose(), 0, 10)


def test_non_finite_and_absurd_coordinates_are_skipped_not_fatal():
    pose = make_pose()
    pose.hands[0, 3] = (np.nan, 0.5)
    pose.hands[1, 4] = (np.inf, 0.5)
    pose.body[4] = (1e12, 0.5)  # r-wrist thrown away by an absurd scale
    img = render_pose(pose, 64, 64)
    assert img.any()
    clean = make_pose()
    clean.hands[0, 3] = clean.hands[1, 4] = clean.body[4] = -1
    np.testing.assert_array_equal(img, render_pose(clean, 64, 64))

"""Augmented negative poses (docs/REFERENCE.md, "Augmentation")."""

from __future__ import annotations

import numpy as np
import pytest
from pose_testutils import make_pose

from pose.augment import augment_pose, augment_poses, draw_factors
from pose.errors import PoseFormatError
from pose.types import MISSING, Pose


def test_hand_computed_scale_and_aspect_about_the_neck():
    pose = make_pose()
    out = augment_pose(pose, scale=1.2, aspect=0.5)
    neck = pose.body[1]
    factor = np.array([0.6, 1.2])
    np.testing.assert_allclose(out.body, neck + (pose.body - neck) * factor, atol=1e-12)
    np.testing.assert_allclose(out.hands, neck + (pose.hands - neck) * factor, atol=1e-12)
    # The face is not scaled, only shifted by the same correction as the rest (the
    # reference's arithmetic: it scales about the origin, then moves the neck back).
    np.testing.assert_allclose(out.face, pose.face + (neck - neck * factor), atol=1e-12)
    np.testing.assert_array_equal(out.body[1], neck)


def test_seeded_and_per_frame():
    poses = [make_pose() for _ in range(6)]
    a = augment_poses(poses, seed=7)
    b = augment_poses(poses, seed=7)
    c = augment_poses(poses, seed=8)
    assert all(x.allclose(y) for x, y in zip(a, b, strict=True))
    assert not all(x.allclose(y) for x, y in zip(a, c, strict=True))
    # Frames differ from each other (independent draws), inputs are untouched.
    assert not a[0].allclose(a[1])
    assert poses[0].allclose(make_pose())
    # A longer sequence keeps the draws of the first frames.
    longer = augment_poses([*poses, make_pose()], seed=7)
    assert all(x.allclose(y) for x, y in zip(a, longer[:6], strict=True))


def test_draws_are_in_range():
    factors = draw_factors(2000, seed=0)
    assert factors[:, 0].min() >= 0.7 and factors[:, 0].max() <= 1.3
    assert factors[:, 1].min() >= 0.6 and factors[:, 1].max() <= 1.4
    assert factors[:, 0].max() - factors[:, 0].min() > 0.5  # spread over the range
    with pytest.raises(PoseFormatError):
        draw_factors(1, 0, scale_range=(1.3, 0.7))


def test_missing_points_and_neckless_frames():
    pose = make_pose()
    pose.hands[1, 3] = MISSING
    out = augment_poses([pose, Pose.empty(100, 100)], seed=3)
    np.testing.assert_array_equal(out[0].hands[1, 3], [MISSING, MISSING])
    assert out[1].is_empty

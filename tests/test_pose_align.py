"""Alignment of driving poses to the reference person (docs/REFERENCE.md, "Alignment")."""

from __future__ import annotations

import numpy as np
import pytest
from pose_testutils import STANDING, make_pose

from pose.align import SCALE_NAMES, align_pose, align_poses, compute_scales, neck_shift
from pose.errors import MissingPersonError, PoseFormatError
from pose.types import MISSING, Pose

# Pivots are rounded to float32 as cv2.getRotationMatrix2D does in the reference.
TOL = 1e-6


def transformed(pose: Pose, scale: float, shift: tuple[float, float]) -> Pose:
    """The same person, uniformly scaled about the origin and moved (same image size)."""
    out = pose.copy()
    for name in ("body", "hands", "face"):
        points = getattr(out, name)
        setattr(out, name, points * scale + np.array(shift))
    return out


def test_uniformly_scaled_driving_person_is_mapped_back_onto_the_reference():
    reference = make_pose()
    driving = [transformed(reference, 0.5, (0.1, 0.2)), transformed(reference, 0.5, (0.15, 0.25))]
    aligned = align_poses(reference, driving)
    scales = compute_scales(reference, driving[0])
    assert scales == pytest.approx(dict.fromkeys(SCALE_NAMES, 2.0))
    np.testing.assert_allclose(aligned[0].body, reference.body, atol=TOL)
    np.testing.assert_allclose(aligned[0].hands, reference.hands, atol=TOL)
    # The second frame's neck moved by (0.05, 0.05): the neck is the root of every limb
    # scaling and the translation is fixed by the first frame, so everything moves by that.
    np.testing.assert_allclose(aligned[1].body - aligned[0].body, np.full((18, 2), 0.05), atol=TOL)


def test_only_the_upper_arm_scale_changes_the_elbow_and_its_children_follow():
    reference = make_pose()
    body = STANDING.copy()
    # Driving upper arms half as long; the rest of each arm keeps its offsets.
    body[3] = body[2] + (body[3] - body[2]) / 2
    body[4] = body[3] + (STANDING[4] - STANDING[3])
    body[6] = body[5] + (body[6] - body[5]) / 2
    body[7] = body[6] + (STANDING[7] - STANDING[6])
    driving = make_pose(body)
    scales = compute_scales(reference, driving)
    assert scales["arm_upper"] == pytest.approx(2.0)
    assert scales["arm_lower"] == pytest.approx(1.0)
    assert scales["hand"] == pytest.approx(1.5)
    assert scales["neck"] == pytest.approx(1.0)
    out = align_poses(reference, [driving])[0]
    np.testing.assert_allclose(out.body[3], STANDING[3], atol=TOL)  # elbow back at 0.12 below
    np.testing.assert_allclose(out.body[4], STANDING[4], atol=TOL)  # wrist follows
    # Hand points: placed at the new wrist with their offsets, scaled 1.5 about the wrist.
    expected = STANDING[4] + 1.5 * (driving.hands[1] - driving.body[4])
    np.testing.assert_allclose(out.hands[1], expected, atol=TOL)


def test_pivot_order_face_scales_about_the_moved_nose():
    reference = make_pose()
    body = STANDING.copy()
    body[0] = body[1] + (body[0] - body[1]) * 0.5  # neck half as long
    for i in (14, 15, 16, 17):  # face points keep their offset to the nose
        body[i] = body[0] + (STANDING[i] - STANDING[0])
    driving = make_pose(body)
    s = compute_scales(reference, driving)
    assert s["neck"] == pytest.approx(2.0)
    assert s["face_left"] == pytest.approx(1.0) and s["face_right"] == pytest.approx(1.0)
    out = align_poses(reference, [driving])[0]
    np.testing.assert_allclose(
        out.body[[0, 14, 15, 16, 17]], STANDING[[0, 14, 15, 16, 17]], atol=TOL
    )


def test_isotropic_frame_uses_each_images_aspect_ratio():
    # Reference image 200x100: x is stretched by 2 in the isotropic frame.
    reference = make_pose(width=200, height=100)
    # Driving 100x100 with x already halved, i.e. the same person in isotropic units.
    driving = make_pose(width=100, height=100)
    s = compute_scales(reference, driving)
    # Shoulders are horizontal: ref |2-5| = 0.2 * 2 = 0.4, driving 0.2 -> 2.
    assert s["shoulder"] == pytest.approx(2.0)
    # Neck is vertical: same length in both.
    assert s["neck"] == pytest.approx(1.0)
    shift = neck_shift(reference, driving)
    np.testing.assert_allclose(shift, [0.5 * 2 - 0.5, 0.0])
    out = align_pose(driving, reference, s, shift)
    assert (out.width, out.height) == (200, 100)
    # The neck lands on the reference's neck in reference-normalised coordinates.
    np.testing.assert_allclose(out.body[1], reference.body[1], atol=TOL)
    # Shoulders: isotropic distance 0.4 about the neck -> 0.2 in reference-normalised x.
    np.testing.assert_allclose(out.body[2], [0.4, 0.3], atol=TOL)


def test_missing_and_nan_points_stay_missing_after_alignment():
    reference = make_pose()
    frame = make_pose()
    frame.body[9] = MISSING  # r-knee lost
    frame.hands[0, 5] = [np.nan, np.nan]
    aligned = align_poses(reference, [make_pose(), frame])[1]
    np.testing.assert_array_equal(aligned.body[9], [MISSING, MISSING])
    np.testing.assert_array_equal(aligned.hands[0, 5], [MISSING, MISSING])
    assert not aligned.body_present[9]
    # The ankle below the lost knee is still placed from its own offsets.
    assert aligned.body_present[10]


def test_nan_scale_becomes_one_and_infinite_scale_the_mean_of_finite_ones():
    reference = make_pose()
    first = make_pose()
    # Shoulders missing in both poses: 0/0 -> NaN -> 1.
    reference.body[[2, 5]] = MISSING
    first.body[[2, 5]] = MISSING
    # A zero-length neck in the first frame (nose on the neck): ref/0 -> inf.
    first.body[0] = first.body[1]
    s = compute_scales(reference, first)
    assert s["shoulder"] == 1.0
    finite = [v for k, v in s.items() if k != "neck"]
    assert np.isfinite(s["neck"])
    assert s["neck"] == pytest.approx(sum(finite) / len(finite))


def test_infinite_scale_is_replaced_and_points_survive():
    # The documented difference from the reference: its infinity would erase the nose.
    reference = make_pose()
    first = make_pose()
    first.body[0] = first.body[1]
    out = align_poses(reference, [first])[0]
    assert out.body_present[0] and np.isfinite(out.body).all()


def test_translation_moves_the_first_frames_neck_onto_the_reference_neck_and_keeps_markers():
    reference = make_pose()
    driving = transformed(make_pose(), 1.0, (0.2, -0.1))
    driving.face[3] = MISSING
    out = align_poses(reference, [driving])[0]
    np.testing.assert_allclose(out.body, reference.body, atol=TOL)
    np.testing.assert_array_equal(out.face[3], [MISSING, MISSING])


def test_leading_frames_are_skipped_and_the_first_used_frame_defines_the_scales():
    reference = make_pose()
    driving = [None, transformed(reference, 0.8, (0, 0)), transformed(reference, 0.5, (0.1, 0.1))]
    out = align_poses(reference, driving, align_frame=2)
    assert len(out) == 1
    np.testing.assert_allclose(out[0].body, reference.body, atol=TOL)


def test_missing_person_errors_say_which_image():
    with pytest.raises(MissingPersonError, match="reference image"):
        align_poses(None, [make_pose()])
    with pytest.raises(MissingPersonError, match=r"first used driving frame \(index 1\)"):
        align_poses(make_pose(), [make_pose(), Pose.empty(100, 100)], align_frame=1)
    no_neck = make_pose()
    no_neck.body[1] = MISSING
    with pytest.raises(MissingPersonError, match="neck"):
        align_poses(no_neck, [make_pose()])


def test_bad_options_are_rejected():
    with pytest.raises(PoseFormatError, match="missing"):
        align_poses(make_pose(), [make_pose()], missing="skip")
    with pytest.raises(PoseFormatError, match="align_frame"):
        align_poses(make_pose(), [make_pose()], align_frame=1)


@pytest.mark.parametrize("policy", ["hold", "interpolate", "empty"])
def test_missing_person_policies(policy):
    reference = make_pose()
    a = transformed(reference, 1.0, (0.0, 0.0))
    b = transformed(reference, 1.0, (0.3, 0.0))
    out = align_poses(reference, [a, None, None, b, None], missing=policy)
    assert len(out) == 5
    if policy == "empty":
        assert out[1].is_empty and out[2].is_empty and out[4].is_empty
    elif policy == "hold":
        assert out[1].allclose(out[0]) and out[2].allclose(out[0]) and out[4].allclose(out[3])
    else:
        np.testing.assert_allclose(out[1].body[:, 0], out[0].body[:, 0] + 0.1, atol=TOL)
        np.testing.assert_allclose(out[2].body[:, 0], out[0].body[:, 0] + 0.2, atol=TOL)
        assert out[4].allclose(out[3])  # nothing after: hold

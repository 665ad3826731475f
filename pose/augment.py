"""Augmented poses for the pose-guidance negative condition (docs/REFERENCE.md,
"Augmentation").

Each frame gets its own scale s ~ U(0.7, 1.3) and aspect a ~ U(0.6, 1.4): x of the body
and hands is multiplied by a, body and hands by s, then body, hands and face are moved so
the neck returns to where it was (the face is only moved, not scaled, as in the
reference). Work is done in the pose's normalised coordinates, like the reference.

The draws come from numpy's PCG64 seeded with `seed`, two uniforms per frame in frame
order, so frame i gets the same augmentation whatever the sequence length. Missing points
stay missing; a frame without a neck (nothing to anchor the move to) is left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import PoseFormatError
from .types import MISSING, Pose, missing_mask

SCALE_RANGE = (0.7, 1.3)
ASPECT_RANGE = (0.6, 1.4)


def draw_factors(
    count: int,
    seed: int,
    *,
    scale_range: tuple[float, float] = SCALE_RANGE,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> np.ndarray:
    """[count, 2] (scale, aspect) per frame, reproducible from `seed`."""
    for name, (low, high) in (("scale_range", scale_range), ("aspect_range", aspect_range)):
        if not 0 < low <= high:
            raise PoseFormatError(
                f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}"
            )
    u = np.random.default_rng(seed).random((count, 2))
    lows = np.array([scale_range[0], aspect_range[0]])
    highs = np.array([scale_range[1], aspect_range[1]])
    return lows + (highs - lows) * u


def augment_pose(pose: Pose, scale: float, aspect: float) -> Pose:
    """One frame: stretch x by `aspect`, scale by `scale`, keep the neck in place."""
    if not pose.body_present[1]:
        return pose.copy()
    factor = np.array([aspect * scale, scale])
    neck = pose.body[1]
    shift = neck - neck * factor

    def move(points: np.ndarray | None, scaled: bool) -> np.ndarray | None:
        if points is None:
            return None
        out = (points * factor if scaled else points) + shift
        out[missing_mask(points)] = MISSING
        return out

    return Pose(
        body=move(pose.body, True),
        body_scores=pose.body_scores,
        hands=move(pose.hands, True),
        hand_scores=pose.hand_scores,
        face=move(pose.face, False),
        face_scores=pose.face_scores,
        feet=move(pose.feet, True),
        feet_scores=pose.feet_scores,
        width=pose.width,
        height=pose.height,
    )


def augment_poses(
    poses: Sequence[Pose],
    seed: int,
    *,
    scale_range: tuple[float, float] = SCALE_RANGE,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> list[Pose]:
    """The negative-condition copy of an (aligned) pose sequence; inputs are not modified."""
    factors = draw_factors(len(poses), seed, scale_range=scale_range, aspect_range=aspect_range)
    return [
        augment_pose(pose, float(s), float(a)) for pose, (s, a) in zip(poses, factors, strict=True)
    ]

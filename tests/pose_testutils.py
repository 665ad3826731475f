"""Synthetic skeletons for the pose tests (no detector needed)."""

from __future__ import annotations

import numpy as np

from pose.types import MISSING, Pose

# A standing person in normalised coordinates of a square image, OpenPose body order.
STANDING = np.array(
    [
        [0.50, 0.20],  # 0 nose
        [0.50, 0.30],  # 1 neck
        [0.40, 0.30],  # 2 r-shoulder
        [0.40, 0.42],  # 3 r-elbow
        [0.40, 0.52],  # 4 r-wrist
        [0.60, 0.30],  # 5 l-shoulder
        [0.60, 0.42],  # 6 l-elbow
        [0.60, 0.52],  # 7 l-wrist
        [0.45, 0.55],  # 8 r-hip
        [0.45, 0.70],  # 9 r-knee
        [0.45, 0.85],  # 10 r-ankle
        [0.55, 0.55],  # 11 l-hip
        [0.55, 0.70],  # 12 l-knee
        [0.55, 0.85],  # 13 l-ankle
        [0.48, 0.18],  # 14 r-eye
        [0.52, 0.18],  # 15 l-eye
        [0.46, 0.19],  # 16 r-ear
        [0.54, 0.19],  # 17 l-ear
    ]
)


def hand_at(wrist: np.ndarray, spread: float = 0.01) -> np.ndarray:
    """21 hand points fanned out below a wrist."""
    points = [wrist]
    for finger in range(5):
        for joint in range(1, 5):
            points.append(wrist + np.array([(finger - 2) * spread, joint * spread]))
    return np.array(points)


def make_pose(
    body: np.ndarray | None = None, width: int = 100, height: int = 100, *, hands: bool = True
) -> Pose:
    body = STANDING.copy() if body is None else np.asarray(body, dtype=np.float64).copy()
    hand_points = (
        np.stack([hand_at(body[7]), hand_at(body[4])]) if hands else np.full((2, 21, 2), MISSING)
    )
    face = np.tile(body[0], (68, 1)) + np.linspace(-0.02, 0.02, 68)[:, None]
    return Pose(
        body=body,
        body_scores=np.where((body == MISSING).any(axis=1), 0.0, 0.9),
        hands=hand_points,
        hand_scores=np.full((2, 21), 0.9),
        face=face,
        face_scores=np.full(68, 0.9),
        width=width,
        height=height,
    )

"""COCO-WholeBody (133 points) -> the OpenPose layout (docs/REFERENCE.md, "Keypoints").

The reference inserts a neck after the 17 COCO body points, reorders the body to OpenPose
order, normalises by the detection image size and replaces every point whose score is
< 0.35 by (-1, -1). The neck's score is 1 when both shoulders score > 0.3, else 0 (the
reference writes that boolean into the score slot).
"""

from __future__ import annotations

import numpy as np

from .errors import PoseFormatError
from .types import MISSING, Pose

NUM_WHOLEBODY = 133
SCORE_THRESHOLD = 0.35
NECK_SHOULDER_THRESHOLD = 0.3
NECK = -1  # marks the synthetic neck in BODY_FROM_COCO
#: COCO index of each OpenPose body point (the neck is the mean of the shoulders 5 and 6).
BODY_FROM_COCO = (0, NECK, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
FEET = slice(17, 23)
FACE = slice(23, 91)
LEFT_HAND = slice(91, 112)
RIGHT_HAND = slice(112, 133)


def wholebody_to_pose(
    keypoints: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    *,
    detect_size: tuple[int, int] | None = None,
    threshold: float = SCORE_THRESHOLD,
) -> Pose:
    """One person's 133 keypoints (pixels of the detection image) and scores -> Pose.

    width/height: the source image the Pose records (its aspect ratio drives the
    alignment, as the reference uses the video's own W/H); detect_size: (w, h) of the image
    the keypoints are in pixels of, which normalises them (default: width, height).
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if keypoints.shape != (NUM_WHOLEBODY, 2) or scores.shape != (NUM_WHOLEBODY,):
        raise PoseFormatError(
            f"expected 133 whole-body keypoints [133, 2] and scores [133], got "
            f"{keypoints.shape} and {scores.shape}"
        )
    det_w, det_h = detect_size if detect_size is not None else (width, height)
    points = keypoints / np.array([float(det_w), float(det_h)])

    neck_point = points[[5, 6]].mean(axis=0)
    neck_score = float(scores[5] > NECK_SHOULDER_THRESHOLD and scores[6] > NECK_SHOULDER_THRESHOLD)
    body = np.stack([neck_point if i == NECK else points[i] for i in BODY_FROM_COCO])
    body_scores = np.array([neck_score if i == NECK else scores[i] for i in BODY_FROM_COCO])

    def masked(pts: np.ndarray, sc: np.ndarray) -> np.ndarray:
        pts = pts.copy()
        pts[sc < threshold] = MISSING
        return pts

    # The reference draws a body point only when its score is > threshold (its `subset`),
    # while hands and face are masked at < threshold: a score of exactly 0.35 differs.
    body = body.copy()
    body[~(body_scores > threshold)] = MISSING
    return Pose(
        body=body,
        body_scores=body_scores,
        hands=np.stack(
            [
                masked(points[LEFT_HAND], scores[LEFT_HAND]),
                masked(points[RIGHT_HAND], scores[RIGHT_HAND]),
            ]
        ),
        hand_scores=np.stack([scores[LEFT_HAND], scores[RIGHT_HAND]]),
        face=masked(points[FACE], scores[FACE]),
        face_scores=scores[FACE],
        feet=masked(points[FEET], scores[FEET]),
        feet_scores=scores[FEET],
        width=width,
        height=height,
    )

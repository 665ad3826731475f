"""Alignment of driving poses to the reference person (docs/REFERENCE.md, "Alignment").

Every limb of each driving frame is rescaled about its parent joint by the length ratio
reference / first-used-frame, then the whole skeleton is moved so that the first frame's
neck lands on the reference's neck. Computations are done in an isotropic frame (x times
W/H of the pose's own image, y unchanged) and returned in the reference's normalised
coordinates.

Deliberate difference from the reference code: an infinite scale (a limb of zero length
in the first used frame) becomes the mean of the finite scales, which is what the
reference intends; as written, it keeps the infinity and so loses those points in every
frame. Missing points stay exactly (-1, -1) through the translation (the reference shifts
its -1 markers, which only shows when the shift exceeds 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .errors import MissingPersonError, PoseFormatError
from .types import MISSING, Pose, missing_mask

MissingPolicy = Literal["hold", "interpolate", "empty"]
MISSING_POLICIES: tuple[str, ...] = ("hold", "interpolate", "empty")

#: The scale names in the reference's order (the order of its mean over finite scales).
SCALE_NAMES = (
    "neck", "face_left", "face_right", "shoulder", "arm_upper", "arm_lower", "hand",
    "body_len", "leg_upper", "leg_lower",
)  # fmt: skip


def _isotropic(pose: Pose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ratio = pose.width / pose.height
    body, hands, face = pose.body.copy(), pose.hands.copy(), pose.face.copy()
    for points in (body, hands, face):
        points[..., 0] *= ratio
    return body, hands, face


def _dist(points: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(points[a] - points[b]))


def _ratio(ref: float, drv: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(ref) / np.float64(drv))


def _limb_lengths(body: np.ndarray) -> dict[str, list[float]]:
    hip_mid = (body[8] + body[11]) / 2
    return {
        "neck": [_dist(body, 0, 1)],
        "face_left": [_dist(body, 16, 14) + _dist(body, 14, 0)],
        "face_right": [_dist(body, 17, 15) + _dist(body, 15, 0)],
        "shoulder": [_dist(body, 2, 5)],
        "arm_upper": [_dist(body, 2, 3), _dist(body, 5, 6)],
        "arm_lower": [_dist(body, 3, 4), _dist(body, 6, 7)],
        "body_len": [float(np.linalg.norm(body[1] - hip_mid))],
        "leg_upper": [_dist(body, 8, 9), _dist(body, 11, 12)],
        "leg_lower": [_dist(body, 9, 10), _dist(body, 12, 13)],
    }


def compute_scales(reference: Pose, first: Pose) -> dict[str, float]:
    """The ten limb scales (reference length / first-frame length), NaN and inf resolved.

    Lengths are measured on the raw arrays, missing markers included, as the reference does;
    a limb missing in both poses gives 0/0 = NaN -> 1, one of zero length only in the
    first frame gives inf -> mean of the finite scales (1 when none is finite).
    """
    ref_len = _limb_lengths(_isotropic(reference)[0])
    drv_len = _limb_lengths(_isotropic(first)[0])
    scales: dict[str, float] = {}
    for name in ref_len:
        ratios = [_ratio(r, d) for r, d in zip(ref_len[name], drv_len[name], strict=True)]
        scales[name] = ratios[0] if len(ratios) == 1 else (ratios[0] + ratios[1]) / 2
    scales["hand"] = (scales["arm_upper"] + scales["arm_lower"]) / 2
    scales = {name: scales[name] for name in SCALE_NAMES}
    scales = {name: 1.0 if np.isnan(value) else value for name, value in scales.items()}
    finite = [value for value in scales.values() if np.isfinite(value)]
    fill = sum(finite) / len(finite) if finite else 1.0
    return {name: value if np.isfinite(value) else fill for name, value in scales.items()}


def _scale_about(points: np.ndarray, centre: np.ndarray, scale: float) -> np.ndarray:
    """cv2.getRotationMatrix2D(centre, 0, scale) applied to points, in its arithmetic.

    cv2 takes the pivot as a float32 point: rounding it the same way keeps the result
    equal to the reference's to float64 precision rather than to ~1e-6.
    """
    pivot = centre.astype(np.float32).astype(np.float64)
    return points * scale + (1.0 - scale) * pivot


def _align_limbs(body: np.ndarray, hands: np.ndarray, s: dict[str, float]) -> None:
    """Rescale limbs in place, parents before children (the reference's order)."""
    orig_body, orig_hands = body.copy(), hands.copy()

    def offset(child: int | list[int], parent: int) -> np.ndarray:
        return orig_body[child] - orig_body[parent]

    def place(child: int | list[int], parent: int, scale: float) -> None:
        body[child] = _scale_about(offset(child, parent) + body[parent], body[parent], scale)

    body[0] = _scale_about(body[0], body[1], s["neck"])
    place([14, 16], 0, s["face_left"])
    place([15, 17], 0, s["face_right"])
    body[[2, 5]] = _scale_about(body[[2, 5]], body[1], s["shoulder"])
    for shoulder, elbow, wrist, hand in ((2, 3, 4, 1), (5, 6, 7, 0)):
        place(elbow, shoulder, s["arm_upper"])
        place(wrist, elbow, s["arm_lower"])
        hand_offset = orig_hands[hand] - orig_body[wrist]
        hands[hand] = _scale_about(hand_offset + body[wrist], body[wrist], s["hand"])
    body[[8, 11]] = _scale_about(body[[8, 11]], body[1], s["body_len"])
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        place(knee, hip, s["leg_upper"])
        place(ankle, knee, s["leg_lower"])


def _restore_missing(points: np.ndarray, original: np.ndarray) -> np.ndarray:
    points = np.where(original == MISSING, MISSING, points)
    points = np.nan_to_num(points, nan=MISSING)
    points[missing_mask(points)] = MISSING
    return points


def align_pose(pose: Pose, reference: Pose, scales: dict[str, float], shift: np.ndarray) -> Pose:
    """One driving frame -> reference-normalised aligned pose.

    shift: the isotropic neck offset reference - first frame (see `neck_shift`).
    """
    body, hands, face = _isotropic(pose)
    _align_limbs(body, hands, scales)
    ref_ratio = reference.width / reference.height
    out = []
    for points, original in ((body, pose.body), (hands, pose.hands), (face, pose.face)):
        points = _restore_missing(points, original)
        absent = missing_mask(points)
        points = points + shift
        points[..., 0] /= ref_ratio
        points[absent] = MISSING
        out.append(points)
    return Pose(
        body=out[0],
        body_scores=pose.body_scores,
        hands=out[1],
        hand_scores=pose.hand_scores,
        face=out[2],
        face_scores=pose.face_scores,
        width=reference.width,
        height=reference.height,
    )


def neck_shift(reference: Pose, first: Pose) -> np.ndarray:
    """Isotropic offset that moves the first frame's neck onto the reference's neck."""
    return _isotropic(reference)[0][1] - _isotropic(first)[0][1]


def _require_person(pose: Pose | None, what: str, hint: str) -> Pose:
    if pose is None or pose.is_empty:
        raise MissingPersonError(f"no person was detected in {what}; {hint}")
    if not pose.body_present[1]:
        raise MissingPersonError(
            f"the person in {what} has no visible neck (both shoulders are needed to place "
            f"the pose); {hint}"
        )
    return pose


def align_poses(
    reference: Pose | None,
    driving: Sequence[Pose | None],
    *,
    align_frame: int = 0,
    missing: MissingPolicy = "hold",
) -> list[Pose]:
    """Align driving poses to the reference person; frames before `align_frame` are dropped.

    The frame at `align_frame` defines the scales and the translation. `missing` says what
    a frame without a person becomes: "hold" the previous aligned pose, "interpolate"
    linearly between the aligned neighbours (holding at the end), or "empty" (nothing
    drawn). Raises MissingPersonError when the reference or the first used frame has no
    person, PoseFormatError for bad options.
    """
    if missing not in MISSING_POLICIES:
        raise PoseFormatError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if not 0 <= align_frame < len(driving):
        raise PoseFormatError(
            f"align_frame={align_frame} is outside the driving video's {len(driving)} frames"
        )
    reference = _require_person(
        reference, "the reference image", "use an image that shows the person's upper body"
    )
    first = _require_person(
        driving[align_frame],
        f"the first used driving frame (index {align_frame})",
        "choose another align_frame where the dancer is visible",
    )
    scales = compute_scales(reference, first)
    shift = neck_shift(reference, first)
    aligned: list[Pose | None] = [
        None if pose is None or pose.is_empty else align_pose(pose, reference, scales, shift)
        for pose in driving[align_frame:]
    ]
    return fill_missing(aligned, missing, reference.width, reference.height)


def fill_missing(
    poses: list[Pose | None], policy: MissingPolicy, width: int, height: int
) -> list[Pose]:
    """Replace None entries by the policy; poses[0] must not be None for hold/interpolate."""
    out: list[Pose] = []
    for index, pose in enumerate(poses):
        if pose is not None:
            out.append(pose)
        elif policy == "empty" or not out:
            out.append(Pose.empty(width, height))
        elif policy == "hold":
            out.append(out[-1].copy())
        else:
            after = next(
                ((j, p) for j, p in enumerate(poses[index + 1 :], index + 1) if p is not None), None
            )
            if after is None:
                out.append(out[-1].copy())
            else:
                before = index - 1
                while poses[before] is None:
                    before -= 1
                t = (index - before) / (after[0] - before)
                out.append(interpolate(poses[before], after[1], t))
    return out


def interpolate(a: Pose, b: Pose, t: float) -> Pose:
    """(1 - t) * a + t * b per point; a point missing in either pose is missing."""

    def mix(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
        points = (1.0 - t) * pa + t * pb
        points[missing_mask(pa) | missing_mask(pb)] = MISSING
        return points

    return Pose(
        body=mix(a.body, b.body),
        body_scores=np.minimum(a.body_scores, b.body_scores),
        hands=mix(a.hands, b.hands),
        hand_scores=np.minimum(a.hand_scores, b.hand_scores),
        face=mix(a.face, b.face),
        face_scores=np.minimum(a.face_scores, b.face_scores),
        width=a.width,
        height=a.height,
    )

"""The single-person pose record every part of the pipeline passes around.

Coordinates are normalised to the source image ([0, 1] for points inside it: x by its
width, y by its height), the layout of docs/REFERENCE.md, "Keypoints". A missing point is stored as
(-1, -1), the marker the reference pipeline uses, so arrays can be handed to code written
against DWPose's `candidate` arrays unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from .errors import PoseFormatError

MISSING = -1.0
NUM_BODY = 18
NUM_HAND = 21
NUM_FACE = 68
NUM_FEET = 6


def missing_mask(points: np.ndarray) -> np.ndarray:
    """True where a point is missing: a -1 marker or a non-finite coordinate.

    One coordinate is enough: the reference marks and restores coordinates one by one.
    """
    points = np.asarray(points)
    return np.any((points == MISSING) | ~np.isfinite(points), axis=-1)


def _array(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    array = np.array(value, dtype=np.float64, copy=True)
    if array.shape != shape:
        raise PoseFormatError(f"Pose.{name} must have shape {shape}, got {array.shape}")
    return array


@dataclass(eq=False)
class Pose:
    """One person's whole-body keypoints in one image.

    body: [18, 2] in OpenPose order (nose, neck, r-shoulder, ...); hands: [2, 21, 2] with
    hands[0] the 133-layout's left hand and hands[1] its right hand (the reference's order);
    face: [68, 2]; feet: [6, 2] or None. Scores are the detector's confidences in [0, 1]
    (1 for points read from JSON). width/height: pixel size of the image the normalised
    coordinates refer to (needed for the isotropic frame of the alignment).
    """

    body: np.ndarray
    body_scores: np.ndarray
    hands: np.ndarray
    hand_scores: np.ndarray
    face: np.ndarray
    face_scores: np.ndarray
    width: int
    height: int
    feet: np.ndarray | None = field(default=None)
    feet_scores: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.body = _array("body", self.body, (NUM_BODY, 2))
        self.body_scores = _array("body_scores", self.body_scores, (NUM_BODY,))
        self.hands = _array("hands", self.hands, (2, NUM_HAND, 2))
        self.hand_scores = _array("hand_scores", self.hand_scores, (2, NUM_HAND))
        self.face = _array("face", self.face, (NUM_FACE, 2))
        self.face_scores = _array("face_scores", self.face_scores, (NUM_FACE,))
        if (self.feet is None) != (self.feet_scores is None):
            raise PoseFormatError("Pose.feet and Pose.feet_scores must be given together")
        if self.feet is not None:
            self.feet = _array("feet", self.feet, (NUM_FEET, 2))
            self.feet_scores = _array("feet_scores", self.feet_scores, (NUM_FEET,))
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise PoseFormatError(
                f"Pose width and height must be positive pixel sizes, got {self.width}x{self.height}"
            )
        self.width, self.height = int(self.width), int(self.height)

    @classmethod
    def empty(cls, width: int, height: int, *, with_feet: bool = False) -> Pose:
        """A pose with every point missing (what the `empty` missing-person policy emits)."""
        return cls(
            body=np.full((NUM_BODY, 2), MISSING),
            body_scores=np.zeros(NUM_BODY),
            hands=np.full((2, NUM_HAND, 2), MISSING),
            hand_scores=np.zeros((2, NUM_HAND)),
            face=np.full((NUM_FACE, 2), MISSING),
            face_scores=np.zeros(NUM_FACE),
            width=width,
            height=height,
            feet=np.full((NUM_FEET, 2), MISSING) if with_feet else None,
            feet_scores=np.zeros(NUM_FEET) if with_feet else None,
        )

    @property
    def body_present(self) -> np.ndarray:
        """[18] bool: which body points are drawn and used."""
        return ~missing_mask(self.body)

    @property
    def is_empty(self) -> bool:
        """True when no body, hand or face point is present."""
        return bool(
            missing_mask(self.body).all()
            and missing_mask(self.hands).all()
            and missing_mask(self.face).all()
        )

    def copy(self) -> Pose:
        """A deep copy (arrays are copied by __post_init__)."""
        return replace(self)

    def allclose(self, other: Pose, *, atol: float = 1e-9) -> bool:
        """Same size and the same points (within atol), missing points in the same places."""
        if (self.width, self.height) != (other.width, other.height):
            return False
        for f in fields(self):
            if f.name in ("width", "height"):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                if a is not b:
                    return False
                continue
            if not np.allclose(a, b, atol=atol, rtol=0.0, equal_nan=True):
                return False
        return True


# --- ComfyUI POSE_KEYPOINT (OpenPose JSON, as comfyui_controlnet_aux writes it) -------------


def _flatten(points: np.ndarray) -> list[float]:
    """[K, 2] -> [x, y, c] * K with c = 1 for present points and 0, 0, 0 for missing ones.

    controlnet_aux writes exactly this and treats c < 1 as missing when reading, so other
    nodes read our output; detector scores are therefore not written.
    """
    present = ~missing_mask(points)
    out: list[float] = []
    for (x, y), ok in zip(points.tolist(), present.tolist(), strict=True):
        out.extend((float(x), float(y), 1.0) if ok else (0.0, 0.0, 0.0))
    return out


def to_pose_keypoint(poses: list[Pose | None]) -> list[dict]:
    """Poses -> one POSE_KEYPOINT dict per frame (normalised coordinates, one person or none).

    A None pose (no person) becomes a frame with an empty `people` list; its canvas size is
    taken from the nearest pose that has one (0 x 0 when none does).
    """
    sizes = [(p.width, p.height) for p in poses if p is not None]
    frames: list[dict] = []
    last = sizes[0] if sizes else (0, 0)
    for pose in poses:
        if pose is None:
            frames.append({"people": [], "canvas_width": last[0], "canvas_height": last[1]})
            continue
        last = (pose.width, pose.height)
        person = {
            "pose_keypoints_2d": _flatten(pose.body),
            "face_keypoints_2d": _flatten(pose.face),
            "hand_left_keypoints_2d": _flatten(pose.hands[0]),
            "hand_right_keypoints_2d": _flatten(pose.hands[1]),
        }
        frames.append(
            {"people": [person], "canvas_width": pose.width, "canvas_height": pose.height}
        )
    return frames


def _unflatten(
    values: object, count: int, key: str, scale: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    if not values:
        return np.full((count, 2), MISSING), np.zeros(count)
    try:
        triples = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError) as exc:
        raise PoseFormatError(f"{key} must be a flat list of x, y, confidence numbers") from exc
    if len(triples) != count:
        raise PoseFormatError(f"{key} must hold {count} points (x, y, c), got {len(triples)}")
    points, conf = triples[:, :2].copy(), triples[:, 2].copy()
    if scale is not None:
        points /= scale
    absent = (conf <= 0) | ~np.isfinite(points).all(axis=1)
    points[absent] = MISSING
    conf[absent] = 0.0
    return points, np.clip(conf, 0.0, 1.0)


#: Normalised keypoints may lie a little outside [0, 1] (DWPose predicts points beyond the
#: image edge); pixel coordinates of any real canvas exceed this somewhere.
PIXEL_COORDINATE_LIMIT = 2.0


def _is_pixel_frame(person: dict) -> bool:
    """Whether a person's coordinates are pixels (controlnet_aux accepts both kinds)."""
    for key in (
        "pose_keypoints_2d",
        "face_keypoints_2d",
        "hand_left_keypoints_2d",
        "hand_right_keypoints_2d",
    ):
        values = person.get(key) or []
        try:
            triples = np.asarray(values, dtype=np.float64).reshape(-1, 3)
        except (TypeError, ValueError):
            continue  # reported with its key by _unflatten
        present = triples[triples[:, 2] > 0, :2]
        present = present[np.isfinite(present).all(axis=1)]
        if present.size and np.abs(present).max() > PIXEL_COORDINATE_LIMIT:
            return True
    return False


def from_pose_keypoint(frames: list[dict]) -> list[Pose | None]:
    """POSE_KEYPOINT dicts -> poses (first person of each frame; None where there is none).

    A point is present when its confidence is > 0. Pixel coordinates are normalised by the
    canvas size. The confidence becomes the point's score.
    """
    if isinstance(frames, dict):
        frames = [frames]
    poses: list[Pose | None] = []
    for index, frame in enumerate(frames):
        if (
            not isinstance(frame, dict)
            or "canvas_width" not in frame
            or "canvas_height" not in frame
        ):
            raise PoseFormatError(
                f"POSE_KEYPOINT frame {index} needs canvas_width and canvas_height"
            )
        people = frame.get("people") or []
        if not people:
            poses.append(None)
            continue
        person = people[0]
        width, height = int(frame["canvas_width"]), int(frame["canvas_height"])
        scale = (float(width), float(height)) if _is_pixel_frame(person) else None
        body, body_scores = _unflatten(
            person.get("pose_keypoints_2d"), NUM_BODY, "pose_keypoints_2d", scale
        )
        face, face_scores = _unflatten(
            person.get("face_keypoints_2d"), NUM_FACE, "face_keypoints_2d", scale
        )
        left, left_scores = _unflatten(
            person.get("hand_left_keypoints_2d"), NUM_HAND, "hand_left_keypoints_2d", scale
        )
        right, right_scores = _unflatten(
            person.get("hand_right_keypoints_2d"), NUM_HAND, "hand_right_keypoints_2d", scale
        )
        poses.append(
            Pose(
                body=body,
                body_scores=body_scores,
                hands=np.stack([left, right]),
                hand_scores=np.stack([left_scores, right_scores]),
                face=face,
                face_scores=face_scores,
                width=width,
                height=height,
            )
        )
    return poses

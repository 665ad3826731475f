"""OpenPose-style drawing of poses, pixel-compatible with SteadyDancer's reference drawing.

The reference (DWPose's `draw_pose`) writes its palette into the canvas, dims the limbs by
0.6, draws joints and hands, and then swaps the channels (BGR -> RGB) before saving, so the
frames the model was conditioned on show every palette triple reversed: limb 0 is RGB
(0, 0, 153), hand joints are RGB (255, 0, 0). `colours="steadydancer"` reproduces those
frames; `colours="controlnet"` gives the usual ControlNet OpenPose colouring (the triples
as written), for use with other models.

`reference_frame` is the reference's chain from a pose to the frame its generation reads:
drawn at twice the reference image fitted to 1024x576 pixels, then resized with PIL's
bicubic to the reference image's own size (docs/REFERENCE.md, "Pose frames").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import cv2
import numpy as np

from .errors import PoseDependencyError, PoseFormatError
from .types import Pose, missing_mask

Colouring = Literal["steadydancer", "controlnet"]
COLOURINGS: tuple[str, ...] = ("steadydancer", "controlnet")

#: Limbs as 1-based OpenPose body indices (the first 17 of the reference's list are drawn).
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
    (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
PALETTE = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19),
    (19, 20),
)  # fmt: skip
LIMB_HALF_WIDTH = 4
LIMB_DIM = 0.6
JOINT_RADIUS = 4
HAND_LINE_WIDTH = 2
HAND_JOINT_RADIUS = 4
HAND_JOINT_COLOUR = (0, 0, 255)
FACE_RADIUS = 3
FACE_COLOUR = (255, 255, 255)
EPS = 0.01  # hand/face points whose integer pixel coordinate is <= EPS are not drawn
MAX_PIXEL = 1 << 24  # farther points (absurd alignment scales) are not drawn: cv2 takes int32


def hsv_to_rgb(h: float, s: float = 1.0, v: float = 1.0) -> tuple[float, float, float]:
    """matplotlib.colors.hsv_to_rgb for one colour, same arithmetic (no matplotlib needed)."""
    if s == 0:
        return (v, v, v)
    i = int(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]


#: Hand edge colours as the reference passes them to cv2 (floats; cv2 rounds them).
HAND_EDGE_COLOURS = tuple(
    tuple(c * 255.0 for c in hsv_to_rgb(i / float(len(HAND_EDGES)))) for i in range(len(HAND_EDGES))
)


def _draw_body(canvas: np.ndarray, pose: Pose) -> np.ndarray:
    height, width = canvas.shape[:2]
    present = _pixel_points(pose.body, width, height)[1]
    for i, (a, b) in enumerate(LIMBS):
        if not (present[a - 1] and present[b - 1]):
            continue
        xs = pose.body[[a - 1, b - 1], 0] * float(width)
        ys = pose.body[[a - 1, b - 1], 1] * float(height)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(xs)), int(np.mean(ys))),
            (int(length / 2), LIMB_HALF_WIDTH),
            int(angle),
            0,
            360,
            1,
        )
        cv2.fillConvexPoly(canvas, polygon, PALETTE[i])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for i in range(len(pose.body)):
        if present[i]:
            x, y = pose.body[i]
            cv2.circle(
                canvas, (int(x * width), int(y * height)), JOINT_RADIUS, PALETTE[i], thickness=-1
            )
    return canvas


def _pixel_points(
    points: np.ndarray, width: int, height: int
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Integer pixels (truncated, as the reference does) and which points can be drawn."""
    scaled = points * np.array([float(width), float(height)])
    ok = ~missing_mask(points) & (np.abs(np.nan_to_num(scaled, nan=np.inf)) < MAX_PIXEL).all(
        axis=-1
    )
    safe = np.where(ok[..., None], scaled, -1.0)
    return [(int(x), int(y)) for x, y in safe.tolist()], ok


def _drawn(point: tuple[int, int]) -> bool:
    return point[0] > EPS and point[1] > EPS


def _draw_hands(canvas: np.ndarray, pose: Pose) -> None:
    height, width = canvas.shape[:2]
    for hand in pose.hands:
        px, ok = _pixel_points(hand, width, height)
        for (a, b), colour in zip(HAND_EDGES, HAND_EDGE_COLOURS, strict=True):
            if ok[a] and ok[b] and _drawn(px[a]) and _drawn(px[b]):
                cv2.line(canvas, px[a], px[b], colour, thickness=HAND_LINE_WIDTH)
        for point, drawable in zip(px, ok, strict=True):
            if drawable and _drawn(point):
                cv2.circle(canvas, point, HAND_JOINT_RADIUS, HAND_JOINT_COLOUR, thickness=-1)


def _draw_face(canvas: np.ndarray, pose: Pose) -> None:
    height, width = canvas.shape[:2]
    for point, drawable in zip(*_pixel_points(pose.face, width, height), strict=True):
        if drawable and _drawn(point):
            cv2.circle(canvas, point, FACE_RADIUS, FACE_COLOUR, thickness=-1)


def render_pose(
    pose: Pose | None,
    height: int,
    width: int,
    *,
    colours: Colouring = "steadydancer",
    draw_face: bool = False,
) -> np.ndarray:
    """Draw one pose on black: uint8 RGB [height, width, 3]. None draws nothing.

    Normalised coordinates are mapped to this canvas, whatever the pose's own size.
    """
    if colours not in COLOURINGS:
        raise PoseFormatError(f"colours must be one of {COLOURINGS}, got {colours!r}")
    if int(height) <= 0 or int(width) <= 0:
        raise PoseFormatError(f"render size must be positive, got {width}x{height}")
    canvas = np.zeros((int(height), int(width), 3), dtype=np.uint8)
    if pose is None:
        return canvas
    canvas = _draw_body(canvas, pose)
    _draw_hands(canvas, pose)
    if draw_face:
        _draw_face(canvas, pose)
    if colours == "steadydancer":
        canvas = np.ascontiguousarray(canvas[..., ::-1])
    return canvas


def render_sequence(
    poses: Sequence[Pose | None],
    height: int,
    width: int,
    *,
    colours: Colouring = "steadydancer",
    supersample: int = 2,
    draw_face: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Draw every pose: uint8 [N, height, width, 3], e.g. for previews.

    `supersample=2` draws at 2H x 2W and shrinks with cv2's bicubic (no antialiasing);
    `supersample=1` draws at the final size. The frames the model is conditioned on come
    from `reference_frame`, the reference's own chain.
    """
    if supersample < 1:
        raise PoseFormatError(f"supersample must be >= 1, got {supersample}")
    out = np.zeros((len(poses), int(height), int(width), 3), dtype=np.uint8)
    for index, pose in enumerate(poses):
        frame = render_pose(
            pose, height * supersample, width * supersample, colours=colours, draw_face=draw_face
        )
        if supersample != 1:
            frame = cv2.resize(frame, (int(width), int(height)), interpolation=cv2.INTER_CUBIC)
        out[index] = frame
        if progress is not None:
            progress(index + 1, len(poses))
    return out


def _pil_image() -> object:
    try:
        from PIL import Image
    except ImportError:
        raise PoseDependencyError(
            "the reference's pose frames are resized with Pillow: pip install pillow (ComfyUI ships it)"
        ) from None
    return Image


def reference_frame(
    pose: Pose | None,
    draw_size: tuple[int, int],
    reference_size: tuple[int, int],
    *,
    colours: Colouring = "steadydancer",
) -> np.ndarray:
    """One pose frame as the reference pipeline hands it to generation: uint8 RGB [H, W, 3].

    The pose is drawn at twice `draw_size` (height, width: the reference image fitted to
    1024x576 pixels, multiples of 16) and resized with PIL's bicubic, which antialiases when
    it shrinks, to `reference_size` (height, width of the reference image itself). The
    reference keeps the drawn frames as an H.264 video, then as JPEG files, between the two
    steps; that lossy round trip is left out here.
    """
    (draw_h, draw_w), (ref_h, ref_w) = draw_size, reference_size
    if min(draw_h, draw_w, ref_h, ref_w) <= 0:
        raise PoseFormatError(f"sizes must be positive, got draw {draw_w}x{draw_h} and reference {ref_w}x{ref_h}")
    drawn = render_pose(pose, 2 * int(draw_h), 2 * int(draw_w), colours=colours)
    image = _pil_image()
    resized = image.fromarray(drawn).resize((int(ref_w), int(ref_h)), image.Resampling.BICUBIC)
    return np.array(resized, dtype=np.uint8)  # a writable copy

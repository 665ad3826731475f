"""Pre- and post-processing shared by the backends, with mmdet/mmpose's arithmetic.

The ONNX backend runs the networks bare, so everything mmdet's YOLOX test pipeline and
mmpose's top-down pipeline do around them is here: the detection-resolution resize of the
reference, the 640x640 letterbox, YOLOX box decoding and filtering, the bbox -> centre/scale
-> affine crop of RTMPose, SimCC decoding and the flip test.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

DETECTOR_SIZE = 640
PAD_VALUE = 114
YOLOX_STRIDES = (8, 16, 32)
YOLOX_SCORE_THR = 0.01  # mmdet's YOLOX test_cfg
YOLOX_NMS_IOU = 0.65
PERSON_SCORE_THR = 0.5  # the reference's filter after detection
PERSON_NMS_IOU = 0.7
POSE_INPUT_SIZE = (288, 384)  # (w, h)
POSE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
POSE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
BBOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0


def resize_for_detection(image: np.ndarray, resolution: int) -> np.ndarray:
    """Short side to `resolution`, both sides rounded to multiples of 64 (cubic up, area down)."""
    height, width = image.shape[:2]
    k = float(resolution) / min(height, width)
    new_h = int(np.round(height * k / 64.0)) * 64
    new_w = int(np.round(width * k / 64.0)) * 64
    if (new_h, new_w) == (height, width):
        return image
    return cv2.resize(
        image, (new_w, new_h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    )


def letterbox(
    image: np.ndarray, size: int = DETECTOR_SIZE
) -> tuple[np.ndarray, tuple[float, float]]:
    """mmdet Resize(keep_ratio) + Pad(pad_to_square, 114): -> (HWC float32, (sx, sy))."""
    height, width = image.shape[:2]
    ratio = min(size / max(height, width), size / min(height, width))
    new_w, new_h = int(width * ratio + 0.5), int(height * ratio + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    padded = np.full((size, size, 3), PAD_VALUE, dtype=np.float32)
    padded[:new_h, :new_w] = resized
    return padded, (new_w / width, new_h / height)


@lru_cache(maxsize=4)
def yolox_grid(size: int = DETECTOR_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(cell xy [A, 2], stride [A, 1]) of the anchors, in YOLOX's output order (read-only)."""
    grids, strides = [], []
    for stride in YOLOX_STRIDES:
        n = size // stride
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    grid, stride = (
        np.concatenate(grids).astype(np.float32),
        np.concatenate(strides).astype(np.float32),
    )
    grid.flags.writeable = stride.flags.writeable = False
    return grid, stride


def decode_yolox(
    raw: np.ndarray, scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """YOLOX ONNX output [A, 5 + C] (raw box, sigmoid objectness, sigmoid classes) ->
    boxes xyxy in the input image's pixels, scores, labels; mmdet's YOLOX test semantics
    (one label per box: the best class; score = objectness * class score; score >= 0.01;
    class-wise NMS at 0.65), sorted by score.
    """
    grid, stride = yolox_grid()
    if raw.ndim != 2 or grid.shape[0] != raw.shape[0] or raw.shape[1] < 6:
        raise ValueError(
            f"YOLOX output must be [{grid.shape[0]}, 5 + classes], got {list(raw.shape)}"
        )
    centre = (raw[:, :2] + grid) * stride
    size = np.exp(raw[:, 2:4]) * stride
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    boxes /= np.array([scale[0], scale[1], scale[0], scale[1]], dtype=np.float32)
    labels = raw[:, 5:].argmax(axis=1)
    scores = raw[:, 4] * raw[:, 5:].max(axis=1)
    keep = scores >= YOLOX_SCORE_THR
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, YOLOX_NMS_IOU)
    return boxes[keep], scores[keep], labels[keep]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, by decreasing score (IoU as mmcv's, no +1)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float
) -> np.ndarray:
    """Class-wise NMS: boxes of different labels never suppress each other."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    offset = labels[:, None].astype(np.float64) * (float(boxes.max()) + 1.0)
    return nms(boxes + offset, scores, iou)


def select_people(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The reference's person boxes: class 0, score > 0.5, NMS 0.7; best first. [P, 4]."""
    mask = (labels == 0) & (scores > PERSON_SCORE_THR)
    boxes, scores = boxes[mask], scores[mask]
    return boxes[nms(boxes, scores, PERSON_NMS_IOU)] if len(boxes) else np.zeros((0, 4), np.float32)


def box_to_centre_scale(
    box: np.ndarray, padding: float = BBOX_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """xyxy -> centre and padded scale, then widened to the model's 3:4 aspect ratio."""
    x1, y1, x2, y2 = (float(v) for v in box)
    centre = np.array([x1 + x2, y1 + y2], dtype=np.float32) * 0.5
    w, h = (x2 - x1) * padding, (y2 - y1) * padding
    aspect = POSE_INPUT_SIZE[0] / POSE_INPUT_SIZE[1]
    scale = np.array([w, w / aspect] if w > h * aspect else [h * aspect, h], dtype=np.float32)
    return centre, scale


def warp_matrix(
    centre: np.ndarray, scale: np.ndarray, output_size: tuple[int, int] = POSE_INPUT_SIZE
) -> np.ndarray:
    """mmpose get_warp_matrix (no rotation, no shift, not UDP): bbox -> model input."""
    dst_w, dst_h = output_size
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = centre
    src[1] = centre + np.array([0.0, scale[0] * -0.5])
    src[2] = src[1] + np.array([-(src[0] - src[1])[1], (src[0] - src[1])[0]])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + np.array([0.0, dst_w * -0.5])
    dst[2] = dst[1] + np.array([-(dst[0] - dst[1])[1], (dst[0] - dst[1])[0]])
    return cv2.getAffineTransform(src, dst)


def crop_person(image: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Affine crop of the (centre, scale) box to 288x384, bilinear, zero border."""
    return cv2.warpAffine(
        image, warp_matrix(centre, scale), POSE_INPUT_SIZE, flags=cv2.INTER_LINEAR
    )


def normalise_crops(crops: np.ndarray) -> np.ndarray:
    """[N, 384, 288, 3] uint8 RGB -> [N, 3, 384, 288] float32 with the model's mean/std."""
    x = (crops.astype(np.float32) - POSE_MEAN) / POSE_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SimCC argmax decode: ([N, K, 2] in model-input pixels, [N, K] scores).

    Score = min of the two maxima; a point whose score is <= 0 gets location -1 (mmpose).
    """
    locs = np.stack([simcc_x.argmax(axis=-1), simcc_y.argmax(axis=-1)], axis=-1).astype(np.float32)
    vals = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1))
    locs[vals <= 0.0] = -1
    return locs / SIMCC_SPLIT_RATIO, vals


def to_image(points: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Model-input pixels -> image pixels for one crop."""
    size = np.array(POSE_INPUT_SIZE, dtype=np.float32)
    return points / size * scale + centre - 0.5 * scale


def flip_simcc(
    simcc_x: np.ndarray, simcc_y: np.ndarray, flip_indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SimCC of a mirrored crop -> SimCC of the original (mmpose's flip_vectors)."""
    return simcc_x[:, flip_indices, ::-1], simcc_y[:, flip_indices]


def wholebody_flip_indices() -> np.ndarray:
    """Left/right partner of each COCO-WholeBody point (body, feet, face, hands)."""
    pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
    pairs += [(17, 20), (18, 21), (19, 22)]  # big toe, small toe, heel
    face = [(0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9)]  # jaw
    face += [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]  # eyebrows
    face += [(31, 35), (32, 34)]  # nose bottom
    face += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    face += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
    pairs += [(23 + a, 23 + b) for a, b in face]
    pairs += [(91 + i, 112 + i) for i in range(21)]  # left hand <-> right hand
    indices = np.arange(133)
    for a, b in pairs:
        indices[a], indices[b] = b, a
    return indices

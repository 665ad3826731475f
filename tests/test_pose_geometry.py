"""Pre/post-processing arithmetic of the backends (mmdet/mmpose semantics)."""

from __future__ import annotations

import numpy as np

from pose.backends import geometry as g


def test_detect_resolution_resize_rounds_to_multiples_of_64():
    assert g.resize_for_detection(np.zeros((1080, 1920, 3), np.uint8), 1024).shape == (
        1024,
        1792,
        3,
    )
    assert g.resize_for_detection(np.zeros((100, 130, 3), np.uint8), 512).shape == (512, 640, 3)
    image = np.zeros((512, 640, 3), np.uint8)
    assert g.resize_for_detection(image, 512) is image


def test_letterbox_keeps_ratio_and_pads_with_114():
    padded, (sx, sy) = g.letterbox(np.full((100, 200, 3), 7, np.uint8))
    assert padded.shape == (640, 640, 3) and padded.dtype == np.float32
    assert (sx, sy) == (3.2, 3.2)
    assert padded[319, 639, 0] == 7 and padded[320, 0, 0] == 114


def test_yolox_decoding_filters_and_orders_boxes():
    raw = np.zeros((8400, 85), np.float32)
    raw[:, 2:4] = np.log(1 / 32)
    # Anchor 6400 is the first stride-16 cell (0, 0): centre (0 + 0.5) * 16 = 8.
    raw[6400, :4] = [0.5, 0.5, np.log(4.0), np.log(2.0)]
    raw[6400, 4], raw[6400, 5] = 0.8, 0.9
    boxes, scores, labels = g.decode_yolox(raw, (2.0, 2.0))
    assert len(boxes) == 1 and labels[0] == 0
    np.testing.assert_allclose(boxes[0], np.array([8 - 32, 8 - 16, 8 + 32, 8 + 16]) / 2)
    np.testing.assert_allclose(scores[0], 0.72, rtol=1e-6)


def test_person_selection_threshold_and_nms():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30], [0, 0, 5, 5]], np.float32)
    scores = np.array([0.6, 0.9, 0.7, 0.5])
    labels = np.array([0, 0, 0, 0])
    people = g.select_people(boxes, scores, labels)
    np.testing.assert_array_equal(people, boxes[[1, 2]])  # 0 suppressed (IoU .95), 3 not > 0.5


def test_crop_geometry_round_trips():
    centre, scale = g.box_to_centre_scale(np.array([100, 50, 200, 350]))
    np.testing.assert_allclose(centre, [150, 200])
    np.testing.assert_allclose(scale, [375 * 0.75, 375])  # height-bound, widened to 3:4
    m = g.warp_matrix(centre, scale)
    # The box centre maps to the crop centre; the scale to the crop size.
    np.testing.assert_allclose(m @ [150, 200, 1], [144, 192], atol=1e-4)
    point = np.array([[130.0, 260.0]])
    crop_point = (m @ np.append(point[0], 1))[None]
    np.testing.assert_allclose(g.to_image(crop_point, centre, scale), point, atol=1e-3)


def test_simcc_decode_and_flip():
    x = np.full((1, 133, 576), -1.0, np.float32)
    y = np.full((1, 133, 768), -1.0, np.float32)
    x[0, :, 100], y[0, :, 300] = 0.8, 0.6
    x[0, 5, :], y[0, 5, :] = -1.0, -1.0  # no positive maximum -> -1 location
    locs, vals = g.decode_simcc(x, y)
    np.testing.assert_allclose(locs[0, 0], [50, 150])
    assert vals[0, 0] == np.float32(0.6) and vals[0, 5] == -1.0
    np.testing.assert_allclose(locs[0, 5], [-0.5, -0.5])
    idx = g.wholebody_flip_indices()
    assert sorted(idx.tolist()) == list(range(133)) and (idx[idx] == np.arange(133)).all()
    assert idx[5] == 6 and idx[91] == 112 and idx[23] == 23 + 16 and idx[23 + 30] == 23 + 30
    fx, fy = g.flip_simcc(x, y, idx)
    assert fx[0, 7, 575 - 100] == np.float32(0.8) and fy[0, 7, 300] == np.float32(0.6)
    assert fx[0, 6, 575 - 100] == -1.0  # partner 5 had no maximum

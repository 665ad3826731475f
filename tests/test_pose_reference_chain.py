"""Pose frames through the reference's chain: drawn at twice the reference fitted to 1024x576,
PIL bicubic to the reference image's size, PyTorch bicubic to the generation size.

The expected frames are re-created here with PIL and PyTorch calls written out as the
reference's scripts make them; the drawing itself is the reference's (tests/test_pose_render.py).
The reference stores the drawn frames as H.264 and then JPEG between drawing and resizing:
that lossy step is left out on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pose_testutils import make_pose

from pose.errors import PoseFormatError
from pose.render import reference_frame, render_pose
from steadydancer.size import POSE_AREA, fit_to_area, resize_like_reference


def reference_draw_size(height: int, width: int) -> tuple[int, int]:
    """The reference's pose script: the reference image resized to the 1024*576 area, multiples of 16."""
    aspect_ratio = height / width
    lat_h = round(np.sqrt(1024 * 576 * aspect_ratio) // 16)
    lat_w = round(np.sqrt(1024 * 576 / aspect_ratio) // 16)
    return lat_h * 16, lat_w * 16


def reference_chain(pose, ref_h: int, ref_w: int, gen_h: int, gen_w: int) -> tuple[np.ndarray, torch.Tensor]:
    """(frame at the reference size, uint8; frame at the generation size, [-1, 1] float)."""
    draw_h, draw_w = reference_draw_size(ref_h, ref_w)
    drawn = render_pose(pose, draw_h * 2, draw_w * 2)  # draw_pose at ref_H*2, ref_W*2, then BGR2RGB
    at_reference = Image.fromarray(drawn).convert("RGB").resize((ref_w, ref_h), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(at_reference).copy()).permute(2, 0, 1).float().div(255).sub_(0.5).div_(0.5)
    resized = torch.nn.functional.interpolate(tensor[None], size=(gen_h, gen_w), mode="bicubic")[0]
    return np.asarray(at_reference), resized


@pytest.mark.parametrize(
    ("ref_h", "ref_w", "gen_h", "gen_w"),
    [(1184, 864, 832, 608), (3840, 2160, 832, 464), (640, 360, 832, 464), (480, 832, 464, 832), (300, 300, 640, 640)],
)
def test_frames_are_pixel_equal_to_the_reference_chain(ref_h: int, ref_w: int, gen_h: int, gen_w: int) -> None:
    pose = make_pose()
    draw = fit_to_area(ref_h, ref_w, POSE_AREA)
    assert draw == reference_draw_size(ref_h, ref_w)
    full = reference_frame(pose, draw, (ref_h, ref_w))
    expected_full, expected = reference_chain(pose, ref_h, ref_w, gen_h, gen_w)
    assert full.dtype == np.uint8 and full.shape == (ref_h, ref_w, 3)
    np.testing.assert_array_equal(full, expected_full)
    at_generation = resize_like_reference(torch.from_numpy(full).float().div(255)[None], gen_h, gen_w)[0]
    assert torch.allclose(at_generation.permute(2, 0, 1) * 2 - 1, expected, atol=1e-6)


def test_line_weight_no_longer_follows_the_photo_resolution_at_the_drawing_step() -> None:
    """The drawing size depends on the aspect ratio only: the same skeleton is drawn alike
    for a 360x640 and a 2160x3840 photo (the reference's resizes come after)."""
    small, large = fit_to_area(640, 360, POSE_AREA), fit_to_area(3840, 2160, POSE_AREA)
    assert small == large == (1024, 576)


def test_nothing_drawn_and_bad_sizes() -> None:
    assert not reference_frame(None, (32, 32), (20, 30)).any()
    with pytest.raises(PoseFormatError, match="sizes must be positive"):
        reference_frame(make_pose(), (0, 32), (20, 30))

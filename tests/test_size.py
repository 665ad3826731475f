"""The generation size and the resize to it, as the reference's image-to-video code computes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steadydancer.errors import ConditioningError
from steadydancer.size import (
    AREAS,
    POSE_AREA,
    default_shift,
    fit_to_area,
    generation_size,
    resize_like_reference,
)


def reference_size(height: int, width: int, max_area: int) -> tuple[int, int]:
    """The reference's expression (VAE stride 8, patch 2), written out as it computes it."""
    aspect_ratio = height / width
    lat_h = round(np.sqrt(max_area * aspect_ratio) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // 8 // 2 * 2)
    return lat_h * 8, lat_w * 8


@pytest.mark.parametrize("area", list(AREAS))
def test_every_area_matches_the_reference_on_many_aspect_ratios(area: str) -> None:
    rng = np.random.default_rng(0)
    for height, width in [(1920, 1080), (1080, 1920), (1184, 864), (512, 512), (3840, 2160), (640, 360)] + [
        tuple(int(v) for v in rng.integers(64, 4000, 2)) for _ in range(200)
    ]:
        assert fit_to_area(height, width, AREAS[area]) == reference_size(height, width, AREAS[area])


def test_the_issues_examples() -> None:
    assert generation_size(1920, 1080, "832*480") == (832, 464)  # a 9:16 photo: 464x832, not 480x832
    assert generation_size(1184, 864, "1024*576") == (896, 656)  # the reference's example photo
    assert fit_to_area(1184, 864, POSE_AREA) == (896, 656)  # its pose frames are drawn at 2x this
    assert generation_size(1184, 864, "832*480", force=(480, 832)) == (832, 480)


def test_default_shift_follows_the_area() -> None:
    assert default_shift("832*480") == default_shift("480*832") == 3.0
    assert default_shift("1024*576") == default_shift("1280*720") == 5.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: generation_size(100, 100, "640*640"), "area must be one of"),
        (lambda: generation_size(100, 100, "832*480", force=(480, 0)), r"both be 0 \(auto"),
        (lambda: generation_size(100, 100, "832*480", force=(481, 832)), "multiples of 16"),
        (lambda: fit_to_area(1, 4000, AREAS["832*480"]), "crop the reference image"),
        (lambda: fit_to_area(0, 10, AREAS["832*480"]), "no pixels"),
    ],
)
def test_bad_sizes_say_what_to_do(call, message: str) -> None:
    with pytest.raises(ConditioningError, match=message):
        call()


def test_resize_is_the_references_bicubic_in_minus_one_to_one_without_clamping() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 37, 23, 3), dtype=np.uint8)
    pixels[:, 10:20, 5:15] = 255  # hard edges: bicubic overshoots
    image = torch.from_numpy(pixels).float().div(255)
    got = resize_like_reference(image, 64, 48)
    # The reference: to_tensor, x*2-1, F.interpolate(bicubic) to (h, w), fed to the VAE as is.
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5), size=(64, 48), mode="bicubic"
    )
    assert torch.allclose(got.movedim(-1, 1) * 2 - 1, expected, atol=1e-6)
    assert float(got.max()) > 1.0 and float(got.min()) < 0.0  # overshoot kept
    assert resize_like_reference(torch.rand(1, 8, 8, 4), 8, 8).shape == (1, 8, 8, 3)


def test_resize_refuses_non_images() -> None:
    with pytest.raises(ConditioningError, match="expected images"):
        resize_like_reference(torch.zeros(8, 8, 3), 16, 16)

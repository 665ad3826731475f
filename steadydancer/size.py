"""The generation size and the resampling to it, as the reference computes them.

The reference derives the video size from the reference image: the largest size of the
chosen pixel area with the image's aspect ratio, both sides rounded down to multiples of 16
(docs/REFERENCE.md, "Generation size"). Everything that enters the VAE at that size (the
reference image, the pose frames) is resized with PyTorch's bicubic (no antialiasing) on
float values in [-1, 1], without clamping the overshoot.

Images are ComfyUI IMAGE tensors, [N, H, W, C] floats in 0..1.
"""

from __future__ import annotations

import math

import torch

from .errors import ConditioningError

SIZE_MULTIPLE = 16  # VAE stride 8 times the DiT's 2x2 patch

#: The reference's image-to-video sizes (its `--size` choices for i2v); only the area counts.
AREAS: dict[str, int] = {
    "720*1280": 720 * 1280,
    "1280*720": 1280 * 720,
    "480*832": 480 * 832,
    "832*480": 832 * 480,
    "576*1024": 576 * 1024,
    "1024*576": 1024 * 576,
    "1024*800": 1024 * 800,
}
DEFAULT_AREA = "832*480"
#: Areas at which the reference lowers the flow shift from 5.0 to 3.0.
LOW_SHIFT_AREAS = frozenset({"832*480", "480*832"})
#: The area the reference draws pose frames for (fixed in its pose alignment script).
POSE_AREA = 1024 * 576


def area_of(name: str) -> int:
    """Pixel area of one of the reference's sizes ("832*480", ...)."""
    if name not in AREAS:
        raise ConditioningError(f"area must be one of {list(AREAS)}; got {name!r}")
    return AREAS[name]


def default_shift(area: str) -> float:
    """The reference's flow shift for an area: 3.0 at 480p, 5.0 otherwise."""
    area_of(area)
    return 3.0 if area in LOW_SHIFT_AREAS else 5.0


def fit_to_area(height: int, width: int, area: int) -> tuple[int, int]:
    """(height, width) of the largest frame of `area` pixels with the aspect ratio of a
    height x width image, both sides rounded down to multiples of 16 (the reference's rule,
    with its float arithmetic)."""
    if height < 1 or width < 1:
        raise ConditioningError(f"the reference image has no pixels ({width}x{height})")
    if area < SIZE_MULTIPLE * SIZE_MULTIPLE:
        raise ConditioningError(f"area must be at least {SIZE_MULTIPLE * SIZE_MULTIPLE} pixels; got {area}")
    ratio = height / width
    out_h = int(math.sqrt(area * ratio) // SIZE_MULTIPLE) * SIZE_MULTIPLE
    out_w = int(math.sqrt(area / ratio) // SIZE_MULTIPLE) * SIZE_MULTIPLE
    if out_h < SIZE_MULTIPLE or out_w < SIZE_MULTIPLE:
        raise ConditioningError(
            f"a {width}x{height} image fitted to {area} pixels is {out_w}x{out_h}: a side is below "
            f"{SIZE_MULTIPLE}; crop the reference image to a less extreme aspect ratio or choose a larger area"
        )
    return out_h, out_w


def generation_size(height: int, width: int, area: str, *, force: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(height, width) to generate for a height x width reference image.

    `force` = (width, height): both 0 (auto) takes the reference's rule for `area`; both
    multiples of 16 are used as they are.
    """
    force_w, force_h = force
    if force_w == 0 and force_h == 0:
        return fit_to_area(height, width, area_of(area))
    if force_w <= 0 or force_h <= 0 or force_w % SIZE_MULTIPLE or force_h % SIZE_MULTIPLE:
        raise ConditioningError(
            f"width and height must both be 0 (auto: from the reference image and the area) or both "
            f"multiples of {SIZE_MULTIPLE}; got {force_w}x{force_h}"
        )
    return force_h, force_w


RESIZE_CHUNK = 8  # frames resized at once


def resize_like_reference(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE frames [N, H, W, C] (0..1) -> [N, height, width, 3], as the reference resizes
    what it encodes: bicubic (PyTorch's, no antialiasing, corners not aligned) on values
    mapped to [-1, 1], overshoot kept (values may leave 0..1 slightly, as in the reference).
    Frames already at the size are returned as they are (RGB channels only)."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ConditioningError(f"expected images [N, H, W, C>=3]; got shape {tuple(images.shape)}")
    rgb = images[..., :3]
    if rgb.shape[1:3] == (height, width):
        return rgb
    out = torch.empty((rgb.shape[0], height, width, 3), dtype=torch.float32, device=rgb.device)
    for start in range(0, rgb.shape[0], RESIZE_CHUNK):  # a long video's float copies stay a few frames
        signed = rgb[start : start + RESIZE_CHUNK].movedim(-1, 1).float().sub(0.5).div(0.5)
        resized = torch.nn.functional.interpolate(signed, size=(height, width), mode="bicubic", align_corners=False)
        out[start : start + RESIZE_CHUNK] = resized.add_(1.0).div_(2.0).movedim(1, -1)
    return out

"""CLIP vision input as the reference prepares it (docs/REFERENCE.md, "CLIP vision").

The reference squashes each image to the encoder's square size with PyTorch's bicubic (no
antialiasing, corners not aligned, whatever the aspect ratio), in float on values mapped to
[-1, 1], maps back to 0..1 and normalises with the encoder's mean and std: no 8-bit
rounding, no clamping. ComfyUI's own preprocessing antialiases (or centre-crops) and
rounds to 8 bits, which changes what a pose frame's thin lines look like to the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ConditioningError


def reference_clip_pixels(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """IMAGE [N, H, W, C] floats in 0..1 -> normalised pixel values [N, 3, size, size]."""
    if images.ndim != 4 or images.shape[-1] < 3 or images.shape[0] == 0:
        raise ConditioningError(f"expected a batch of images [N, H, W, C>=3]; got shape {tuple(images.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ConditioningError(f"mean and std need 3 values (RGB); got {list(mean)} and {list(std)}")
    signed = images[..., :3].movedim(-1, 1).float().sub(0.5).div(0.5)
    squashed = torch.nn.functional.interpolate(signed, size=(size, size), mode="bicubic", align_corners=False)
    unit = squashed.mul(0.5).add(0.5)
    m = torch.tensor(list(mean), dtype=unit.dtype, device=unit.device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=unit.dtype, device=unit.device).view(1, 3, 1, 1)
    return unit.sub(m).div(s)

"""CLIP vision input prepared as the reference prepares it (no antialiasing, no 8-bit rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steadydancer.clip_vision import reference_clip_pixels
from steadydancer.errors import ConditioningError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def reference(pixels: np.ndarray, size: int = 224) -> torch.Tensor:
    """The reference: to_tensor, x*2-1, bicubic to size x size, x*0.5+0.5, Normalize."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).sub_(0.5).div_(0.5)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul_(0.5).add_(0.5)
    return x.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))


def comfyui_like(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """What ComfyUI's CLIPVisionEncode (crop none) does instead: antialiased, rounded to 8 bits."""
    x = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(size, size), mode="bicubic", antialias=True)
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def pose_like_frame() -> np.ndarray:
    frame = np.zeros((1, 1184, 864, 3), dtype=np.uint8)
    frame[0, 300:900, 420:428] = (0, 0, 153)  # a thin dimmed limb
    frame[0, 500:508, 200:700] = (0, 85, 255)
    return frame


def test_pixels_are_the_references() -> None:
    pixels = np.concatenate([pose_like_frame(), np.random.default_rng(0).integers(0, 256, (1, 1184, 864, 3), dtype=np.uint8)])
    got = reference_clip_pixels(torch.from_numpy(pixels).float().div(255), 224, MEAN, STD)
    assert got.shape == (2, 3, 224, 224)
    assert torch.allclose(got, reference(pixels), atol=1e-6)


def test_comfyuis_preprocessing_differs_by_several_percent_on_pose_frames() -> None:
    pixels = pose_like_frame()
    image = torch.from_numpy(pixels).float().div(255)
    ours, comfy = reference_clip_pixels(image, 224, MEAN, STD), comfyui_like(image)
    relative = float((ours - comfy).norm() / ours.norm())
    assert relative > 0.02


def test_alpha_is_ignored_and_bad_input_refused() -> None:
    rgba = torch.rand(1, 30, 20, 4)
    assert torch.equal(reference_clip_pixels(rgba, 8, MEAN, STD), reference_clip_pixels(rgba[..., :3], 8, MEAN, STD))
    with pytest.raises(ConditioningError, match="batch of images"):
        reference_clip_pixels(torch.rand(30, 20, 3), 224, MEAN, STD)
    with pytest.raises(ConditioningError, match="3 values"):
        reference_clip_pixels(torch.rand(1, 30, 20, 3), 224, MEAN[:2], STD)

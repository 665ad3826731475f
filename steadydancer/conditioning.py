"""Shapes and tensors of SteadyDancer's conditioning (docs/REFERENCE.md, "Conditioning").

The ComfyUI conditioning node encodes images with ComfyUI's VAE and CLIP vision models;
what it does around those calls lives here so that it is tested without ComfyUI: the
frame-count rule (4k+1 frames, pose sequences padded or refused), the image-to-video mask,
and the 36-channel reference latents `ref_x` / `ref_c`.

Images are ComfyUI IMAGE tensors, [N, H, W, C] floats in 0..1. Latents are [B, 16, F, h, w].
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import ConditioningError

LATENT_CHANNELS = 16
MASK_CHANNELS = 4
TIME_STRIDE = 4
SPACE_STRIDE = 8
SIZE_MULTIPLE = 16  # VAE stride 8 times the DiT's 2x2 patch

ShortPolicy = Literal["pad", "loop", "error"]
SHORT_POLICIES: tuple[str, ...] = ("pad", "loop", "error")


def length_error(length: int) -> str | None:
    """Why `length` is not a valid video length (None when it is): the Wan VAE needs 4k+1."""
    if length < 1 or (length - 1) % TIME_STRIDE:
        lower = max(1, (length - 1) // TIME_STRIDE * TIME_STRIDE + 1)
        return f"length must be 4k+1 frames (1, 5, ..., 81, ...); got {length}: use {lower} or {lower + TIME_STRIDE}"
    return None


def size_error(width: int, height: int) -> str | None:
    """Why width x height cannot be generated (None when it can): both multiples of 16."""
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        return f"width and height must be multiples of {SIZE_MULTIPLE} (at least 16); got {width}x{height}"
    return None


def short_policy_error(short: str) -> str | None:
    """Why `short` is not a padding policy (None when it is)."""
    return None if short in SHORT_POLICIES else f"short_video must be one of {list(SHORT_POLICIES)}; got {short!r}"


def latent_frames(length: int) -> int:
    """Latent frames of a 4k+1-frame video (the first frame has its own latent frame)."""
    return (length - 1) // TIME_STRIDE + 1


def fit_frames(frames: torch.Tensor, length: int, *, short: ShortPolicy = "pad", what: str = "pose frames") -> torch.Tensor:
    """Exactly `length` frames: extra frames are dropped, a short sequence is padded or refused.

    `pad` repeats the last frame (the person holds the last pose), the reference pipeline's
    behaviour when a driving video is shorter than the generation; `loop` plays the frames
    again from the start (a dance loop filling a long video); `error` refuses.
    """
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ConditioningError(f"{what} must be a non-empty batch of images [N,H,W,C]; got shape {tuple(frames.shape)}")
    if short_policy_error(short):
        raise ConditioningError(short_policy_error(short))
    count = frames.shape[0]
    if count >= length:
        return frames[:length]
    if short == "error":
        raise ConditioningError(
            f"{what} has {count} frames but length is {length}: lower length to "
            f"{(count - 1) // TIME_STRIDE * TIME_STRIDE + 1}, use a longer driving video, or set "
            "short_video to 'pad' (holds the last pose) or 'loop' (plays the poses again)"
        )
    if short == "loop":
        return frames[torch.arange(length, device=frames.device) % count]
    padding = frames[-1:].expand(length - count, *frames.shape[1:])
    return torch.cat([frames, padding], dim=0)


def reference_video(reference: torch.Tensor, length: int) -> torch.Tensor:
    """The image-to-video input: the reference image, then `length - 1` frames of zeros.

    Zero in the model's [-1, 1] range is 0.5 in ComfyUI's [0, 1] images (what the reference
    code and ComfyUI's WanImageToVideo feed the VAE).
    """
    video = torch.full((length, *reference.shape[1:]), 0.5, dtype=reference.dtype, device=reference.device)
    video[:1] = reference[:1]
    return video


def image_to_video_mask(frames: int, height: int, width: int, *, device: torch.device | None = None) -> torch.Tensor:
    """ComfyUI's `concat_mask` for one known first frame: [1, 1, F, h, w], 0 = known.

    ComfyUI's Wan model turns it into the 4 mask channels of `y` (1 on the first latent frame).
    """
    mask = torch.ones((1, 1, frames, height, width), device=device)
    mask[:, :, :1] = 0.0
    return mask


def reference_latent(latent: torch.Tensor, mask_value: float) -> torch.Tensor:
    """ref_x / ref_c: cat(latent, 4 channels of `mask_value`, latent) -> [B, 36, 1, h, w].

    ref_x (reference image) uses ones, ref_c (first pose frame) zeros, as the reference code.
    """
    if latent.ndim != 5 or latent.shape[1] != LATENT_CHANNELS:
        raise ConditioningError(f"expected a VAE latent [B,16,F,h,w]; got shape {tuple(latent.shape)}")
    first = latent[:, :, :1]
    mask = torch.full((first.shape[0], MASK_CHANNELS, *first.shape[2:]), float(mask_value), dtype=first.dtype, device=first.device)
    return torch.cat([first, mask, first], dim=1)


def empty_latent(batch_size: int, length: int, height: int, width: int, *, device: torch.device | None = None) -> torch.Tensor:
    """The zero latent the sampler starts from: [batch, 16, F, height/8, width/8]."""
    return torch.zeros(
        (batch_size, LATENT_CHANNELS, latent_frames(length), height // SPACE_STRIDE, width // SPACE_STRIDE), device=device
    )

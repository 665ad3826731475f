"""CLIP vision encoding with the reference's preprocessing (docs/REFERENCE.md, "CLIP vision").

ComfyUI's CLIPVisionEncode antialiases (or crops) and rounds to 8 bits before the encoder;
the reference squashes with plain bicubic in float. This node runs ComfyUI's loaded CLIP
vision model (its device, dtype and model management) on the reference's pixels and returns
the CLIP_VISION_OUTPUT fields of ComfyUI's encode (image_sizes, which 0.3.64 does not set,
is always set). ComfyUI's own CLIPVisionEncode (crop "none") stays the alternative.
"""

from __future__ import annotations

import comfy.clip_vision
import comfy.model_management
import torch
from comfy_api.latest import io

from ..steadydancer.clip_vision import reference_clip_pixels
from ..steadydancer.errors import ConditioningError

# Encoders whose input is not a square image (patch-packed): the reference's squash does not apply.
UNSUPPORTED_TYPES = frozenset({"siglip2_vision_model"})


def encode_like_reference(
    clip_vision: comfy.clip_vision.ClipVisionModel, image: torch.Tensor
) -> comfy.clip_vision.Output:
    """ComfyUI's ClipVisionModel.encode_image with the reference's preprocessing."""
    model_type = getattr(clip_vision, "model_type", "clip_vision_model")
    if model_type in UNSUPPORTED_TYPES:
        raise ConditioningError(
            f"this CLIP vision model ({model_type}) takes patch-packed images; SteadyDancer uses CLIP ViT-H "
            "(clip_vision_h.safetensors): load that one, or use ComfyUI's CLIPVisionEncode"
        )
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixels = reference_clip_pixels(
        image.to(clip_vision.load_device),
        clip_vision.image_size,
        clip_vision.image_mean,
        clip_vision.image_std,
    ).float()
    all_states = bool(getattr(clip_vision, "return_all_hidden_states", False))
    out = clip_vision.model(pixel_values=pixels, intermediate_output="all" if all_states else -2)
    device = comfy.model_management.intermediate_device()
    outputs = comfy.clip_vision.Output()
    outputs["last_hidden_state"] = out[0].to(device)
    outputs["image_embeds"] = out[2].to(device)
    outputs["image_sizes"] = [pixels.shape[1:]] * pixels.shape[0]
    if all_states:
        hidden = out[1].to(device)
        outputs["penultimate_hidden_states"] = hidden[:, -2]
        outputs["all_hidden_states"] = hidden
    else:
        outputs["penultimate_hidden_states"] = out[1].to(device)
    outputs["mm_projected"] = out[3]
    return outputs


class SteadyDancerCLIPVisionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerCLIPVisionEncode",
            display_name="SteadyDancer CLIP Vision Encode",
            category="conditioning/video_models",
            description="CLIP vision features as the reference computes them: the image squashed to the encoder's "
            "size with plain bicubic in float (no antialiasing, no cropping, no 8-bit rounding).",
            inputs=[
                io.ClipVision.Input(
                    "clip_vision",
                    tooltip="CLIP ViT-H (clip_vision_h.safetensors), from Load CLIP Vision.",
                ),
                io.Image.Input(
                    "image",
                    tooltip="The reference image, or the first pose frame at the reference image's size "
                    "(SteadyDancer Pose Align 'clip_pose').",
                ),
            ],
            outputs=[io.ClipVisionOutput.Output()],
        )

    @classmethod
    def execute(
        cls, clip_vision: comfy.clip_vision.ClipVisionModel, image: torch.Tensor
    ) -> io.NodeOutput:
        return io.NodeOutput(encode_like_reference(clip_vision, image))


CLIP_NODES: list[type[io.ComfyNode]] = [SteadyDancerCLIPVisionEncode]

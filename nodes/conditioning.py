"""SteadyDancer's image-to-video conditioning node (ComfyUI's WanImageToVideo plus the pose path).

It VAE-encodes the reference image, the positive and the augmented negative pose videos and
stores them, with the CLIP vision features of the reference and of the first pose frame, on
the conditioning under the keys that `comfy_model.py` reads (docs: CONTRACTS, spec §5).
"""

from __future__ import annotations

import comfy.clip_vision
import comfy.model_management
import comfy.sd
import comfy.utils
import node_helpers
import torch
from comfy_api.latest import io

from ..steadydancer import conditioning as cond
from ..steadydancer.errors import ConditioningError

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


def _resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic resize of IMAGE frames to the generation size (stretching, as the reference does)."""
    if images.shape[1:3] == (height, width):
        return images[..., :3]
    resized = comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), width, height, "bicubic", "disabled")
    return resized.movedim(1, -1).clamp(0.0, 1.0)


def _first_frame_output(output: comfy.clip_vision.Output) -> comfy.clip_vision.Output:
    """The CLIP vision output of the first image only, when a whole batch was encoded."""
    if output.penultimate_hidden_states.shape[0] == 1:
        return output
    first = comfy.clip_vision.Output()
    for key, value in vars(output).items():
        first[key] = value[:1] if isinstance(value, torch.Tensor) else value
    return first


class SteadyDancerImageToVideo(io.ComfyNode):
    """positive/negative text conditioning + reference + pose videos -> the sampler's inputs."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerImageToVideo",
            display_name="SteadyDancer Image to Video",
            category="conditioning/video_models",
            description="Conditioning for SteadyDancer: the reference image animated by the pose frames. "
            "Outputs the text-positive, text-negative and pose-negative conditioning for the "
            "SteadyDancer guider, and the empty latent to sample.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Text conditioning of the prompt (umT5)."),
                io.Conditioning.Input("negative", tooltip="Text conditioning of the negative prompt."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.ClipVisionOutput.Input("clip_vision_reference", tooltip="CLIP vision output of the reference image (CLIPVisionEncode, crop 'none')."),
                io.ClipVisionOutput.Input("clip_vision_pose", tooltip="CLIP vision output of the first positive pose frame; of a batch only the first image is used."),
                io.Image.Input("reference_image", tooltip="The person to animate; only the first image is used."),
                io.Image.Input("pose_frames", tooltip="Aligned pose frames (SteadyDancer Pose Align 'positive')."),
                io.Image.Input("negative_pose_frames", tooltip="Augmented pose frames (SteadyDancer Pose Align 'negative')."),
                io.Int.Input("width", default=480, min=16, max=MAX_RESOLUTION, step=16, tooltip="Generation width; keep the reference's aspect ratio (images are stretched to this size)."),
                io.Int.Input("height", default=832, min=16, max=MAX_RESOLUTION, step=16, tooltip="Generation height, a multiple of 16."),
                io.Int.Input("length", default=81, min=1, max=MAX_RESOLUTION, step=4, tooltip="Frames to generate, 4k+1 (81 in the reference)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos sampled at once (different noise, same conditioning)."),
                io.Combo.Input("short_video", options=list(cond.SHORT_POLICIES), default="pad", tooltip="When the pose frames are fewer than length: 'pad' repeats the last pose, 'error' stops. Extra frames are ignored."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Conditioning.Output(display_name="pose_negative"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def validate_inputs(cls, length: int | None = None) -> bool | str:
        if length is None:  # linked from another node: checked when it runs
            return True
        return cond.length_error(length) or True

    @classmethod
    def execute(
        cls,
        positive: list[list],
        negative: list[list],
        vae: comfy.sd.VAE,
        clip_vision_reference: comfy.clip_vision.Output,
        clip_vision_pose: comfy.clip_vision.Output,
        reference_image: torch.Tensor,
        pose_frames: torch.Tensor,
        negative_pose_frames: torch.Tensor,
        width: int,
        height: int,
        length: int,
        batch_size: int,
        short_video: str = "pad",
    ) -> io.NodeOutput:
        problem = cond.length_error(length) or cond.size_error(width, height) or cond.short_policy_error(short_video)
        if problem:
            raise ConditioningError(problem)
        reference = _resize(reference_image[:1], width, height)
        pose = _resize(cond.fit_frames(pose_frames, length, short=short_video, what="pose_frames"), width, height)
        pose_neg = _resize(cond.fit_frames(negative_pose_frames, length, short=short_video, what="negative_pose_frames"), width, height)

        concat = vae.encode(cond.reference_video(reference, length))
        values = {
            "concat_latent_image": concat,
            "concat_mask": cond.image_to_video_mask(concat.shape[2], concat.shape[-2], concat.shape[-1], device=concat.device),
            "steadydancer_ref_x": cond.reference_latent(vae.encode(reference), 1.0),
            "steadydancer_ref_c": cond.reference_latent(vae.encode(pose[:1]), 0.0),
            "clip_vision_output": clip_vision_reference,
            "steadydancer_clip_c": _first_frame_output(clip_vision_pose),
        }
        pose_latent = vae.encode(pose)
        pose_neg_latent = vae.encode(pose_neg)
        latent = cond.empty_latent(batch_size, length, height, width, device=comfy.model_management.intermediate_device())
        return io.NodeOutput(
            node_helpers.conditioning_set_values(positive, {**values, "steadydancer_pose": pose_latent}),
            node_helpers.conditioning_set_values(negative, {**values, "steadydancer_pose": pose_latent}),
            node_helpers.conditioning_set_values(positive, {**values, "steadydancer_pose": pose_neg_latent}),
            {"samples": latent},
        )


CONDITIONING_NODES: list[type[io.ComfyNode]] = [SteadyDancerImageToVideo]

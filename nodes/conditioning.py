"""SteadyDancer's image-to-video conditioning (ComfyUI's WanImageToVideo plus the pose path).

SteadyDancer Image to Video VAE-encodes the reference image, the positive and the augmented
negative pose videos and stores them, with the CLIP vision features of the reference and of
the first pose frame, on the conditioning under the keys that `comfy_model.py` reads
(docs/REFERENCE.md, "Conditioning"). SteadyDancer Generation Size derives the video size
from the reference image as the reference does (docs/REFERENCE.md, "Generation size").
"""

from __future__ import annotations

import comfy.clip_vision
import comfy.model_management
import comfy.sd
import node_helpers
import torch
from comfy_api.latest import io

from nodes import MAX_RESOLUTION  # ComfyUI's own limit on sizes (its `nodes` module, not ours)

from ..steadydancer import conditioning as cond
from ..steadydancer.errors import ConditioningError
from ..steadydancer.size import AREAS, DEFAULT_AREA, generation_size, resize_like_reference
from .validation import choice_error, first_error, multiple_error, number_error


def _resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE frames at the generation size as the reference resizes them: stretched, PyTorch
    bicubic on [-1, 1] floats, overshoot not clamped (the VAE gets it, as in the reference)."""
    return resize_like_reference(images, height, width)


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
                io.Conditioning.Input(
                    "positive", tooltip="Text conditioning of the prompt (umT5)."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="Text conditioning of the negative prompt."
                ),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.ClipVisionOutput.Input(
                    "clip_vision_reference",
                    tooltip="CLIP vision output of the reference image (SteadyDancer CLIP Vision Encode; ComfyUI's "
                    "CLIPVisionEncode with crop 'none' preprocesses differently).",
                ),
                io.ClipVisionOutput.Input(
                    "clip_vision_pose",
                    tooltip="CLIP vision output of the first positive pose frame (SteadyDancer Pose Align "
                    "'clip_pose'); of a batch only the first image is used.",
                ),
                io.Image.Input(
                    "reference_image",
                    tooltip="The person to animate; only the first image is used.",
                ),
                io.Image.Input(
                    "pose_frames",
                    tooltip="Aligned pose frames (SteadyDancer Pose Align 'positive').",
                ),
                io.Image.Input(
                    "negative_pose_frames",
                    tooltip="Augmented pose frames (SteadyDancer Pose Align 'negative').",
                ),
                io.Int.Input(
                    "width",
                    default=480,
                    min=16,
                    max=MAX_RESOLUTION,
                    step=16,
                    tooltip="Generation width, from SteadyDancer Generation Size (images are stretched to this size).",
                ),
                io.Int.Input(
                    "height",
                    default=832,
                    min=16,
                    max=MAX_RESOLUTION,
                    step=16,
                    tooltip="Generation height, a multiple of 16, from SteadyDancer Generation Size.",
                ),
                io.Int.Input(
                    "length",
                    default=81,
                    min=1,
                    max=MAX_RESOLUTION,
                    step=4,
                    tooltip="Frames to generate, 4k+1 (81 in the reference).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Videos sampled at once (different noise, same conditioning).",
                ),
                io.Combo.Input(
                    "short_video",
                    options=list(cond.SHORT_POLICIES),
                    default="pad",
                    tooltip="When the pose frames are fewer than length: 'pad' holds the last pose (the reference's "
                    "way), 'loop' plays the poses again from the start (a dance loop for a long video), 'error' "
                    "stops. Extra frames are ignored.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Conditioning.Output(display_name="pose_negative"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        length: int | None = None,
        width: int | None = None,
        height: int | None = None,
        short_video: str | None = None,
    ) -> bool | str:
        return first_error(
            number_error("length", length, 1, MAX_RESOLUTION),
            None
            if length is None
            else cond.length_error(length),  # None: linked, checked when it runs
            multiple_error("width", width, cond.SIZE_MULTIPLE, cond.SIZE_MULTIPLE, MAX_RESOLUTION),
            multiple_error(
                "height", height, cond.SIZE_MULTIPLE, cond.SIZE_MULTIPLE, MAX_RESOLUTION
            ),
            choice_error("short_video", short_video, cond.SHORT_POLICIES),
        )

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
        problem = (
            cond.length_error(length)
            or cond.size_error(width, height)
            or cond.short_policy_error(short_video)
        )
        if problem:
            raise ConditioningError(problem)
        reference = _resize(reference_image[:1], width, height)
        pose = _resize(
            cond.fit_frames(pose_frames, length, short=short_video, what="pose_frames"),
            width,
            height,
        )
        pose_neg = _resize(
            cond.fit_frames(
                negative_pose_frames, length, short=short_video, what="negative_pose_frames"
            ),
            width,
            height,
        )

        concat = vae.encode(cond.reference_video(reference, length))
        values = {
            "concat_latent_image": concat,
            "concat_mask": cond.image_to_video_mask(
                concat.shape[2], concat.shape[-2], concat.shape[-1], device=concat.device
            ),
            "steadydancer_ref_x": cond.reference_latent(vae.encode(reference), 1.0),
            "steadydancer_ref_c": cond.reference_latent(vae.encode(pose[:1]), 0.0),
            "clip_vision_output": clip_vision_reference,
            "steadydancer_clip_c": _first_frame_output(clip_vision_pose),
        }
        pose_latent = vae.encode(pose)
        pose_neg_latent = vae.encode(pose_neg)
        latent = cond.empty_latent(
            batch_size, length, height, width, device=comfy.model_management.intermediate_device()
        )
        return io.NodeOutput(
            node_helpers.conditioning_set_values(
                positive, {**values, "steadydancer_pose": pose_latent}
            ),
            node_helpers.conditioning_set_values(
                negative, {**values, "steadydancer_pose": pose_latent}
            ),
            node_helpers.conditioning_set_values(
                positive, {**values, "steadydancer_pose": pose_neg_latent}
            ),
            {"samples": latent},
        )


class SteadyDancerGenerationSize(io.ComfyNode):
    """The reference's generation size: the reference image's aspect ratio at an area."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerGenerationSize",
            display_name="SteadyDancer Generation Size",
            category="conditioning/video_models",
            description="The video size as the reference derives it: the largest size of the chosen area with the "
            "reference image's aspect ratio, sides rounded down to multiples of 16 (a 9:16 photo at 832*480 gives "
            "464x832).",
            inputs=[
                io.Image.Input("reference_image", tooltip="The person to animate (first image)."),
                io.Combo.Input(
                    "area",
                    options=list(AREAS),
                    default=DEFAULT_AREA,
                    tooltip="The reference's sizes; only their area counts. Use flow shift 3.0 at 832*480 / 480*832, "
                    "5.0 otherwise.",
                ),
                io.Int.Input(
                    "width",
                    default=0,
                    min=0,
                    max=MAX_RESOLUTION,
                    step=16,
                    tooltip="0 (auto): from the reference image and the area. A multiple of 16 (with height) forces "
                    "the size.",
                ),
                io.Int.Input(
                    "height",
                    default=0,
                    min=0,
                    max=MAX_RESOLUTION,
                    step=16,
                    tooltip="0 (auto): from the reference image and the area. A multiple of 16 (with width) forces "
                    "the size.",
                ),
            ],
            outputs=[io.Int.Output(display_name="width"), io.Int.Output(display_name="height")],
        )

    @classmethod
    def validate_inputs(
        cls, area: str | None = None, width: int | None = None, height: int | None = None
    ) -> bool | str:
        return first_error(
            choice_error("area", area, AREAS),
            multiple_error(
                "width", width, cond.SIZE_MULTIPLE, cond.SIZE_MULTIPLE, MAX_RESOLUTION, zero=True
            ),
            multiple_error(
                "height", height, cond.SIZE_MULTIPLE, cond.SIZE_MULTIPLE, MAX_RESOLUTION, zero=True
            ),
        )

    @classmethod
    def execute(
        cls, reference_image: torch.Tensor, area: str, width: int = 0, height: int = 0
    ) -> io.NodeOutput:
        out_h, out_w = generation_size(*reference_image.shape[1:3], area, force=(width, height))
        return io.NodeOutput(out_w, out_h)


CONDITIONING_NODES: list[type[io.ComfyNode]] = [
    SteadyDancerGenerationSize,
    SteadyDancerImageToVideo,
]

"""Pose nodes: DWPose detector loader, pose extraction, and alignment to the reference person.

The work is done by the `pose` library (detection, alignment, augmentation, rendering); these
nodes convert between ComfyUI's types and the library's, find checkpoints in `models/dwpose`,
and connect ComfyUI's progress bar and Cancel button to the extraction.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import comfy.model_management
import comfy.utils
import cv2
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from nodes import MAX_RESOLUTION  # ComfyUI's own limit on sizes (its `nodes` module, not ours)

from ..pose import (
    align_poses,
    augment_poses,
    from_pose_keypoint,
    load_detector,
    reference_frame,
    render_sequence,
    to_pose_keypoint,
)
from ..pose.backends import COLOUR_ORDERS, PoseDetector
from ..pose.backends.onnx_backend import RUNTIMES as ONNX_RUNTIMES
from ..pose.errors import CheckpointNotFoundError, PoseCancelled, PoseError
from ..pose.types import Pose
from ..steadydancer.conditioning import SIZE_MULTIPLE
from ..steadydancer.size import POSE_AREA, fit_to_area, resize_like_reference
from .validation import choice_error, first_error, multiple_error

DWPOSE_FOLDER = "dwpose"
DWPOSE_EXTENSIONS = frozenset({".onnx", ".pth"})
BACKENDS = ("onnx", "mmpose")
MISSING_POLICIES = ("hold", "interpolate", "empty")
COLOURS = ("steadydancer", "controlnet")
PREVIEW_SIZE = 512
REFERENCE_DETECT_RESOLUTION = 1024  # the reference pipeline's

PoseDetectorType = io.Custom("STEADYDANCER_POSE_DETECTOR")
PoseKeypoint = io.Custom(
    "POSE_KEYPOINT"
)  # the controlnet_aux / OpenPose JSON list, one dict per frame


def register_dwpose_folder() -> None:
    """Make `models/dwpose` a ComfyUI model folder, keeping paths that extra_model_paths added.

    The extension set is replaced by a new one (never mutated): ComfyUI shares set objects
    between folder keys.
    """
    default = os.path.join(folder_paths.models_dir, DWPOSE_FOLDER)
    folder_paths.add_model_folder_path(DWPOSE_FOLDER, default, is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[DWPOSE_FOLDER]
    folder_paths.folder_names_and_paths[DWPOSE_FOLDER] = (
        paths,
        set(extensions) | DWPOSE_EXTENSIONS,
    )


#: frames per detector call by default (a GPU is mostly idle at one)
POSE_BATCH = 8
#: threads drawing pose frames (the host's cores, at most 8: beyond that PIL and OpenCV's
#: own threads compete)
RENDER_THREADS = max(1, min(8, os.cpu_count() or 1))


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE [N,H,W,C] floats in 0..1 -> RGB uint8 [N,H,W,3], the pose library's input."""
    return (images[..., :3].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def to_image(frames: np.ndarray) -> torch.Tensor:
    """RGB uint8 [N,H,W,3] -> ComfyUI IMAGE floats in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)


def preview_size(height: int, width: int, longest: int = PREVIEW_SIZE) -> tuple[int, int]:
    """The preview's size: the frames' aspect ratio, longest side at most `longest` pixels
    (81 full-HD float frames would take 2 GB for a picture to look at)."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def pose_draw_size(reference_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the reference draws pose frames for: the reference image fitted to
    1024x576 pixels (its pose script's fixed area), whatever the generation size."""
    return fit_to_area(*reference_size, POSE_AREA)


def render_at_size(
    poses: list[Pose], reference_size: tuple[int, int], width: int, height: int, colours: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames at the generation size, the first frame at the reference image's size).

    The reference's chain (docs/REFERENCE.md, "Pose frames"): drawn at twice the reference
    fitted to 1024x576, PIL bicubic to the reference image's size, then PyTorch bicubic on
    [-1, 1] floats to the generation size (overshoot kept, as the reference feeds its VAE).
    One frame at a time: 81 frames at a large reference's size never sit in memory.
    """
    if not poses:
        raise PoseError("no pose frames to draw: the driving video has no frames after align_frame")
    draw = pose_draw_size(reference_size)
    frames = torch.empty((len(poses), height, width, 3), dtype=torch.float32)
    first = None

    def draw_one(item: tuple[int, Pose]) -> tuple[torch.Tensor | None, torch.Tensor]:
        index, pose = item
        full = to_image(reference_frame(pose, draw, reference_size, colours=colours)[None])
        return (full if index == 0 else None), resize_like_reference(full, height, width)[0]

    # Drawing (OpenCV), PIL's resize and PyTorch's conversions release the GIL: whole frames
    # are made on several threads (the main thread only stores them), a chunk at a time, so
    # only a few full-size drawings exist at once.
    with ThreadPoolExecutor(RENDER_THREADS) as pool:
        for start in range(0, len(poses), RENDER_THREADS):
            release_freed_memory()
            chunk = list(enumerate(poses[start : start + RENDER_THREADS], start))
            for (index, _), (full, resized) in zip(chunk, pool.map(draw_one, chunk), strict=True):
                first = full if full is not None else first
                frames[index] = resized
    return frames, first


def reference_for_detection(image: torch.Tensor) -> torch.Tensor:
    """The reference image as the reference detects its pose: first resized (OpenCV bicubic,
    8 bits) to its 1024x576-area size, so the pose is normalised to that size."""
    height, width = pose_draw_size(tuple(image.shape[1:3]))
    resized = cv2.resize(
        to_uint8_frames(image[:1])[0], (width, height), interpolation=cv2.INTER_CUBIC
    )
    return to_image(resized[None])


def detector_device() -> str:
    """ComfyUI's device for the detector: the CPU under --cpu, else ComfyUI's GPU (the onnx
    backend's `auto` runtime then runs the files with torch where onnxruntime has no CUDA)."""
    device = comfy.model_management.get_torch_device()
    return "cpu" if device.type == "cpu" else str(device)


def _load_from_folders(backend: str, colour_order: str = "reference", runtime: str = "auto") -> PoseDetector:
    """The detector from the first `dwpose` folder holding this backend's checkpoints."""
    folders = folder_paths.get_folder_paths(DWPOSE_FOLDER)
    first_error: CheckpointNotFoundError | None = None
    for folder in folders:
        try:
            return load_detector(
                backend, folder, device=detector_device(), colour_order=colour_order, runtime=runtime
            )
        except CheckpointNotFoundError as error:
            first_error = first_error or error
    raise CheckpointNotFoundError(
        f"no {backend} DWPose checkpoints in any dwpose folder ({', '.join(folders)}): {first_error}"
    )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        return None


def release_freed_memory() -> None:
    """Give memory freed by the previous frame back to the system (glibc only).

    glibc keeps large per-frame buffers (resized frames, network inputs, drawings) in its
    heap instead of returning them, so a loop over a long video grew by about one frame per
    frame (measured: 0.45 GiB over 97 frames of 832x480 in Pose Extract, 0.025 GiB with this
    called per batch; benchmarks/pose_nodes_memory.py).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Uint8Frames:
    """ComfyUI IMAGE frames as the pose library's uint8 RGB frames, converted a batch at a time
    (a FrameSource): 481 full-HD frames are 3 GB more as one uint8 copy. What the previous
    batch freed is given back first (`release_freed_memory`)."""

    dtype = np.uint8

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.shape = (*images.shape[:3], 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        release_freed_memory()
        return to_uint8_frames(self.images[index])


def _detect(
    detector: PoseDetector,
    images: torch.Tensor,
    detect_resolution: int,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Pose | None]:
    """Run the detector with ComfyUI's Cancel: an interrupt stops it between batches."""
    try:
        return detector.detect(
            Uint8Frames(images),
            detect_resolution=detect_resolution,
            batch_size=batch_size,
            progress=progress,
            should_cancel=comfy.model_management.processing_interrupted,
        )
    except PoseCancelled:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise


class SteadyDancerPoseDetectorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerPoseDetectorLoader",
            display_name="SteadyDancer Pose Detector Loader (DWPose)",
            category="SteadyDancer/pose",
            description="Loads DWPose (YOLOX-L person detector + DWPose-L whole-body model) from models/dwpose.",
            inputs=[
                io.Combo.Input(
                    "backend",
                    options=list(BACKENDS),
                    default="onnx",
                    tooltip="onnx: yolox_l.onnx + dw-ll_ucoco_384.onnx (run by onnxruntime or PyTorch, see onnx_runtime). "
                    "mmpose: the reference "
                    "pipeline (mmpose/mmdet/mmcv) with yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth + "
                    "dw-ll_ucoco_384.pth.",
                ),
                io.Combo.Input(
                    "colour_order",
                    options=list(COLOUR_ORDERS),
                    default="reference",
                    tooltip="reference: the channel orders the reference pipeline hands the networks (YOLOX gets "
                    "RGB, DWPose BGR), which SteadyDancer's training poses came from. trained: the orders the "
                    "networks were trained on (YOLOX BGR, DWPose RGB).",
                ),
                io.Combo.Input(
                    "onnx_runtime",
                    options=list(ONNX_RUNTIMES),
                    default="auto",
                    optional=True,
                    tooltip="onnx backend only. auto: onnxruntime on the CPU or where its build has CUDA, "
                    "otherwise the same ONNX files run with PyTorch on ComfyUI's GPU. torch: always PyTorch. "
                    "onnxruntime: always onnxruntime (the CPU when it has no CUDA).",
                ),
            ],
            outputs=[PoseDetectorType.Output(display_name="pose_detector")],
        )

    @classmethod
    def validate_inputs(
        cls, backend: str | None = None, colour_order: str | None = None, onnx_runtime: str | None = None
    ) -> bool | str:
        return first_error(
            choice_error("backend", backend, BACKENDS),
            choice_error("colour_order", colour_order, COLOUR_ORDERS),
            choice_error("onnx_runtime", onnx_runtime, ONNX_RUNTIMES),
        )

    @classmethod
    def execute(cls, backend: str, colour_order: str = "reference", onnx_runtime: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(_load_from_folders(backend, colour_order, onnx_runtime))


class SteadyDancerPoseExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerPoseExtract",
            display_name="SteadyDancer Pose Extract",
            category="SteadyDancer/pose",
            description="Whole-body poses of every frame (e.g. from LoadVideo + GetVideoComponents), one person per "
            "frame.",
            inputs=[
                PoseDetectorType.Input(
                    "pose_detector", tooltip="From SteadyDancer Pose Detector Loader."
                ),
                io.Image.Input(
                    "images",
                    tooltip="Frames of the driving video (LoadVideo + GetVideoComponents).",
                ),
                io.Int.Input(
                    "detect_resolution",
                    default=1024,
                    min=64,
                    max=4096,
                    step=64,
                    tooltip="Short side the frames are resized to for detection (reference: 1024).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=POSE_BATCH,
                    min=1,
                    max=64,
                    tooltip="Frames per detector call; the progress bar and Cancel act between batches. On a GPU "
                    "8 is 2.3x faster than 1 (the torch runtime sends whole batches even to the public one-frame "
                    "files, after checking that they give the same); onnxruntime runs those one frame at a time.",
                ),
            ],
            outputs=[
                PoseKeypoint.Output(display_name="poses"),
                io.Image.Output(
                    display_name="preview",
                    tooltip="The detected poses, drawn at most 512 pixels wide/high.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        pose_detector: PoseDetector,
        images: torch.Tensor,
        detect_resolution: int,
        batch_size: int = POSE_BATCH,
    ) -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(images.shape[0])
        progress = lambda done, total: bar.update_absolute(done, total)  # noqa: E731
        poses = _detect(pose_detector, images, detect_resolution, batch_size, progress)
        height, width = preview_size(*images.shape[1:3])
        preview = torch.empty((len(poses), height, width, 3), dtype=torch.float32)
        for index, pose in enumerate(poses):  # frame by frame: no uint8 copy of the whole preview
            preview[index] = to_image(render_sequence([pose], height, width, supersample=1))[0]
        return io.NodeOutput(to_pose_keypoint(poses), preview)


class SteadyDancerPoseAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerPoseAlign",
            display_name="SteadyDancer Pose Align",
            category="SteadyDancer/pose",
            description="Fits the driving poses to the reference person's proportions and position (positive) "
            "and draws randomly scaled copies (negative, for pose guidance), both rendered through the reference's "
            "chain (2x the reference fitted to 1024x576, PIL bicubic to the reference's size, bicubic to the "
            "generation size).",
            inputs=[
                io.Image.Input("reference_image", tooltip="The person to animate (first image)."),
                PoseKeypoint.Input(
                    "driving_poses",
                    tooltip="Poses of the driving video (SteadyDancer Pose Extract).",
                ),
                io.Int.Input(
                    "width",
                    default=480,
                    min=16,
                    max=MAX_RESOLUTION,
                    step=16,
                    tooltip="Generation width (from SteadyDancer Generation Size, as in the conditioning node).",
                ),
                io.Int.Input(
                    "height",
                    default=832,
                    min=16,
                    max=MAX_RESOLUTION,
                    step=16,
                    tooltip="Generation height (from SteadyDancer Generation Size).",
                ),
                io.Int.Input(
                    "align_frame",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Driving frames skipped at the start; the first used frame sets the limb scales.",
                ),
                io.Combo.Input(
                    "missing_person",
                    options=list(MISSING_POLICIES),
                    default="hold",
                    tooltip="Frames without a person: hold the previous pose, interpolate between neighbours, or "
                    "leave the frame empty.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the random scales of the negative poses.",
                ),
                io.Combo.Input(
                    "colours",
                    options=list(COLOURS),
                    default="steadydancer",
                    tooltip="steadydancer: the colours the model was trained on. controlnet: OpenPose ControlNet "
                    "colours.",
                ),
                PoseDetectorType.Input(
                    "pose_detector",
                    optional=True,
                    tooltip="Detects the reference pose (on the reference resized to its 1024x576-area size, at "
                    "resolution 1024, as the reference); not needed when reference_pose is connected.",
                ),
                PoseKeypoint.Input(
                    "reference_pose",
                    optional=True,
                    tooltip="Pose of the reference image, instead of detecting it.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="positive",
                    tooltip="Aligned pose frames at the generation size (float, bicubic overshoot kept as the "
                    "reference feeds its VAE).",
                ),
                io.Image.Output(
                    display_name="negative", tooltip="Augmented pose frames, for pose guidance."
                ),
                io.Image.Output(
                    display_name="clip_pose",
                    tooltip="The first positive frame at the reference image's size: what the reference gives CLIP "
                    "vision (SteadyDancer CLIP Vision Encode).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        missing_person: str | None = None,
        width: int | None = None,
        height: int | None = None,
        colours: str | None = None,
    ) -> bool | str:
        # width=70 would otherwise pass /prompt and fail after minutes of pose extraction and encoding
        return first_error(
            choice_error("missing_person", missing_person, MISSING_POLICIES),
            choice_error("colours", colours, COLOURS),
            multiple_error("width", width, SIZE_MULTIPLE, SIZE_MULTIPLE, MAX_RESOLUTION),
            multiple_error("height", height, SIZE_MULTIPLE, SIZE_MULTIPLE, MAX_RESOLUTION),
        )

    @classmethod
    def execute(
        cls,
        reference_image: torch.Tensor,
        driving_poses: list[dict],
        width: int,
        height: int,
        align_frame: int,
        missing_person: str,
        seed: int,
        colours: str = "steadydancer",
        pose_detector: PoseDetector | None = None,
        reference_pose: list[dict] | None = None,
    ) -> io.NodeOutput:
        reference = _reference_pose(reference_image[:1], pose_detector, reference_pose)
        aligned = align_poses(
            reference,
            from_pose_keypoint(driving_poses),
            align_frame=align_frame,
            missing=missing_person,
        )
        augmented = augment_poses(aligned, seed)
        size = tuple(reference_image.shape[1:3])
        positive, clip_pose = render_at_size(aligned, size, width, height, colours)
        negative, _ = render_at_size(augmented, size, width, height, colours)
        return io.NodeOutput(positive, negative, clip_pose)


def _reference_pose(
    image: torch.Tensor, detector: PoseDetector | None, keypoints: list[dict] | None
) -> Pose | None:
    """The reference person's pose (None: no person, which align_poses reports clearly)."""
    if keypoints is not None:
        poses = from_pose_keypoint(keypoints[:1])
    elif detector is not None:
        poses = _detect(detector, reference_for_detection(image), REFERENCE_DETECT_RESOLUTION)
    else:
        raise PoseError(
            "SteadyDancer Pose Align needs the reference pose: connect pose_detector or reference_pose"
        )
    return poses[0] if poses else None


POSE_NODES: list[type[io.ComfyNode]] = [
    SteadyDancerPoseDetectorLoader,
    SteadyDancerPoseExtract,
    SteadyDancerPoseAlign,
]

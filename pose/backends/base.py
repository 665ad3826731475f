"""The backend interface: frames in, one Pose (or None) per frame out.

Subclasses only turn a batch of detection-resolution BGR images into 133 whole-body
keypoints per image; batching, the detect-resolution resize, the channel order, conversion
to the OpenPose layout, progress and cancellation live here, identical for every backend.

Channel order (`colour_order`): a backend hands YOLOX its input as given and DWPose the
input with its channels swapped, so BGR input is what each network was trained on. The
reference pipeline reads frames with OpenCV (BGR) and converts them "RGB to BGR" before
detection, so its networks get RGB (YOLOX) and BGR (DWPose), the reverse of their
training; SteadyDancer was trained on poses extracted that way. "reference" (the default)
reproduces it by handing the backend RGB; "trained" hands it BGR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np

from ..errors import PoseCancelled, PoseFormatError
from ..keypoints import wholebody_to_pose
from ..types import Pose
from .geometry import resize_for_detection

Progress = Callable[[int, int], None]
ShouldCancel = Callable[[], bool]
#: (keypoints [133, 2] in pixels of the image given, scores [133]) of the first person.
WholeBody = tuple[np.ndarray, np.ndarray]
ColourOrder = Literal["reference", "trained"]
COLOUR_ORDERS: tuple[str, ...] = ("reference", "trained")


def check_colour_order(colour_order: str) -> str:
    if colour_order not in COLOUR_ORDERS:
        raise PoseFormatError(
            f"colour_order must be one of {list(COLOUR_ORDERS)} (reference: the channel orders of the "
            f"reference pipeline; trained: those the networks were trained on); got {colour_order!r}"
        )
    return colour_order


class FrameSource(Protocol):
    """Frames produced a slice at a time: `shape` (N, H, W, 3), `dtype` uint8, and
    `source[a:b]` a uint8 RGB array [b-a, H, W, 3]. What `detect` takes besides an array, so
    that a long video never exists as one full-size uint8 copy (e.g. ComfyUI's float frames
    converted batch by batch)."""

    shape: tuple[int, ...]
    dtype: Any

    def __getitem__(self, index: slice) -> np.ndarray: ...


def validate_frames(frames: np.ndarray | FrameSource) -> np.ndarray | FrameSource:
    if not isinstance(frames, np.ndarray) and hasattr(frames, "shape") and hasattr(frames, "__getitem__"):
        shape, dtype = tuple(frames.shape), np.dtype(frames.dtype)  # a FrameSource: not materialised
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise PoseFormatError(f"frames must be uint8 RGB [N, H, W, 3], got {dtype} {list(shape)}")
        if shape[1] < 2 or shape[2] < 2:
            raise PoseFormatError(f"frames are too small to detect anything: {list(shape)}")
        return frames
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise PoseFormatError(
            f"frames must be uint8 RGB [N, H, W, 3] (or one [H, W, 3] image), got "
            f"{frames.dtype} {list(frames.shape)}"
        )
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise PoseFormatError(f"frames are too small to detect anything: {list(frames.shape)}")
    return frames


class PoseDetector(ABC):
    """A loaded DWPose pipeline (person detector + whole-body pose model)."""

    #: "onnx" or "mmpose"
    backend: str = ""
    #: where the networks run, e.g. "cpu", "cuda:0" (informational)
    device: str = "cpu"
    #: channel orders handed to the networks (module docstring)
    colour_order: ColourOrder = "reference"

    @abstractmethod
    def estimate(self, images: list[np.ndarray]) -> list[WholeBody]:
        """BGR uint8 images (one batch, sizes may differ) -> the first person's 133 points.

        The first person is the best-scoring box after the reference's filtering; with no
        box, the whole image is used as the box.
        """

    def detect(
        self,
        frames: np.ndarray | FrameSource,
        *,
        detect_resolution: int = 1024,
        batch_size: int = 8,
        progress: Progress | None = None,
        should_cancel: ShouldCancel | None = None,
    ) -> list[Pose | None]:
        """uint8 RGB frames [N, H, W, 3] (an array or a FrameSource) -> one Pose per frame
        (None: nobody visible); frames are read one batch at a time.

        Each frame is resized so its short side is `detect_resolution` (multiples of 64),
        as the reference does before detecting, and handed to the networks in the channel
        orders `colour_order` says. `progress(done, total)` is called after
        each batch; `should_cancel()` is checked before each batch and raises PoseCancelled.
        """
        frames = validate_frames(frames)
        if detect_resolution < 64:
            raise PoseFormatError(f"detect_resolution must be at least 64, got {detect_resolution}")
        if batch_size < 1:
            raise PoseFormatError(f"batch_size must be at least 1, got {batch_size}")
        swap = check_colour_order(self.colour_order) == "trained"  # RGB -> BGR
        try:
            return self._detect(frames, detect_resolution, batch_size, swap, progress, should_cancel)
        finally:
            self.release()

    def release(self) -> None:
        """Free what a backend keeps on the device between calls (the torch runtime's
        weights); called after each `detect`. Nothing by default."""
        return None

    def _detect(
        self,
        frames: np.ndarray | FrameSource,
        detect_resolution: int,
        batch_size: int,
        swap: bool,
        progress: Progress | None,
        should_cancel: ShouldCancel | None,
    ) -> list[Pose | None]:
        total = frames.shape[0]
        height, width = frames.shape[1:3]
        poses: list[Pose | None] = []
        for start in range(0, total, batch_size):
            if should_cancel is not None and should_cancel():
                raise PoseCancelled(f"pose extraction cancelled after {start} of {total} frames")
            resized = [resize_for_detection(frame, detect_resolution) for frame in frames[start : start + batch_size]]
            images = [np.ascontiguousarray(image[..., ::-1] if swap else image) for image in resized]
            for image, (keypoints, scores) in zip(images, self.estimate(images), strict=True):
                pose = wholebody_to_pose(
                    keypoints, scores, width, height, detect_size=(image.shape[1], image.shape[0])
                )
                poses.append(None if pose.is_empty else pose)
            if progress is not None:
                progress(len(poses), total)
        return poses

    def detect_image(self, image: np.ndarray, *, detect_resolution: int = 1024) -> Pose | None:
        """One uint8 RGB image [H, W, 3] -> Pose or None."""
        return self.detect(
            validate_frames(image), detect_resolution=detect_resolution, batch_size=1
        )[0]

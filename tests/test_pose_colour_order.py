"""Which channel order the detector hands the networks (the reference's, or their training's)."""

from __future__ import annotations

import numpy as np
import pytest

from pose.backends import COLOUR_ORDERS, load_detector
from pose.backends.base import PoseDetector
from pose.errors import PoseFormatError


class Recording(PoseDetector):
    """A backend that records the images it gets (BGR is what a backend's networks expect)."""

    backend = "recording"

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []

    def estimate(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        self.images.extend(images)
        return [(np.zeros((133, 2)), np.zeros(133)) for _ in images]


def frame() -> np.ndarray:
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    return rgb


def test_reference_order_hands_the_backend_rgb_as_the_reference_pipeline_does() -> None:
    """The reference reads BGR frames and converts them 'RGB to BGR' before detecting: its
    networks get RGB where they expect BGR. The default reproduces that."""
    detector = Recording()
    assert detector.colour_order == "reference"
    detector.detect(frame()[None], detect_resolution=64)
    assert detector.images[0][0, 0].tolist() == [200, 0, 0]


def test_trained_order_hands_the_backend_bgr() -> None:
    detector = Recording()
    detector.colour_order = "trained"
    detector.detect(frame()[None], detect_resolution=64)
    assert detector.images[0][0, 0].tolist() == [0, 0, 200]


def test_unknown_order_is_refused_with_the_choices(tmp_path) -> None:
    detector = Recording()
    detector.colour_order = "rgb"
    with pytest.raises(PoseFormatError, match="colour_order must be one of"):
        detector.detect(frame()[None], detect_resolution=64)
    with pytest.raises(PoseFormatError, match=r"\['reference', 'trained'\]"):
        load_detector("onnx", tmp_path, colour_order="bgr")
    assert COLOUR_ORDERS == ("reference", "trained")

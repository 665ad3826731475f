"""Exceptions of the pose package; each message says what was wrong and what to do."""

from __future__ import annotations


class PoseError(Exception):
    """Base class for problems the user can act on."""


class MissingPersonError(PoseError, ValueError):
    """No person was found where one is required (the reference image, the first used frame)."""


class PoseDependencyError(PoseError, ImportError):
    """An optional package (mmpose stack, onnxruntime) is needed; the message names it."""


class CheckpointNotFoundError(PoseError, FileNotFoundError):
    """A detector or pose checkpoint is missing; the message names the file and the folder."""


class PoseCancelled(PoseError):
    """Extraction was stopped by the caller's cancellation check."""


class PoseFormatError(PoseError, ValueError):
    """Pose data (arrays, POSE_KEYPOINT JSON, options) has the wrong shape or content."""


class InvalidCheckpointError(PoseError, ValueError):
    """A checkpoint file exists but is not the model expected (wrong file, corrupt, wrong layout)."""

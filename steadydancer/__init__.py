"""SteadyDancer as a plain PyTorch library: the DiT, its GGUF weights, attention and guidance.

Nothing here imports ComfyUI; nothing heavy happens at import.
"""

from .errors import (
    AttentionBackendError,
    GGUFError,
    MissingDependencyError,
    ModelFileError,
    SteadyDancerError,
    UnsupportedQuantError,
)

__all__ = [
    "AttentionBackendError",
    "GGUFError",
    "MissingDependencyError",
    "ModelFileError",
    "SteadyDancerError",
    "UnsupportedQuantError",
]

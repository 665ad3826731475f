"""Tiny SteadyDancer weight files in the published layouts, for the tests and the ComfyUI checks.

Imports only torch and safetensors: `comfyui_model_checks.py` uses it from ComfyUI's Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

CONTAINER_PREFIX = "model.diffusion_model."


def scaled_fp8(sd: Mapping[str, torch.Tensor], scale_name: str = "scale_weight") -> dict[str, torch.Tensor]:
    """Kijai's "fp8_e4m3fn_scaled" layout of `sd`: 2-D+ weights (the pose path's aside) as fp8
    with one float32 scale each, the rest bf16, a `scaled_fp8` marker, container prefixes."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim >= 2 and "condition_embedding" not in k:
            scale = v.abs().max() / 448.0
            out[CONTAINER_PREFIX + k] = (v / scale).to(torch.float8_e4m3fn)
            out[f"{CONTAINER_PREFIX}{k[: -len('weight')]}{scale_name}"] = scale.reshape(1).float()
        else:
            out[CONTAINER_PREFIX + k] = v.to(torch.bfloat16)
    return out


def write_safetensors(path: Path, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """`sd` (optionally cast to `dtype`) as a .safetensors file with container prefixes."""
    save_file({CONTAINER_PREFIX + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in sd.items()}, str(path))

"""Read SteadyDancer weights from the published file formats into a state dict.

- `.gguf` (MCG-NJU/SteadyDancer-GGUF and our converter): quantised tensors stay packed
  (GGMLTensor over the memory map), see steadydancer.gguf.loader.
- `.safetensors` in bf16/fp16/fp32 (MCG-NJU/SteadyDancer-14B, Kijai's bf16 file): as stored.
- `.safetensors` in fp8 (Kijai's `*_fp8_e4m3fn_scaled_KJ.safetensors`, ComfyUI's "scaled fp8"):
  each fp8 `<layer>.weight` comes with a float32 `<layer>.scale_weight` (ComfyUI's newer
  name: `<layer>.weight_scale`), one value per tensor (or per output row); the weight is
  fp8 * scale. A `scaled_fp8` marker tensor and activation scales (`scale_input`,
  `input_scale`) carry no weights and are dropped. fp8 without scales means scale 1.
  fp8 weights are dequantised to `dtype` here, or with `keep_fp8` kept as `Fp8Tensor`s (fp8
  in memory, expanded per forward pass by the model's layers: steadydancer.quantized).
Names lose their container prefix (`model.diffusion_model.` ...). The file is refused with
ModelFileError when it is not a Wan model or lacks the pose path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import ModelFileError
from .keys import checked_state_dict, strip_prefix
from .quantized import FP8_DTYPES, Fp8Tensor

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED_SUFFIXES = (".scale_input", ".input_scale")
MARKERS = ("scaled_fp8",)


def load_weights(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    require_pose_path: bool = True,
) -> dict[str, torch.Tensor]:
    """The prefix-stripped state dict of a SteadyDancer weights file (see the module doc)."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        from .gguf.loader import load_gguf_state_dict

        return load_gguf_state_dict(p, require_pose_path=require_pose_path)
    if suffix == ".safetensors":
        return from_safetensors(_read_safetensors(p), dtype=dtype, source=str(p), require_pose_path=require_pose_path)
    raise ModelFileError(
        f"{p}: unsupported file type {suffix or '(none)'}; SteadyDancer weights are .gguf or .safetensors"
    )


def from_safetensors(
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    source: str = "the weights",
    require_pose_path: bool = True,
    keep_fp8: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict of the tensors of a SteadyDancer .safetensors file, however it was read.

    Drops container prefixes and applies the scaled-fp8 convention (module doc); the tensors
    themselves are kept (a caller's memory-mapped tensors stay memory-mapped), except fp8
    weights, which become `dtype`, or with `keep_fp8` `Fp8Tensor`s over the same fp8 data.
    """
    sd = {strip_prefix(k): v for k, v in tensors.items()}
    sd = dequantize_fp8(sd, dtype, source=source, keep=keep_fp8)
    return checked_state_dict(sd, source) if require_pose_path else sd


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    raw: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                raw[key] = f.get_tensor(key)
    except SafetensorError as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file: {exc}") from exc
    return raw


def dequantize_fp8(
    sd: dict[str, torch.Tensor], dtype: torch.dtype, *, source: str = "the weights", keep: bool = False
) -> dict[str, torch.Tensor]:
    """Apply the scaled-fp8 convention: fp8 weight * its scale -> `dtype` (or, with `keep`, an
    `Fp8Tensor` of the fp8 weight and its scale); drop scale tensors."""
    scales: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in MARKERS or key.endswith(DROPPED_SUFFIXES):
            continue
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            scales[key[: -len(suffix)] + ".weight"] = value
        else:
            out[key] = value
    for key, value in out.items():
        scale = scales.pop(key, None)
        if value.dtype in FP8_DTYPES:
            out[key] = _kept(key, value, scale, source) if keep else _scaled(key, value, scale, dtype, source)
        elif scale is not None and not _is_one(scale):
            raise ModelFileError(
                f"{source}: {key} is {value.dtype} but has a scale; only fp8 weights are scaled"
            )
    if scales:
        raise ModelFileError(f"{source}: scales without a weight: {', '.join(sorted(scales)[:8])}")
    return out


def _is_one(scale: torch.Tensor) -> bool:
    return bool(torch.all(scale.float() == 1.0))


def _kept(key: str, weight: torch.Tensor, scale: torch.Tensor | None, source: str) -> Fp8Tensor:
    try:
        return Fp8Tensor(weight, scale=scale)
    except ModelFileError as exc:
        raise ModelFileError(
            f"{source}: {key}: {exc}; the file's scale of {key} does not belong to this weight"
        ) from None


def _scaled(
    key: str, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, source: str
) -> torch.Tensor:
    # one implementation of fp8 * scale: the kept tensor's, expanded now
    return _kept(key, weight, scale, source).dequantize(dtype)

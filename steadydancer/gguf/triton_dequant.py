"""Fused GPU dequantisation of GGUF blocks with Triton (Q4_K, Q5_K, Q6_K, Q8_0).

Why: the plain PyTorch dequant in `dequant.py` runs as a chain of element-wise kernels
(split, shift, mask, cast, multiply, subtract), each a full pass over device memory. A
quantised model dequantises every weight on every forward, so on a GPU those passes add up.
Here each quant type is ONE kernel: it reads the packed bytes once and writes the output
dtype once.

Bit-exactness with `gguf.quants.dequantize` (and so with `dequant.py`) holds by
construction, not by tolerance. Every value is computed in float32 in the same order as the
reference: `d*scale` (fp16 mantissa x a 6- or 8-bit integer: exact in float32), then times
the quant (still exact for Q4_K/Q5_K; one rounding for Q6_K, as in the reference), then
minus `dmin*min` (exact) for the K types with a minimum. Because `d*scale*q` is exact, a
fused multiply-add that the compiler may form rounds exactly like the reference's separate
multiply and subtract. The float32 result is then cast to the requested dtype with
round-to-nearest-even, as `Tensor.to` does.

The module imports without Triton; `try_dequantize` returns None whenever this path does
not apply (no Triton, not CUDA, another quant type, disabled by
`STEADYDANCER_TRITON_DEQUANT=0`), and the caller falls back to the plain path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import GGUFError, UnsupportedQuantError

QK_K = 256
# qtype name -> (elements per block, bytes per block)
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_0": (32, 34),
}
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_SWITCH = "STEADYDANCER_TRITON_DEQUANT"
# Super-blocks (or Q8_0 blocks) handled by one program: 2048 output elements for K types.
_BLOCKS_PER_PROGRAM = {"Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 64}


def _qtype_name(qtype: Any) -> str:
    """Accept a gguf.GGMLQuantizationType, its name, or its integer value."""
    if isinstance(qtype, str):
        return qtype.upper()
    name = getattr(qtype, "name", None)
    if name is not None:
        return str(name)
    try:
        import gguf

        return gguf.GGMLQuantizationType(int(qtype)).name
    except (ImportError, ValueError, TypeError):
        return str(qtype)


def supported(qtype: Any) -> bool:
    """True for the quant types that have a fused kernel here."""
    return _qtype_name(qtype) in BLOCK_LAYOUT


def triton_available() -> bool:
    """True when Triton imports (its absence is normal on CPU-only installs)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    """The fused path is on unless STEADYDANCER_TRITON_DEQUANT is 0/false/off/no."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _kernels() -> dict[str, Any]:
    """The kernels, imported on first use so that importing this module never needs Triton."""
    from ._triton_kernels import KERNELS

    return KERNELS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def dequantize_triton(
    raw: torch.Tensor,
    qtype: Any,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise packed GGUF bytes `raw` (uint8, contiguous) to `shape` in `dtype`, on raw's device.

    Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
    the CPU tests). `out`, if given, must be a contiguous tensor of `shape` and `dtype` on
    raw's device and is filled in place (the streaming code reuses buffers this way).
    """
    name = _qtype_name(qtype)
    if name not in BLOCK_LAYOUT:
        raise UnsupportedQuantError(
            f"no fused Triton dequant for {name}; supported: {', '.join(BLOCK_LAYOUT)} "
            "(use steadydancer.gguf.dequant.dequantize for the others)"
        )
    if dtype not in OUTPUT_DTYPES:
        raise GGUFError(f"Triton dequant writes float32, float16 or bfloat16, not {dtype}")
    if raw.dtype != torch.uint8:
        raise GGUFError(f"packed GGUF data must be uint8, got {raw.dtype}")
    if raw.device.type != "cuda" and not _interpreting():
        raise GGUFError(
            f"Triton dequant needs a CUDA tensor, got one on {raw.device} "
            "(the plain path in dequant.py handles CPU tensors)"
        )
    block_elems, block_bytes = BLOCK_LAYOUT[name]
    n = 1
    for size in shape:
        n *= int(size)
    if n % block_elems:
        raise GGUFError(
            f"{name} tensor of shape {tuple(shape)}: {n} elements is not a multiple of {block_elems}"
        )
    n_blocks = n // block_elems
    if raw.numel() != n_blocks * block_bytes:
        raise GGUFError(
            f"{name} tensor of shape {tuple(shape)} needs {n_blocks * block_bytes} bytes, "
            f"the packed data has {raw.numel()}"
        )
    raw = raw.contiguous()
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=raw.device)
    elif (
        out.shape != torch.Size(shape)
        or out.dtype != dtype
        or not out.is_contiguous()
        or out.device != raw.device
    ):
        raise GGUFError(
            f"`out` must be a contiguous {dtype} tensor of shape {tuple(shape)} on {raw.device}"
        )
    if n == 0:
        return out
    kernel = _kernels()[name]
    block = _BLOCKS_PER_PROGRAM[name] * block_elems
    grid = ((n + block - 1) // block,)
    if raw.device.type == "cuda":
        with torch.cuda.device(raw.device):
            kernel[grid](raw, out, n, BLOCK=block, num_warps=4)
    else:
        kernel[grid](raw, out, n, BLOCK=block)
    return out


def try_dequantize(
    raw: torch.Tensor, qtype: Any, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype
) -> torch.Tensor | None:
    """The hook for the dequant dispatch: the fused result, or None to use the plain path.

    None when the tensor is not on CUDA, Triton is missing, the quant type or dtype has no
    kernel here, or the switch STEADYDANCER_TRITON_DEQUANT=0 is set. Errors about the data
    itself (wrong byte count) are raised, as the plain path would.
    """
    if raw.device.type != "cuda" or raw.dtype != torch.uint8 or dtype not in OUTPUT_DTYPES:
        return None
    if not supported(qtype) or not enabled() or not triton_available():
        return None
    return dequantize_triton(raw, qtype, shape, dtype)

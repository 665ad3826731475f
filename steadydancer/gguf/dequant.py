"""Dequantisation of GGUF tensor blocks in PyTorch, on any device and into any float dtype.

Why PyTorch and not `gguf.quants`: the reference dequantiser is numpy on the CPU; a quantised
model dequantises every weight on every forward pass, on the GPU, in the compute dtype.

Bit-exactness with `gguf.quants.dequantize` is by construction: every value is computed in
float32 with the same operations in the same order as the reference (fp16 scale widened to
float32, times the integer scale, times the quant, minus the minimum), and only the float32
result is rounded to the requested dtype (round to nearest even, what `ndarray.astype` and
`Tensor.to` do). Fusing or reordering any of these steps changes the last bit, so don't.
NaN payloads are the one thing not reproduced bit for bit (NaN stays NaN).

Work is done in chunks of blocks so that the float32 temporaries stay small whatever the
tensor size; on CUDA the fused Triton kernels of `triton_dequant` run first when they apply.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import gguf
import torch

from ..errors import GGUFError, UnsupportedQuantError

Q = gguf.GGMLQuantizationType
QK_K = 256

# Output elements computed per chunk: bounds the float32 temporaries (a few per element).
CPU_CHUNK_ELEMENTS = 1 << 18
DEVICE_CHUNK_ELEMENTS = 1 << 24


def as_qtype(qtype: Q | int | str) -> Q:
    """Accept a GGMLQuantizationType, its integer id or its name ("Q4_K", "q8_0")."""
    try:
        if isinstance(qtype, str):
            return Q[qtype.upper()]
        return Q(int(qtype))
    except (KeyError, ValueError) as exc:
        raise UnsupportedQuantError(
            f"unknown GGML quantisation type {qtype!r}; supported: {supported_names()}"
        ) from exc


def packed_nbytes(qtype: Q | int | str, shape: Sequence[int]) -> int:
    """Bytes that a tensor of this logical shape takes in this quantisation type."""
    qt = as_qtype(qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    n = math.prod(int(s) for s in shape)
    if n % block_size:
        raise GGUFError(
            f"a {qt.name} tensor of shape {tuple(shape)} has {n} elements, "
            f"not a multiple of the block size {block_size}"
        )
    return n // block_size * type_size


# --- small helpers -------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, widened to float32 (exact), shape [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _unpack(packed: torch.Tensor, group: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Split each byte of `packed` [n, k] into len(shifts) fields.

    Bytes are taken in groups of `group`; within a group all fields of the first shift come
    first, then all of the second, ... (the GGML layouts). Result [n, k * len(shifts)] uint8.
    """
    n = packed.shape[0]
    s = _shifts(shifts, packed.device).reshape(1, 1, len(shifts), 1)
    return ((packed.reshape(n, -1, 1, group) >> s) & mask).reshape(n, -1)


def _high_bits(packed: torch.Tensor, group: int) -> torch.Tensor:
    """One bit per output element: bit b of byte i of each group -> element b*group + i."""
    return _unpack(packed, group, (0, 1, 2, 3, 4, 5, 6, 7), 1)


def _bits_le(packed: torch.Tensor) -> torch.Tensor:
    """The bits of a little-endian integer [n, k bytes] as [n, 8k] uint8, bit i -> element i."""
    n = packed.shape[0]
    s = _shifts((0, 1, 2, 3, 4, 5, 6, 7), packed.device).reshape(1, 1, 8)
    return ((packed.reshape(n, -1, 1) >> s) & 1).reshape(n, -1)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums packed in the 12 scale bytes of Q4_K/Q5_K."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# --- one function per type: uint8 blocks [n, type_size] -> float32 [n, block_size] --------
# Integer quants are multiplied as they are: type promotion widens them to float32 inside
# the multiply (exactly, as an explicit cast would), which saves a pass over the data.


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:].view(torch.int8) * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _unpack(b[:, 2:], 16, (0, 4), 0x0F).to(torch.int8) - 8
    return d * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _unpack(b[:, 4:], 16, (0, 4), 0x0F)
    return (d * q) + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    qh = _bits_le(b[:, 2:6])  # a little-endian uint32: bit i is the high bit of element i
    ql = _unpack(b[:, 6:], 16, (0, 4), 0x0F)
    q = (ql | (qh << 4)).to(torch.int8) - 16
    return d * q


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    qh = _bits_le(b[:, 4:8])
    ql = _unpack(b[:, 8:], 16, (0, 4), 0x0F)
    q = ql | (qh << 4)
    return (d * q) + m


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _unpack(b[:, 16:80], 32, (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _unpack(scales[:, :8], 8, (0, 4), 0x0F)
    high = _unpack(scales[:, 8:], 4, (0, 2, 4, 6), 0x03)
    sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _unpack(qs, 32, (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    qh = _high_bits(hmask, 32).reshape(n, 16, 16) ^ 1  # a set bit means "no offset"
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _unpack(b[:, 16:], 32, (0, 4), 0x0F).reshape(n, 8, 32)
    return (ds * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    qh = _high_bits(b[:, 16:48], 32)
    ql = _unpack(b[:, 48:], 32, (0, 4), 0x0F)
    q = (ql | (qh << 4)).reshape(n, 8, 32)
    return (ds * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(b, 208)
    ds = (d * sc).reshape(n, 16, 1)
    ql = _unpack(b[:, :128], 64, (0, 4), 0x0F)
    qh = _unpack(b[:, 128:192], 32, (0, 2, 4, 6), 0x03)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    return (ds * q).reshape(n, QK_K)


_BLOCK_FUNCTIONS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _q8_0,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
_FLOAT_TYPES: dict[Q, torch.dtype] = {
    Q.F32: torch.float32,
    Q.F16: torch.float16,
    Q.BF16: torch.bfloat16,
}

FLOAT_QTYPES: frozenset[Q] = frozenset(_FLOAT_TYPES)
QUANTIZED_QTYPES: frozenset[Q] = frozenset(_BLOCK_FUNCTIONS)
SUPPORTED_QTYPES: frozenset[Q] = FLOAT_QTYPES | QUANTIZED_QTYPES


def supported_names() -> str:
    return ", ".join(sorted(q.name for q in SUPPORTED_QTYPES))


def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View bytes as `dtype`; copy first when the bytes are not aligned for a view."""
    raw = raw.reshape(-1)
    try:
        return raw.view(dtype)
    except RuntimeError:
        return raw.clone().view(dtype)


def dequantize(
    raw: torch.Tensor,
    qtype: Q | int | str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Unpack GGUF bytes `raw` (uint8, any shape) to a `dtype` tensor of logical `shape`.

    Runs on raw's device. Equal to `torch.from_numpy(gguf.quants.dequantize(...)).to(dtype)`
    for every type in SUPPORTED_QTYPES. F32/F16/BF16 data already in `dtype` comes back as a
    view of `raw`, without a copy.
    """
    qt = as_qtype(qtype)
    if qt not in SUPPORTED_QTYPES:
        raise UnsupportedQuantError(
            f"cannot dequantise GGML type {qt.name}; supported: {supported_names()}"
        )
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise GGUFError(
            f"packed GGUF data must be a uint8 tensor, got {getattr(raw, 'dtype', type(raw))}"
        )
    if not dtype.is_floating_point:
        raise GGUFError(f"dequantisation produces floats; {dtype} is not a floating dtype")
    shape = tuple(int(s) for s in shape)
    expected = packed_nbytes(qt, shape)
    if raw.numel() != expected:
        raise GGUFError(
            f"a {qt.name} tensor of shape {shape} needs {expected} bytes, the data has {raw.numel()}"
        )

    if qt in _FLOAT_TYPES:
        return _reinterpret(raw, _FLOAT_TYPES[qt]).reshape(shape).to(dtype)

    if raw.device.type == "cuda":
        from . import triton_dequant  # CUDA only: the fused kernels, None when they don't apply

        fused = triton_dequant.try_dequantize(raw.reshape(-1), qt, shape, dtype)
        if fused is not None:
            return fused

    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    blocks = raw.reshape(-1, type_size)
    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks * block_size, dtype=dtype, device=raw.device)
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if raw.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, chunk_elements // block_size)
    fn = _BLOCK_FUNCTIONS[qt]
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        # copy_ rounds float32 to `dtype` exactly like Tensor.to / ndarray.astype.
        out[start * block_size : stop * block_size].copy_(fn(blocks[start:stop]).reshape(-1))
    return out.reshape(shape)

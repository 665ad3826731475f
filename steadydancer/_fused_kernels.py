"""Triton kernels behind `fused` (imported only when Triton is present).

The norm kernels handle one row of the token sequence per program: the whole row (5120
channels at 14B) fits in registers, so the row is read once and written once. TRITON_INTERPRET=1 at
import time selects Triton's CPU interpreter (the CPU tests). See `fused` for the maths and
why the results match the unfused path.
"""

import triton
import triton.language as tl


@triton.jit
def layer_norm_modulate(
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,
    rows_per_sample,
    sample_stride,
    row_stride,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    # x may be a slice of a longer sequence (the head's video tokens): strided rows
    row = tl.program_id(0).to(tl.int64)
    sample = row // rows_per_sample
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + sample * sample_stride + (row % rows_per_sample) * row_stride
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n_cols
    normed = centred * tl.rsqrt(var + eps)
    scale = tl.load(scale_ptr + sample * n_cols + cols, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + sample * n_cols + cols, mask=mask, other=0.0)
    out = normed * (1.0 + scale) + shift
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_rope(
    x_ptr,
    weight_ptr,
    table_ptr,
    out_ptr,
    rows_per_sample,
    n_cols,
    pairs_per_head,
    eps,
    ROPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # BLOCK channel pairs (2m, 2m+1) per program; the row has n_cols // 2 of them.
    row = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BLOCK)
    mask = pairs < n_cols // 2
    base = row * n_cols + 2 * pairs
    dtype = out_ptr.dtype.element_ty
    a = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + base + 1, mask=mask, other=0.0).to(tl.float32)
    mean_square = (tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / n_cols
    r = tl.rsqrt(mean_square + eps)
    # rounded to x's dtype, then times the weight in x's dtype: as the unfused RMSNorm
    wa = tl.load(weight_ptr + 2 * pairs, mask=mask, other=0.0).to(dtype).to(tl.float32)
    wb = tl.load(weight_ptr + 2 * pairs + 1, mask=mask, other=0.0).to(dtype).to(tl.float32)
    a = ((a * r).to(dtype).to(tl.float32) * wa).to(dtype).to(tl.float32)
    b = ((b * r).to(dtype).to(tl.float32) * wb).to(dtype).to(tl.float32)
    if ROPE:
        token = row % rows_per_sample
        entry = (token * pairs_per_head + pairs % pairs_per_head) * 2
        cos = tl.load(table_ptr + entry, mask=mask, other=1.0)
        sin = tl.load(table_ptr + entry + 1, mask=mask, other=0.0)
        a, b = a * cos - b * sin, a * sin + b * cos
    tl.store(out_ptr + base, a.to(dtype), mask=mask)
    tl.store(out_ptr + base + 1, b.to(dtype), mask=mask)


@triton.jit
def scale_to_fp8(x_ptr, inv_scale_ptr, out_ptr, n_elements, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    # x times the inverse scale (read on the device: no host sync), saturated, cast to fp8
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    inv = tl.load(inv_scale_ptr)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) * inv
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    tl.store(out_ptr + idx, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def stochastic_round_e4m3(x_ptr, inv_scale_ptr, out_ptr, n_elements, seed, BLOCK: tl.constexpr):
    # x times the inverse scale, rounded to one of its two e4m3 neighbours with probabilities
    # that make the mean exact (see fused.stochastic_round_fp8)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_scale_ptr)
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    # int32 offsets: every Triton version draws 32-bit numbers for them (weights hold < 2^31 values)
    noise = tl.randint(seed, idx.to(tl.int32)).to(tl.uint32, bitcast=True) & 0xFFFFF
    magnitude = tl.abs(x)
    # normal range: random low 20 bits added to the float32 pattern, then dropped (3 mantissa bits left)
    bits = (magnitude.to(tl.uint32, bitcast=True) + noise) & 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # below e4m3's smallest normal, 2^-6, the grid is uniform: multiples of 2^-9
    subnormal = tl.floor(magnitude * 512.0 + noise.to(tl.float32) * (1.0 / 1048576.0)) / 512.0
    rounded = tl.minimum(tl.where(magnitude < 0.015625, subnormal, normal), 448.0)
    rounded = tl.where(x < 0, -rounded, rounded)
    tl.store(out_ptr + idx, rounded.to(out_ptr.dtype.element_ty), mask=mask)

"""Triton kernels behind `fused` (imported only when Triton is present).

The norm kernels handle one row of the token sequence per program: the whole row (5120
channels at 14B) fits in registers, so the row is read once and written once. TRITON_INTERPRET=1 at
import time selects Triton's CPU interpreter (the CPU tests). See `fused` for the maths and
why the results match the unfused path.
"""

import triton
import triton.language as tl


@triton.jit
def layer_norm_rows(
    x_ptr,
    add_ptr,
    gate_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    amax_ptr,
    rows_per_sample,
    sample_stride,
    row_stride,
    param_sample_stride,
    n_cols,
    eps,
    ONE_PLUS: tl.constexpr,
    ADD: tl.constexpr,
    GATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out = LayerNorm(x) * (ONE_PLUS + weight) + bias: ONE_PLUS 1 for a modulation (weight =
    # scale, bias = shift, one row per sample), 0 for an affine LayerNorm (shared row).
    # ADD: first x += add (* gate), written back (x contiguous then). x may be a slice of a
    # longer sequence (the head's video tokens): strided rows. The row's max |out| (after
    # rounding to out's dtype) goes to amax_ptr[row], for a following fp8 quantisation.
    row = tl.program_id(0).to(tl.int64)
    sample = row // rows_per_sample
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = x_ptr + sample * sample_stride + (row % rows_per_sample) * row_stride
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        y = tl.load(add_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if GATE:
            y = y * tl.load(gate_ptr + sample * n_cols + cols, mask=mask, other=0.0)
        x = x + y
        tl.store(x_row + cols, x, mask=mask)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n_cols
    normed = centred * tl.rsqrt(var + eps)
    weight = tl.load(weight_ptr + sample * param_sample_stride + cols, mask=mask, other=0.0)
    bias = tl.load(bias_ptr + sample * param_sample_stride + cols, mask=mask, other=0.0)
    out = (normed * (ONE_PLUS + weight) + bias).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_cols + cols, out, mask=mask)
    tl.store(amax_ptr + row, tl.max(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), axis=0))


@triton.jit
def add_rows(x_ptr, add_ptr, gate_ptr, rows_per_sample, n_cols, GATE: tl.constexpr, BLOCK: tl.constexpr):
    # x += add (* gate, one row per sample), in place; x float32, add in any float dtype.
    # (PyTorch's addcmul_ on these mixed dtypes ran at half the memory bandwidth.)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(add_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if GATE:
        y = y * tl.load(gate_ptr + (row // rows_per_sample) * n_cols + cols, mask=mask, other=0.0)
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    tl.store(x_ptr + row * n_cols + cols, x + y, mask=mask)


@triton.jit
def gelu_tanh(x_ptr, out_ptr, amax_ptr, n_elements, BLOCK: tl.constexpr):
    # GELU, tanh approximation, in float32 (as PyTorch's), rounded to out's dtype; the
    # block's max |out| goes to amax_ptr[block] for a following fp8 quantisation.
    block = tl.program_id(0)
    idx = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) (x + 0.044715 x^3)
    tanh = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
    out = (0.5 * x * (1.0 + tanh)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + idx, out, mask=mask)
    tl.store(amax_ptr + block, tl.max(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), axis=0))


@triton.jit
def rms_norm_rope(
    x_ptr,
    weight_ptr,
    table_ptr,
    out_ptr,
    rows_per_sample,
    n_cols,
    eps,
    PAIRS_PER_HEAD: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # BLOCK channel pairs (2m, 2m+1) per program; the row has n_cols // 2 of them. The row
    # is read and written as [pairs, 2] tiles, contiguous in memory: loading the two halves
    # of each pair separately (stride 2) ran at a seventh of the memory bandwidth. The pairs
    # per head are a compile-time constant: the table index's modulo is then a mask (a
    # division by a runtime value made the kernel 1.2x slower on an H100).
    row = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BLOCK)
    mask = (pairs < n_cols // 2)[:, None]
    offsets = 2 * pairs[:, None] + tl.arange(0, 2)[None, :]
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * n_cols + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / n_cols + eps)
    # rounded to x's dtype, then times the weight in x's dtype: as the unfused RMSNorm
    w = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(dtype).to(tl.float32)
    x = ((x * r).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
    if ROPE:
        a, b = tl.split(x)
        token = (row % rows_per_sample).to(tl.int32)
        entry = (token * PAIRS_PER_HEAD + pairs % PAIRS_PER_HEAD)[:, None] * 2 + tl.arange(0, 2)[None, :]
        cos, sin = tl.split(tl.load(table_ptr + entry, mask=mask, other=0.0))  # (cos, sin) pairs
        x = tl.join(a * cos - b * sin, a * sin + b * cos)
    tl.store(out_ptr + row * n_cols + offsets, x.to(dtype), mask=mask)


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

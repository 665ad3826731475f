"""Triton kernels behind `triton_dequant` (imported only when Triton is present).

Kept in their own module because Triton resolves the helpers a kernel calls through the
module's globals, and because importing it needs Triton: `triton_dequant` imports this
lazily. Whether the kernels run compiled or in Triton's CPU interpreter is decided when
this module is imported (TRITON_INTERPRET=1 at that time selects the interpreter).
See `triton_dequant` for the layouts and why the results are bit-exact.
"""

import triton
import triton.language as tl


@triton.jit
def _f16(lo, hi):
    # two little-endian bytes -> float16 bits -> float32 (exact)
    bits = lo.to(tl.uint16) | (hi.to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(sb_ptr, s):
    # 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes (get_scale_min)
    j = s % 4
    a = tl.load(sb_ptr + j).to(tl.int32)
    b = tl.load(sb_ptr + j + 4).to(tl.int32)
    c = tl.load(sb_ptr + j + 8).to(tl.int32)
    low = s < 4
    sc = tl.where(low, a & 63, (c & 0x0F) | ((a >> 2) & 0x30))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 2) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def q4_k(src, dst, n_elements, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    blk = idx // 256
    col = (idx % 256).to(tl.int32)
    s = col // 32
    lane = col % 32
    base = src + blk * 144
    d = _f16(tl.load(base, mask=mask, other=0), tl.load(base + 1, mask=mask, other=0))
    dmin = _f16(tl.load(base + 2, mask=mask, other=0), tl.load(base + 3, mask=mask, other=0))
    sc, mn = _k_scale_min(base + 4, s)
    qb = tl.load(base + 16 + (s // 2) * 32 + lane, mask=mask, other=0).to(tl.int32)
    q = ((qb >> ((s % 2) * 4)) & 0x0F).to(tl.float32)
    val = (d * sc) * q - dmin * mn
    tl.store(dst + idx, val.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def q5_k(src, dst, n_elements, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    blk = idx // 256
    col = (idx % 256).to(tl.int32)
    s = col // 32
    lane = col % 32
    base = src + blk * 176
    d = _f16(tl.load(base, mask=mask, other=0), tl.load(base + 1, mask=mask, other=0))
    dmin = _f16(tl.load(base + 2, mask=mask, other=0), tl.load(base + 3, mask=mask, other=0))
    sc, mn = _k_scale_min(base + 4, s)
    hb = tl.load(base + 16 + lane, mask=mask, other=0).to(tl.int32)
    qb = tl.load(base + 48 + (s // 2) * 32 + lane, mask=mask, other=0).to(tl.int32)
    q = (((qb >> ((s % 2) * 4)) & 0x0F) | (((hb >> s) & 1) << 4)).to(tl.float32)
    val = (d * sc) * q - dmin * mn
    tl.store(dst + idx, val.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def q6_k(src, dst, n_elements, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    blk = idx // 256
    col = (idx % 256).to(tl.int32)
    half = col // 128
    r = col % 128
    base = src + blk * 210
    lb = tl.load(base + half * 64 + (r % 64), mask=mask, other=0).to(tl.int32)
    hb = tl.load(base + 128 + half * 32 + (r % 32), mask=mask, other=0).to(tl.int32)
    q = (((lb >> ((r // 64) * 4)) & 0x0F) | (((hb >> ((r // 32) * 2)) & 0x03) << 4)) - 32
    scale = tl.load(base + 192 + col // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
    d = _f16(tl.load(base + 208, mask=mask, other=0), tl.load(base + 209, mask=mask, other=0))
    val = (d * scale.to(tl.float32)) * q.to(tl.float32)
    tl.store(dst + idx, val.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def q8_0(src, dst, n_elements, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    blk = idx // 32
    col = (idx % 32).to(tl.int32)
    base = src + blk * 34
    d = _f16(tl.load(base, mask=mask, other=0), tl.load(base + 1, mask=mask, other=0))
    x = tl.load(base + 2 + col, mask=mask, other=0).to(tl.int8, bitcast=True)
    val = x.to(tl.float32) * d
    tl.store(dst + idx, val.to(dst.dtype.element_ty), mask=mask)


KERNELS = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k, "Q8_0": q8_0}

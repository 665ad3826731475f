"""Quantisers for the K types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), which `gguf.quants` can only read.

Why our own: the converter must write the types SteadyDancer GGUFs are published in (Q4_K,
Q5_K, Q6_K...), and `gguf.quants.quantize` raises NotImplementedError for all K types.

The method is simpler than llama.cpp's (`make_qkx2_quants` searches many candidate
scales; no importance matrices here): per sub-block take the range (or the extreme value
for the symmetric types), quantise the sub-block scales against one fp16 super-block scale,
round every value against the scale it will really be decoded with, then refit the
sub-block scales by least squares on the chosen quants and keep the better encoding. Output
files are valid GGUF read by any GGML implementation, with an error close to llama.cpp's. The tests decode our blocks with
`gguf.quants.dequantize` and bound the error.

Layouts (QK_K = 256 values per super-block) mirror `dequant.py`; `_pack` is the exact
inverse of its `_unpack`.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

from ..errors import GGUFError

Q = gguf.GGMLQuantizationType
QK_K = 256
# Super-blocks per step: keeps float32 temporaries near 1M elements whatever the tensor.
_CHUNK_BLOCKS = 4096
REFITS = 1  # least-squares refits of the sub-block scales (each costs about one more pass)


def _f16(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Scales as fp16, refusing overflow (the block would decode to inf)."""
    with np.errstate(over="ignore"):
        out = values.astype(np.float16)
    if not np.isfinite(out).all():
        raise GGUFError(
            f"values too large for {qtype.name}: a block scale exceeds the fp16 range "
            f"(largest |scale| {float(np.max(np.abs(values))):.4g}); store this tensor as F32"
        )
    return out


def _pack(values: np.ndarray, group: int, shifts: tuple[int, ...]) -> np.ndarray:
    """Inverse of dequant._unpack: fields [n, k * len(shifts)] -> bytes [n, k]."""
    n = values.shape[0]
    v = values.astype(np.uint8).reshape(n, -1, len(shifts), group)
    out = np.zeros((n, v.shape[1], group), dtype=np.uint8)
    for i, s in enumerate(shifts):
        out |= v[:, :, i, :] << np.uint8(s)
    return out.reshape(n, -1)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1), 0).astype(np.float32)


def _keep_better(
    cand: tuple[np.ndarray, ...], best: tuple[np.ndarray, ...], better: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Per super-block (first axis), the candidate encoding where `better`, else the old one."""
    return tuple(
        np.where(better.reshape((-1,) + (1,) * (b.ndim - 1)), c, b)
        for c, b in zip(cand, best, strict=True)
    )


def _encode_affine(
    xs: np.ndarray, scale: np.ndarray, offset: np.ndarray, qmax: int, smax: int, qtype: Q
) -> tuple[np.ndarray, ...]:
    """Quantise sub-block (scale, offset) against the super-block scales, then the values."""
    d = _f16(scale.max(axis=-1, keepdims=True) / smax, qtype)
    dmin = _f16(offset.max(axis=-1, keepdims=True) / smax, qtype)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d32)), 0, smax)
    m = np.clip(np.rint(_safe_div(offset, dmin32)), 0, smax)
    eff_scale = (d32 * sc)[..., None]
    eff_min = (dmin32 * m)[..., None]
    q = np.clip(np.rint(_safe_div(xs + eff_min, eff_scale)), 0, qmax)
    err = ((eff_scale * q - eff_min - xs) ** 2).sum(axis=(1, 2))
    return d, dmin, sc, m, q, err


def _affine(x: np.ndarray, sub: int, qmax: int, sbits: int, qtype: Q) -> tuple[np.ndarray, ...]:
    """Asymmetric types (x ~ d*sc*q - dmin*m): returns d16, dmin16, sc, m, q.

    x: [n, 256]; `sub` values per sub-block; q in [0, qmax]; sc, m in [0, 2**sbits - 1].
    Starts from each sub-block's range, then refits scale and offset by least squares on the
    chosen quants (twice), keeping per super-block whichever encoding has the lower error.
    """
    n = x.shape[0]
    smax = (1 << sbits) - 1
    xs = x.reshape(n, -1, sub)
    offset = -np.minimum(xs.min(axis=-1), 0.0)  # the minimum is stored as a non-negative offset
    scale = (xs.max(axis=-1) + offset) / qmax
    best = _encode_affine(xs, scale, offset, qmax, smax, qtype)
    q = best[4]
    for _ in range(REFITS):
        qm, xm = q.mean(axis=-1), xs.mean(axis=-1)
        var = ((q - qm[..., None]) ** 2).sum(axis=-1)
        cov = ((q - qm[..., None]) * (xs - xm[..., None])).sum(axis=-1)
        new_scale = np.where(var > 0, _safe_div(cov, var), scale)
        new_offset = new_scale * qm - xm
        # An offset must be >= 0 (it is stored unsigned): refit the scale alone through 0.
        through_zero = _safe_div((q * xs).sum(axis=-1), (q * q).sum(axis=-1))
        new_scale = np.where(new_offset < 0, through_zero, new_scale)
        new_offset = np.maximum(new_offset, 0.0)
        new_scale = np.where(new_scale > 0, new_scale, scale).astype(np.float32)
        cand = _encode_affine(xs, new_scale, new_offset.astype(np.float32), qmax, smax, qtype)
        best = _keep_better(cand, best, cand[-1] < best[-1])
        q = cand[4]
    d, dmin, sc, m, q, _ = best
    return (
        d.astype(np.float16),
        dmin.astype(np.float16),
        sc.astype(np.uint8),
        m.astype(np.uint8),
        q.reshape(n, QK_K).astype(np.uint8),
    )


def _encode_symmetric(
    xs: np.ndarray, scale: np.ndarray, qlo: int, scale_max: int, qtype: Q
) -> tuple[np.ndarray, ...]:
    d = _f16(np.abs(scale).max(axis=-1, keepdims=True) / scale_max, qtype)
    d32 = d.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d32)), -scale_max - 1, scale_max)
    eff = (d32 * sc)[..., None]
    q = np.clip(np.rint(_safe_div(xs, eff)), qlo, -qlo - 1)
    err = ((eff * q - xs) ** 2).sum(axis=(1, 2))
    return d, sc, q, err


def _symmetric(
    x: np.ndarray, sub: int, qlo: int, scale_max: int, qtype: Q
) -> tuple[np.ndarray, ...]:
    """Symmetric types (x ~ d*sc*q, q in [qlo, -qlo-1]): returns d16, sc (signed), q (signed).

    Starts by mapping each sub-block's extreme value to `qlo` (the longer, negative side),
    then refits the scales by least squares on the chosen quants, keeping the better one.
    """
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    idx = np.abs(xs).argmax(axis=-1)[..., None]
    scale = np.take_along_axis(xs, idx, axis=-1)[..., 0] / qlo
    best = _encode_symmetric(xs, scale, qlo, scale_max, qtype)
    q = best[2]
    for _ in range(REFITS):
        refit = _safe_div((q * xs).sum(axis=-1), (q * q).sum(axis=-1))
        refit = np.where(refit != 0, refit, scale).astype(np.float32)
        cand = _encode_symmetric(xs, refit, qlo, scale_max, qtype)
        best = _keep_better(cand, best, cand[-1] < best[-1])
        q = cand[2]
    d, sc, q, _ = best
    return d.astype(np.float16), sc.astype(np.int8), q.reshape(n, QK_K).astype(np.int8)


def _q2_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 16, 3, 4, Q.Q2_K)
    scales = sc | (m << np.uint8(4))
    qs = _pack(q, 32, (0, 2, 4, 6))
    return np.concatenate([scales, qs, d.view(np.uint8), dmin.view(np.uint8)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(x, 16, -4, 31, Q.Q3_K)
    v = (q.astype(np.int16) + 4).astype(np.uint8)  # 0..7: low 2 bits + a "no offset" bit
    hmask = _pack(v >> np.uint8(2), 32, tuple(range(8)))
    qs = _pack(v & np.uint8(3), 32, (0, 2, 4, 6))
    s = (sc.astype(np.int16) + 32).astype(np.uint8)  # 6 bits
    low = _pack(s & np.uint8(0x0F), 8, (0, 4))
    high = _pack(s >> np.uint8(4), 4, (0, 2, 4, 6))
    return np.concatenate([hmask, qs, low, high, d.view(np.uint8)], axis=1)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack eight 6-bit scales and minimums into the 12 bytes of Q4_K/Q5_K."""
    d_ = sc[:, :4] | ((sc[:, 4:] >> np.uint8(4)) << np.uint8(6))
    m_ = m[:, :4] | ((m[:, 4:] >> np.uint8(4)) << np.uint8(6))
    md = (sc[:, 4:] & np.uint8(0x0F)) | ((m[:, 4:] & np.uint8(0x0F)) << np.uint8(4))
    return np.concatenate([d_, m_, md], axis=1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 32, 15, 6, Q.Q4_K)
    qs = _pack(q, 32, (0, 4))
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _k4_scales(sc, m), qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(x, 32, 31, 6, Q.Q5_K)
    qh = _pack(q >> np.uint8(4), 32, tuple(range(8)))
    qs = _pack(q & np.uint8(0x0F), 32, (0, 4))
    return np.concatenate(
        [d.view(np.uint8), dmin.view(np.uint8), _k4_scales(sc, m), qh, qs], axis=1
    )


def _q6_k(x: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(x, 16, -32, 127, Q.Q6_K)
    v = (q.astype(np.int16) + 32).astype(np.uint8)
    ql = _pack(v & np.uint8(0x0F), 64, (0, 4))
    qh = _pack(v >> np.uint8(4), 32, (0, 2, 4, 6))
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)


QUANTIZERS: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}


def quantize(array: np.ndarray, qtype: Q) -> np.ndarray:
    """K-quantise along the last axis (a multiple of 256) -> uint8 [..., last / 256 * type_size]."""
    fn = QUANTIZERS[qtype]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.asarray(array, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise GGUFError(
            f"{qtype.name} needs a last axis that is a multiple of {QK_K}, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise GGUFError(f"cannot quantise to {qtype.name}: the tensor contains inf or NaN")
    blocks = x.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * type_size)

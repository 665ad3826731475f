"""Dequantisation is bit-exact with gguf.quants.dequantize, for every type, dtype and layout."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_testutils import SCALE_OFFSETS, assert_same_bits, random_blocks

from steadydancer.errors import GGUFError, UnsupportedQuantError
from steadydancer.gguf import dequant, kquants
from steadydancer.gguf.dequant import SUPPORTED_QTYPES, dequantize
from steadydancer.gguf.quantize import quantize

Q = gguf.GGMLQuantizationType
ALL = sorted(SUPPORTED_QTYPES, key=lambda q: q.name)
QUANTISED = sorted(dequant.QUANTIZED_QTYPES, key=lambda q: q.name)


def reference(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """gguf.quants.dequantize of bytes laid out as the file stores them (float32)."""
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    rows = raw.reshape(shape[0], -1)
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.dequantize(rows, qtype), dtype=np.float32).reshape(shape)


def test_every_type_of_the_spec_is_supported():
    wanted = {
        "F32",
        "F16",
        "BF16",
        "Q8_0",
        "Q5_0",
        "Q5_1",
        "Q4_0",
        "Q4_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    }
    assert {q.name for q in SUPPORTED_QTYPES} == wanted


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bit_exact_on_random_and_extreme_blocks(qtype, dtype):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 300, seed=int(qtype))
    n_elements = raw.size // type_size * block_size
    rows = 4 if (n_elements // block_size) % 4 == 0 else 1
    shape = (rows, n_elements // rows)
    expected = torch.from_numpy(reference(raw, qtype, shape).copy()).to(dtype)
    actual = dequantize(torch.from_numpy(raw), qtype, shape, dtype)
    assert actual.dtype == dtype and actual.shape == shape
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda q: q.name)
def test_extreme_scales_give_the_same_special_values_as_the_reference(qtype):
    raw = random_blocks(qtype, 0, seed=1)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (raw.size // type_size * block_size,)
    out = dequantize(torch.from_numpy(raw), qtype, shape)
    # The extreme blocks really exercise the special values (not just finite numbers).
    assert torch.isnan(out).any()
    assert (out == 0).any() and (torch.isfinite(out) & (out != 0)).any()
    assert_same_bits(out, reference(raw, qtype, (1, shape[0])).reshape(shape))


@pytest.mark.parametrize("qtype", QUANTISED, ids=lambda q: q.name)
def test_chunking_does_not_change_results(qtype):
    raw = torch.from_numpy(random_blocks(qtype, 64, seed=7))
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (raw.numel() // type_size * block_size,)
    whole = dequantize(raw, qtype, shape, chunk_elements=1 << 30)
    for chunk in (block_size, 3 * block_size, 1000):
        assert_same_bits(dequantize(raw, qtype, shape, chunk_elements=chunk), whole)


def test_unaligned_and_strided_input():
    raw = random_blocks(Q.Q4_K, 8, seed=3)
    shape = (raw.size // 144 * 256,)
    expected = dequantize(torch.from_numpy(raw), Q.Q4_K, shape)
    padded = torch.zeros(raw.size + 1, dtype=torch.uint8)
    padded[1:] = torch.from_numpy(raw)
    assert_same_bits(dequantize(padded[1:], Q.Q4_K, shape), expected)  # odd storage offset
    f16 = np.arange(6, dtype=np.float16).view(np.uint8)
    odd = torch.zeros(f16.size + 1, dtype=torch.uint8)
    odd[1:] = torch.from_numpy(f16)
    assert dequantize(odd[1:], Q.F16, (2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_float_types_return_views_when_no_conversion_is_needed():
    raw = torch.from_numpy(np.arange(8, dtype=np.float32).view(np.uint8).copy())
    out = dequantize(raw, Q.F32, (2, 4))
    assert out.data_ptr() == raw.data_ptr()
    assert out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_accepts_names_and_ids():
    raw = torch.from_numpy(random_blocks(Q.Q8_0, 2, seed=0)[: 2 * 34])
    a = dequantize(raw, "q8_0", (64,))
    b = dequantize(raw, int(Q.Q8_0), (64,))
    assert_same_bits(a, b)


@pytest.mark.parametrize(
    ("raw", "qtype", "shape", "error", "match"),
    [
        (torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (64,), GGUFError, "needs 68 bytes"),
        (
            torch.zeros(34, dtype=torch.uint8),
            Q.Q8_0,
            (33,),
            GGUFError,
            "multiple of the block size 32",
        ),
        (torch.zeros(34, dtype=torch.int8), Q.Q8_0, (32,), GGUFError, "uint8"),
        (torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,), UnsupportedQuantError, "IQ2_XXS"),
        (torch.zeros(4, dtype=torch.uint8), 999, (1,), UnsupportedQuantError, "unknown"),
        (torch.zeros(4, dtype=torch.uint8), "Q9_9", (1,), UnsupportedQuantError, "unknown"),
    ],
)
def test_bad_arguments_raise_named_errors(raw, qtype, shape, error, match):
    with pytest.raises(error, match=match):
        dequantize(raw, qtype, shape)


def test_integer_output_dtype_is_refused():
    with pytest.raises(GGUFError, match="floating"):
        dequantize(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (32,), torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_bit_exact_on_cuda(qtype):
    raw = random_blocks(qtype, 500, seed=11)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (raw.size // type_size * block_size,)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = dequantize(torch.from_numpy(raw).cuda(), qtype, shape, dtype)
        assert out.device.type == "cuda"
        expected = torch.from_numpy(reference(raw, qtype, (1, shape[0])).reshape(shape).copy()).to(
            dtype
        )
        assert_same_bits(out, expected)


# --- quantisers ---------------------------------------------------------------------------

# Relative RMS error bounds on Gaussian data (ours; llama.cpp's iterative search is a bit better).
ERROR_BOUND = {
    Q.Q2_K: 0.35, Q.Q3_K: 0.17, Q.Q4_K: 0.08, Q.Q5_K: 0.04, Q.Q6_K: 0.02,
    Q.Q4_0: 0.09, Q.Q4_1: 0.08, Q.Q5_0: 0.045, Q.Q5_1: 0.04, Q.Q8_0: 0.006,
    Q.BF16: 0.003, Q.F16: 0.0005, Q.F32: 0.0,
}  # fmt: skip


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_quantize_decodes_with_the_reference_within_the_type_error(qtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((24, 512)) * 0.03).astype(np.float32)
    x[1] += 0.2  # an offset row: exercises the minimums of the affine types
    x[2] = 0.0  # an all-zero row must decode to exactly zero
    x[3, :256] = np.linspace(-1, 1, 256)  # a row with a wide range
    packed = quantize(x, qtype)
    decoded = reference(np.ascontiguousarray(packed).view(np.uint8).reshape(-1), qtype, x.shape)
    assert np.array_equal(decoded[2], np.zeros(512, np.float32))
    err = np.sqrt(np.mean((decoded - x) ** 2) / np.mean(x**2))
    assert err <= ERROR_BOUND[qtype], f"{qtype.name}: relative RMS error {err:.4f}"
    ours = dequantize(
        torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(-1)), qtype, x.shape
    )
    assert_same_bits(ours, decoded)


@pytest.mark.parametrize(
    "qtype", sorted(kquants.QUANTIZERS, key=lambda q: q.name), ids=lambda q: q.name
)
def test_k_quantiser_uses_its_range(qtype):
    """Each K block reproduces its largest value closely: scales are not degenerate."""
    rng = np.random.default_rng(9)
    x = rng.uniform(-1, 1, size=(8, 256)).astype(np.float32)
    decoded = reference(quantize(x, qtype).view(np.uint8).reshape(-1), qtype, x.shape)
    idx = np.abs(x).argmax(axis=1)
    peak, got = x[np.arange(8), idx], decoded[np.arange(8), idx]
    assert np.all(np.abs(got - peak) <= 0.5 * np.abs(peak))


def test_k_quantiser_refuses_values_beyond_fp16_scales():
    x = np.full((1, 256), 1e9, dtype=np.float32)
    with pytest.raises(GGUFError, match="fp16 range"):
        quantize(x, Q.Q4_K)


def test_quantize_refuses_rows_that_do_not_fit_blocks_and_unknown_types():
    with pytest.raises(GGUFError, match="multiple of 256"):
        quantize(np.zeros((2, 100), np.float32), Q.Q4_K)
    with pytest.raises(UnsupportedQuantError, match="IQ4_NL"):
        quantize(np.zeros((1, 32), np.float32), Q.IQ4_NL)


def test_scale_offsets_table_matches_block_sizes():
    for qtype, offsets in SCALE_OFFSETS.items():
        assert all(o + 2 <= gguf.GGML_QUANT_SIZES[qtype][1] for o in offsets)

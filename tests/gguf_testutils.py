"""Helpers for the GGUF tests: write small GGUF files with the real `gguf` writer, compare bits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from steadydancer.gguf.quantize import quantize
from steadydancer.keys import TinyConfig, tiny_state_dict

Q = gguf.GGMLQuantizationType

# Byte offsets of the fp16 scale fields inside one block, per quantised type.
SCALE_OFFSETS: dict[Q, tuple[int, ...]] = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}

# fp16 bit patterns: infinities, NaNs, subnormals, extremes, signed zeros.
EXTREME_F16 = (
    0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01,
    0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400,
    0x7BFF, 0xFBFF, 0x0000, 0x8000, 0x3C00,
)  # fmt: skip


def random_blocks(qtype: Q, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for `n_blocks` blocks, then blocks with extreme scales and all-0/all-1 bits."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    offsets = SCALE_OFFSETS.get(qtype, ())
    extra = []
    for fill in (None, 0x00, 0xFF):
        for value in EXTREME_F16:
            block = (
                rng.integers(0, 256, size=type_size, dtype=np.uint8)
                if fill is None
                else np.full(type_size, fill, np.uint8)
            )
            for off in offsets:
                block[off : off + 2] = np.array([value], dtype="<u2").view(np.uint8)
            extra.append(block)
    if not offsets:  # float types: put the extreme patterns in as values
        patterns = np.array(EXTREME_F16, dtype="<u2").view(np.uint8)
        extra.append(np.resize(patterns, type_size * len(EXTREME_F16)).reshape(-1, type_size))
    return np.concatenate([blocks, np.concatenate([np.atleast_2d(e) for e in extra])]).reshape(-1)


def assert_same_bits(
    actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray
) -> None:
    """Equal bit for bit (so -0.0 != 0.0), except that any NaN matches any NaN."""
    a = torch.as_tensor(np.asarray(actual)) if isinstance(actual, np.ndarray) else actual.cpu()
    e = (
        torch.as_tensor(np.asarray(expected))
        if isinstance(expected, np.ndarray)
        else expected.cpu()
    )
    assert a.dtype == e.dtype, (a.dtype, e.dtype)
    assert a.shape == e.shape, (a.shape, e.shape)
    int_type = {
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }[a.dtype]
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    ai, ei = a.view(int_type)[~nan_a], e.view(int_type)[~nan_e]
    bad = (ai != ei).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} values differ, first at flat index {bad[0].item()}"


def write_gguf(
    path: Path,
    tensors: Mapping[str, tuple[np.ndarray, Q]],
    *,
    arch: str | None = "wan",
    orig_shapes: Mapping[str, tuple[int, ...]] | None = None,
    metadata: Mapping[str, str] | None = None,
    typed_metadata: Mapping[str, tuple[object, gguf.GGUFValueType]] | None = None,
    alignment: int | None = None,
) -> Path:
    """Write with gguf.GGUFWriter. Values are float arrays quantised here (K types with our
    quantiser, the others with gguf.quants), or uint8 raw bytes.

    `arch=None` writes no general.architecture (as stable-diffusion.cpp files do).
    `typed_metadata`: key -> (value, GGUFValueType); an ARRAY value is a list whose element
    type the writer infers. `alignment`: general.alignment (the writer pads to it).
    """
    writer = gguf.GGUFWriter(str(path), arch or "wan")
    if arch is None:
        writer.kv_data[0].pop("general.architecture", None)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for key, (value, vtype) in (typed_metadata or {}).items():
        writer.add_key_value(key, value, vtype)
    for name, shape in (orig_shapes or {}).items():
        writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8 and qtype not in (Q.F32, Q.F16):
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model_tensors(
    qtype: Q = Q.Q8_0,
    *,
    prefix: str = "",
    drop: tuple[str, ...] = (),
    config: TinyConfig | None = None,
) -> dict[str, tuple[np.ndarray, Q]]:
    """The tiny SteadyDancer state dict, 2-4-axis tensors whose rows fit `qtype`'s blocks quantised."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    out = {}
    for name, value in tiny_state_dict(config).items():
        if name in drop:
            continue
        quantise = 2 <= value.ndim <= 4 and value.shape[-1] % block_size == 0
        out[prefix + name] = (value, qtype if quantise else Q.F32)
    return out

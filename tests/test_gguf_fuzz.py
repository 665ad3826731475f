"""Fuzz: mutated GGUF files load, or fail with one of our named errors; nothing else escapes.

Mutations: flipped bytes (mostly in the header, where structure lives), truncation, and header
integers (counts, lengths, tensor dims, types, offsets) overwritten with random values. A
file that still loads must also dequantise completely.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_testutils import tiny_model_tensors, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steadydancer.errors import SteadyDancerError
from steadydancer.gguf.loader import load_gguf_state_dict
from steadydancer.gguf.ops import dequantize_tensor
from steadydancer.keys import TinyConfig

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A small but complete SteadyDancer GGUF with several types, orig_shape and a 5-D tensor."""
    tensors = tiny_model_tensors(
        Q.Q8_0, prefix="model.diffusion_model.", config=TinyConfig(dim=32, ffn_dim=64, num_layers=1)
    )
    ffn = "model.diffusion_model.blocks.0.ffn.0.weight"
    tensors[ffn] = (tensors[ffn][0].reshape(-1, 256), Q.Q4_K)  # stored flat, shape in orig_shape
    bf = "model.diffusion_model.blocks.0.ffn.2.weight"
    tensors[bf] = (gguf.quants.quantize(tensors[bf][0], Q.BF16), Q.BF16)
    path = write_gguf(
        tmp_path_factory.mktemp("fuzz") / "valid.gguf", tensors, orig_shapes={ffn: (64, 32)}
    )
    load_gguf_state_dict(path)  # the starting point is valid
    reader = gguf.GGUFReader(str(path))
    fields = []  # (offset, width) of header integers worth corrupting
    for f in list(reader.fields.values())[1:]:  # skip GGUF.version: a separate error path
        fields += [
            (
                int(p.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]),
                p.nbytes,
            )
            for p in f.parts
            if p.dtype.kind in "iu" and p.size == 1
        ]
    for t in reader.tensors:
        fields += [
            (
                int(p.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]),
                p.itemsize,
            )
            for p in t.field.parts
            if p.dtype.kind in "iu"
        ]
    return path.read_bytes(), reader.data_offset, sorted(set(fields))


def mutations(
    data: bytes, header_end: int, fields: list[tuple[int, int]]
) -> st.SearchStrategy[bytes]:
    def flip(args):
        out = bytearray(data)
        for pos, bit in args:
            out[pos] ^= 1 << bit
        return bytes(out)

    def set_field(args):
        (offset, width), value = args
        out = bytearray(data)
        out[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(out)

    positions = st.one_of(st.integers(0, header_end - 1), st.integers(0, len(data) - 1))
    flips = st.lists(st.tuples(positions, st.integers(0, 7)), min_size=1, max_size=4).map(flip)
    truncations = st.integers(0, len(data) - 1).map(lambda n: data[:n])
    values = st.one_of(
        st.integers(0, 64),
        st.sampled_from([2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
    )
    field_sets = st.tuples(st.sampled_from(fields), values).map(set_field)
    return st.one_of(flips, truncations, field_sets)


def test_mutated_files_raise_only_named_errors(valid, tmp_path_factory):
    data, header_end, fields = valid
    target = tmp_path_factory.mktemp("fuzz_out") / "mutated.gguf"

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations(data, header_end, fields))
    def check(mutated: bytes) -> None:
        target.write_bytes(mutated)
        try:
            state_dict = load_gguf_state_dict(target)
        except SteadyDancerError:
            return
        for tensor in state_dict.values():
            with np.errstate(all="ignore"):
                dequantize_tensor(tensor)

    check()

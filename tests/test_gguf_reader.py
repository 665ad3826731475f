"""The reader: logical shapes (orig_shape metadata, >4 axes), prefixes, memory mapping, bad files."""

from __future__ import annotations

import time
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf_testutils import write_gguf

from steadydancer.errors import GGUFError, UnsupportedQuantError
from steadydancer.gguf.reader import read_gguf

Q = gguf.GGMLQuantizationType


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_shapes_types_and_bytes(tmp_path):
    w = _rng().standard_normal((64, 256)).astype(np.float32)
    path = write_gguf(
        tmp_path / "a.gguf", {"w": (w, Q.Q4_0), "b": (w[0], Q.F32), "h": (w[:2], Q.F16)}
    )
    with read_gguf(path) as f:
        assert f.architecture == "wan"
        assert f.metadata["general.architecture"] == "wan"
        assert list(f.tensors) == ["w", "b", "h"]  # file order
        t = f.tensors["w"]
        assert (t.shape, t.qtype, t.data.dtype, t.data.ndim) == ((64, 256), Q.Q4_0, np.uint8, 1)
        assert t.nbytes == 64 * 256 // 32 * 18
        assert np.array_equal(t.data, gguf.quants.quantize(w, Q.Q4_0).reshape(-1))
        assert f.tensors["b"].shape == (256,)
        assert np.array_equal(
            f.tensors["h"].data.view(np.float16).reshape(2, 256), w[:2].astype(np.float16)
        )


def test_data_is_memory_mapped_not_copied(tmp_path):
    w = np.ones((256, 256), np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"w": (w, Q.F32)})
    with read_gguf(path) as f:
        base = f.tensors["w"].data
        while not isinstance(base, np.memmap) and base.base is not None:
            base = base.base
        assert isinstance(base, np.memmap)


def test_orig_shape_metadata_gives_the_logical_shape(tmp_path):
    # ComfyUI-GGUF stores a [128, 16, 1, 1] conv flattened to rows of 256 with its real shape aside.
    conv = _rng().standard_normal((128, 16, 1, 1)).astype(np.float32)
    flat = conv.reshape(-1, 256)
    path = write_gguf(
        tmp_path / "o.gguf",
        {"proj.weight": (flat, Q.Q8_0)},
        orig_shapes={"proj.weight": (128, 16, 1, 1)},
    )
    with read_gguf(path) as f:
        t = f.tensors["proj.weight"]
        assert t.shape == (128, 16, 1, 1)
        assert t.stored_shape == (8, 256)


def test_orig_shape_keyed_by_the_name_in_the_file_before_prefix_stripping(tmp_path):
    flat = np.zeros((2, 256), np.float32)
    name = "model.diffusion_model.x.weight"
    path = write_gguf(tmp_path / "p.gguf", {name: (flat, Q.Q8_0)}, orig_shapes={name: (32, 16)})
    with read_gguf(path) as f:
        assert f.tensors["x.weight"].shape == (32, 16)
        assert f.tensors["x.weight"].file_name == name


def test_tensors_with_more_than_four_axes_keep_their_shape(tmp_path):
    w = _rng().standard_normal((8, 36, 1, 2, 2)).astype(np.float32)
    path = write_gguf(tmp_path / "5d.gguf", {"patch_embedding.weight": (w, Q.F32)})
    with read_gguf(path) as f:
        t = f.tensors["patch_embedding.weight"]
        assert t.shape == (8, 36, 1, 2, 2)
        assert np.array_equal(t.data.view(np.float32).reshape(t.shape), w)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_prefix_is_stripped(tmp_path, prefix):
    path = write_gguf(
        tmp_path / "x.gguf", {prefix + "head.modulation": (np.zeros((1, 2, 8), np.float32), Q.F32)}
    )
    with read_gguf(path) as f:
        assert list(f.tensors) == ["head.modulation"]


def test_names_colliding_after_prefix_stripping_are_an_error(tmp_path):
    z = np.zeros(4, np.float32)
    path = write_gguf(tmp_path / "d.gguf", {"model.diffusion_model.a": (z, Q.F32), "a": (z, Q.F32)})
    with pytest.raises(GGUFError, match="both map to 'a'"):
        read_gguf(path)


def test_orig_shape_that_disagrees_with_the_data_is_an_error(tmp_path):
    path = write_gguf(
        tmp_path / "bad.gguf",
        {"w": (np.zeros((2, 256), np.float32), Q.Q8_0)},
        orig_shapes={"w": (3, 100)},
    )
    with pytest.raises(GGUFError, match="original shape"):
        read_gguf(path)


def test_orig_shape_of_the_wrong_type_is_an_error(tmp_path):
    path = write_gguf(
        tmp_path / "t.gguf",
        {"w": (np.zeros(4, np.float32), Q.F32)},
        metadata={"comfy.gguf.orig_shape.w": "4"},
    )
    with pytest.raises(GGUFError, match="array of integers"):
        read_gguf(path)


def test_file_without_architecture(tmp_path):
    path = write_gguf(tmp_path / "n.gguf", {"w": (np.zeros(4, np.float32), Q.F32)}, arch=None)
    with read_gguf(path) as f:
        assert f.architecture is None


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        read_gguf(tmp_path / "empty.gguf")
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 30)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.safetensors")


def _valid(tmp_path):
    w = _rng().standard_normal((4, 256)).astype(np.float32)
    return write_gguf(tmp_path / "v.gguf", {"w": (w, Q.Q8_0), "b": (w[0], Q.F32)})


def _tensor_info_offsets(path):
    """Offsets of (n_dims, first dim, type, data offset) of the first tensor's info record."""
    reader = gguf.GGUFReader(path)
    field = reader.tensors[0].field
    name_len = int(field.parts[0][0])
    n_dims_at = field.offset + 8 + name_len
    n_dims = int(field.parts[2][0])
    type_at = n_dims_at + 4 + 8 * n_dims
    return n_dims_at, n_dims_at + 4, type_at, type_at + 4


@pytest.mark.parametrize("keep", [3, 10, 24, 60, 200, 600])
def test_truncated_file(tmp_path, keep):
    path = _valid(tmp_path)
    data = path.read_bytes()
    assert keep < len(data)
    path.write_bytes(data[:keep])
    with pytest.raises(GGUFError):
        read_gguf(path)


def test_tensor_data_past_the_end_of_the_file(tmp_path):
    path = _valid(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(GGUFError, match=r"truncated file: the data of tensor .b. \(bytes"):
        read_gguf(path)


def test_data_offset_pointing_past_the_end(tmp_path):
    path = _valid(tmp_path)
    *_, offset_at = _tensor_info_offsets(path)
    data = bytearray(path.read_bytes())
    data[offset_at : offset_at + 8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"data of tensor .w. .* lies past"):
        read_gguf(path)


def test_unknown_quant_type_id(tmp_path):
    path = _valid(tmp_path)
    _, _, type_at, _ = _tensor_info_offsets(path)
    data = bytearray(path.read_bytes())
    data[type_at : type_at + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedQuantError, match="unknown GGML type id 77"):
        read_gguf(path)


def test_shape_that_does_not_match_the_byte_size(tmp_path):
    path = _valid(tmp_path)
    _, dim_at, _, _ = _tensor_info_offsets(path)
    data = bytearray(path.read_bytes())
    data[dim_at : dim_at + 8] = (100).to_bytes(8, "little")  # 100 is not a multiple of 32
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError):
        read_gguf(path)


def test_bad_magic_and_version(tmp_path):
    path = _valid(tmp_path)
    data = bytearray(path.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="version 99"):
        read_gguf(path)


def test_huge_array_length_fails_fast_instead_of_looping(tmp_path):
    path = write_gguf(
        tmp_path / "arr.gguf",
        {"w": (np.zeros((2, 256), np.float32), Q.Q8_0)},
        orig_shapes={"w": (2, 256)},
    )
    data = bytearray(path.read_bytes())
    key = b"comfy.gguf.orig_shape.w"
    at = data.index(key) + len(key) + 4 + 4  # value type ARRAY, element type INT32, then length
    data[at : at + 8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"truncated or corrupt.*metadata"):
        read_gguf(path)


def test_big_endian_file_is_refused(tmp_path):
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(str(path), "wan", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("w", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="big-endian"):
        read_gguf(path)


# --- hardening: counts and lengths are bounded by the file before anything is read --------
# (regression tests for the metadata DoS: one corrupt array count made the reader walk the
# array one element at a time until EOF, ~7 CPU-seconds and 170 MB of RAM per MB of file)


def _with_orig_shape_array(tmp_path, item_type, count, pad):
    """A valid file whose orig_shape array gets element type `item_type` and length `count`,
    followed by `pad` zero bytes (the rest of a large file)."""
    path = write_gguf(
        tmp_path / "arr.gguf",
        {"w": (np.zeros((2, 256), np.float32), Q.Q8_0)},
        orig_shapes={"w": (2, 256)},
    )
    data = bytearray(path.read_bytes())
    key = b"comfy.gguf.orig_shape.w"
    at = data.index(key) + len(key) + 4  # after the value type ARRAY: element type, then length
    data[at : at + 4] = int(item_type).to_bytes(4, "little")
    data[at + 4 : at + 12] = count.to_bytes(8, "little")
    path.write_bytes(bytes(data) + bytes(pad))
    return path


def _measured(fn):
    """(exception, seconds, peak traced bytes) of fn()."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:
        error = exc
    else:
        error = None
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return error, elapsed, peak


@pytest.mark.parametrize(
    "item_type", [t for t in gguf.GGUFValueType if t != gguf.GGUFValueType.ARRAY], ids=lambda t: t.name
)
def test_huge_array_count_in_a_large_file_is_refused_at_once(tmp_path, item_type):
    # The fuzzer's input: 2**62 elements declared, 1 MiB of zeros after it. The old reader
    # took ~10 CPU-seconds and ~700 MB here (uint8 elements), walking the zeros one by one.
    path = _with_orig_shape_array(tmp_path, item_type, 2**62, 1 << 20)
    error, elapsed, peak = _measured(lambda: read_gguf(path))
    assert isinstance(error, GGUFError)
    assert "declares 4,611,686,018,427,387,904" in str(error) and "metadata" in str(error)
    assert elapsed < 0.5
    assert peak < 256 * 1024


@pytest.mark.parametrize(
    "item_type",
    [gguf.GGUFValueType.UINT8, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.STRING],
    ids=lambda t: t.name,
)
def test_array_count_one_more_than_the_file_holds_is_refused(tmp_path, item_type):
    pad = 4096
    # the array starts 12 bytes before the end of the original file; everything after it,
    # including the tensor table and data (~600 bytes) and the padding, could be elements
    size = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.UINT64: 8, gguf.GGUFValueType.STRING: 8}
    path = _with_orig_shape_array(tmp_path, item_type, 0, pad)
    data = path.read_bytes()
    key = b"comfy.gguf.orig_shape.w"
    start = data.index(key) + len(key) + 4 + 12
    count = (len(data) - start) // size[item_type] + 1
    path = _with_orig_shape_array(tmp_path, item_type, count, pad)
    with pytest.raises(GGUFError, match=f"declares {count:,}"):
        read_gguf(path)


def test_large_genuine_metadata_arrays_are_read_in_one_step_and_decoded_on_demand(tmp_path):
    strings = ["", "a", "wan", "ü"] * 25_000
    path = write_gguf(
        tmp_path / "big.gguf",
        {"w": (np.zeros(4, np.float32), Q.F32)},
        typed_metadata={
            "big.bytes": (bytes(range(256)) * 4096, gguf.GGUFValueType.ARRAY),  # 1 MiB
            "big.strings": (strings, gguf.GGUFValueType.ARRAY),
        },
    )
    file_size = path.stat().st_size
    error, _, peak = _measured(lambda: read_gguf(path).close())
    assert error is None
    assert peak < 256 * 1024 + file_size // 8  # nothing per element: ~one pass over the strings
    # timed without tracemalloc, whose bookkeeping multiplied this by 3-4 and made a 1 s bound
    # fail on a loaded machine; a reader that built 100,000 Python strings takes several seconds
    start = time.perf_counter()
    read_gguf(path).close()
    assert time.perf_counter() - start < 1.0
    with read_gguf(path) as f:
        assert f.metadata.types("big.bytes") == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
        assert f.metadata.count("big.strings") == len(strings)
        assert f.metadata["big.bytes"][:4] == [0, 1, 2, 3] and len(f.metadata["big.bytes"]) == 1 << 20
        assert f.metadata["big.strings"] == strings


def test_metadata_values_keep_their_python_types(tmp_path):
    typed = {
        "t.u8": (7, gguf.GGUFValueType.UINT8),
        "t.i16": (-700, gguf.GGUFValueType.INT16),
        "t.f32": (0.5, gguf.GGUFValueType.FLOAT32),
        "t.bool": (True, gguf.GGUFValueType.BOOL),
        "t.u64": (2**40, gguf.GGUFValueType.UINT64),
        "t.f64": (0.25, gguf.GGUFValueType.FLOAT64),
        "t.str": ("SteadyDancer ✓", gguf.GGUFValueType.STRING),
        "t.ints": ([1, -2, 3], gguf.GGUFValueType.ARRAY),
        "t.floats": ([0.5, 1.5], gguf.GGUFValueType.ARRAY),
        "t.bools": ([True, False], gguf.GGUFValueType.ARRAY),
        "t.strings": (["a", "", "ü"], gguf.GGUFValueType.ARRAY),
    }
    path = write_gguf(tmp_path / "t.gguf", {"w": (np.zeros(4, np.float32), Q.F32)}, typed_metadata=typed)
    with read_gguf(path) as f:
        for key, (value, _) in typed.items():
            assert f.metadata[key] == value, key
            assert type(f.metadata[key]) is type(value), key
        assert dict(f.metadata)["general.architecture"] == "wan"


def test_membership_does_not_decode_the_value(tmp_path, monkeypatch):
    from steadydancer.gguf import reader

    path = write_gguf(tmp_path / "m.gguf", {"w": (np.zeros(4, np.float32), Q.F32)}, orig_shapes={"w": (2, 2)})
    with read_gguf(path) as f:
        monkeypatch.setattr(reader, "_decode_array", lambda *a: pytest.fail("decoded"))
        assert "comfy.gguf.orig_shape.w" in f.metadata
        assert "nope" not in f.metadata


def _edit(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_string_length_past_the_end_is_refused(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", {"w": (np.zeros(4, np.float32), Q.F32)}, metadata={"x.s": "hello"})
    _edit(path, (5).to_bytes(8, "little") + b"hello", (2**40).to_bytes(8, "little") + b"hello")
    with pytest.raises(GGUFError, match="metadata needs bytes"):
        read_gguf(path)


def test_unknown_value_type_nested_arrays_and_duplicate_keys_are_refused(tmp_path):
    def one(typed):
        return write_gguf(tmp_path / "v.gguf", {"w": (np.zeros(4, np.float32), Q.F32)}, typed_metadata=typed)

    path = one({"x.a": (7, gguf.GGUFValueType.UINT32)})
    _edit(path, b"x.a" + (4).to_bytes(4, "little"), b"x.a" + (13).to_bytes(4, "little"))
    with pytest.raises(GGUFError, match=r"unknown value type 13 for the key 'x\.a'"):
        read_gguf(path)
    path = one({"x.n": ([[1, 2], [3]], gguf.GGUFValueType.ARRAY)})
    with pytest.raises(GGUFError, match=r"array of arrays for 'x\.n'"):
        read_gguf(path)
    path = one({"x.a": (7, gguf.GGUFValueType.UINT32), "x.b": (8, gguf.GGUFValueType.UINT32)})
    _edit(path, b"x.b", b"x.a")
    with pytest.raises(GGUFError, match=r"key 'x\.a' twice"):
        read_gguf(path)


def test_tensor_count_larger_than_the_file_can_hold_is_refused(tmp_path):
    path = _valid(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    error, elapsed, _ = _measured(lambda: read_gguf(path))
    assert isinstance(error, GGUFError) and "declares 1,099,511,627,776 tensors" in str(error)
    assert elapsed < 0.5


@pytest.mark.parametrize("dim", [2**63, 2**64 - 1])
def test_dimension_negative_as_int64_is_refused(tmp_path, dim):
    path = _valid(tmp_path)
    _, dim_at, _, _ = _tensor_info_offsets(path)
    data = bytearray(path.read_bytes())
    data[dim_at : dim_at + 8] = dim.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="negative as a signed 64-bit"):
        read_gguf(path)


def test_too_many_axes_are_refused(tmp_path):
    path = _valid(tmp_path)
    n_dims_at, _, _, _ = _tensor_info_offsets(path)
    data = bytearray(path.read_bytes())
    data[n_dims_at : n_dims_at + 4] = (2**31).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="2,147,483,648 axes"):
        read_gguf(path)


def test_overlapping_tensor_data_is_refused_and_misaligned_data_is_read(tmp_path):
    w = _rng().standard_normal((4, 256)).astype(np.float32)
    path = write_gguf(tmp_path / "o.gguf", {"a": (w[0], Q.F32), "b": (w[1], Q.F32)})
    reader = gguf.GGUFReader(path)
    offset_b = reader.tensors[1].field.offset + 8 + 1 + 4 + 8 + 4  # name, n_dims, 1 dim, type
    data = bytearray(path.read_bytes())
    base = reader.data_offset

    data[offset_b : offset_b + 8] = (4).to_bytes(8, "little")  # inside a's 1024 bytes
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="data of tensors 'a' and 'b' overlap"):
        read_gguf(path)

    # b moved 2 bytes on (not a multiple of the alignment, nor of 4): read where it says
    data[offset_b : offset_b + 8] = (1024 + 32 + 2).to_bytes(8, "little")
    data[base + 1024 + 32 + 2 : base + 2048 + 32 + 2] = w[1].tobytes()
    path.write_bytes(bytes(data) + bytes(64))
    with read_gguf(path) as f:
        assert np.array_equal(f.tensors["b"].data.view(np.uint8).tobytes(), w[1].tobytes())


def test_long_names_are_cut_short_in_messages(tmp_path):
    name = "n" * 5000
    z = np.zeros(4, np.float32)
    path = write_gguf(tmp_path / "d.gguf", {"model." + name: (z, Q.F32), name: (z, Q.F32)})
    with pytest.raises(GGUFError, match=r"\.\.\. \(5,000 characters\)") as info:
        read_gguf(path)
    assert len(str(info.value)) < 600

"""The reader: logical shapes (orig_shape metadata, >4 axes), prefixes, memory mapping, bad files."""

from __future__ import annotations

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

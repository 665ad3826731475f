"""load_gguf_state_dict: tensors as the model needs them, and every wrong file refused by name."""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
import torch
from gguf_testutils import tiny_model_tensors, write_gguf

from steadydancer.errors import GGUFError, ModelFileError, UnsupportedQuantError
from steadydancer.gguf.loader import load_gguf_state_dict, to_torch
from steadydancer.gguf.ops import GGMLTensor, is_quantized
from steadydancer.gguf.reader import read_gguf
from steadydancer.keys import POSE_PATH_KEYS, tiny_state_dict

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny_q8.gguf"
    return write_gguf(path, tiny_model_tensors(Q.Q8_0, prefix="model.diffusion_model."))


def test_every_tensor_with_its_logical_shape(tiny_file):
    sd = load_gguf_state_dict(tiny_file)
    reference = tiny_state_dict()
    assert set(sd) == set(reference)
    for name, value in reference.items():
        assert tuple(sd[name].shape) == value.shape, name


def test_quantised_tensors_stay_packed_and_float_ones_are_plain(tiny_file):
    sd = load_gguf_state_dict(tiny_file)
    q = sd["blocks.0.ffn.0.weight"]
    assert isinstance(q, GGMLTensor) and is_quantized(q)
    assert q.tensor_type == Q.Q8_0 and q.dtype == torch.uint8
    assert q.numel() == 128 * 64 // 32 * 34  # packed bytes, not elements
    ref = tiny_state_dict()["blocks.0.ffn.0.weight"]
    assert np.abs(q.dequantize().numpy() - ref).max() <= np.abs(ref).max() / 127 + 1e-7
    b = sd["blocks.0.ffn.0.bias"]
    assert type(b) is torch.Tensor and b.dtype == torch.float32
    assert torch.equal(b, torch.from_numpy(tiny_state_dict()["blocks.0.ffn.0.bias"]))
    assert sd["patch_embedding_fuse.weight"].shape == (64, 68, 1, 2, 2)


def test_in_place_writes_never_reach_the_file(tiny_file):
    sd = load_gguf_state_dict(tiny_file)
    a = load_gguf_state_dict(tiny_file)["blocks.0.ffn.0.bias"]
    # The mapping is copy-on-write: ComfyUI patching a weight in place cannot crash or corrupt.
    a.add_(1.0)
    assert not torch.equal(a, sd["blocks.0.ffn.0.bias"])
    assert torch.equal(
        load_gguf_state_dict(tiny_file)["blocks.0.ffn.0.bias"], sd["blocks.0.ffn.0.bias"]
    )


def test_bf16_and_f16_tensors_keep_their_dtype(tmp_path):
    tensors = tiny_model_tensors(Q.Q8_0)
    w = tensors["blocks.0.ffn.0.weight"][0]
    tensors["blocks.0.ffn.0.weight"] = (gguf.quants.quantize(w, Q.BF16), Q.BF16)
    tensors["blocks.0.ffn.2.weight"] = (tensors["blocks.0.ffn.2.weight"][0], Q.F16)
    sd = load_gguf_state_dict(write_gguf(tmp_path / "m.gguf", tensors))
    bf = sd["blocks.0.ffn.0.weight"]
    assert bf.dtype == torch.bfloat16 and bf.shape == (128, 64)
    assert torch.equal(bf, torch.from_numpy(w).to(torch.bfloat16))
    assert sd["blocks.0.ffn.2.weight"].dtype == torch.float16


def test_file_without_architecture_is_accepted_by_its_wan_keys(tmp_path):
    path = write_gguf(tmp_path / "sdcpp.gguf", tiny_model_tensors(), arch=None)
    assert "head.modulation" in load_gguf_state_dict(path)


def test_undeclared_file_that_is_not_wan_is_refused(tmp_path):
    tensors = {"double_blocks.0.img_attn.proj.weight": (np.zeros((32, 32), np.float32), Q.F32)}
    path = write_gguf(tmp_path / "flux.gguf", tensors, arch=None)
    with pytest.raises(ModelFileError, match="not a Wan"):
        load_gguf_state_dict(path)


def test_other_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "flux.gguf", tiny_model_tensors(), arch="flux")
    with pytest.raises(ModelFileError, match="'flux' model"):
        load_gguf_state_dict(path)


def test_plain_wan_file_is_refused_with_a_clear_message(tmp_path):
    path = write_gguf(tmp_path / "wan.gguf", tiny_model_tensors(drop=POSE_PATH_KEYS))
    with pytest.raises(ModelFileError, match=r"plain Wan2\.1 model, not SteadyDancer"):
        load_gguf_state_dict(path)
    sd = load_gguf_state_dict(path, require_pose_path=False)
    assert "patch_embedding.weight" in sd and "patch_embedding_fuse.weight" not in sd


def test_partly_missing_pose_path_names_every_missing_tensor(tmp_path):
    drop = ("condition_embedding_align.norm1.weight", "condition_embedding_spatial.fc_phi.weight")
    path = write_gguf(tmp_path / "part.gguf", tiny_model_tensors(drop=drop))
    with pytest.raises(ModelFileError, match="2 pose-path tensors are missing") as info:
        load_gguf_state_dict(path)
    for name in drop:
        assert name in str(info.value)


def test_unsupported_quant_type_names_the_tensors(tmp_path):
    tensors = tiny_model_tensors()
    tensors["blocks.0.ffn.0.weight"] = (
        np.zeros(128 * 64 // 32 * 18, np.uint8).reshape(128, -1),
        Q.IQ4_NL,
    )
    path = write_gguf(tmp_path / "iq.gguf", tensors)
    with pytest.raises(UnsupportedQuantError, match=r"blocks\.0\.ffn\.0\.weight \(IQ4_NL\)"):
        load_gguf_state_dict(path)


def test_not_gguf_and_truncated(tmp_path, tiny_file):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf_state_dict(bad)
    bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf_state_dict(bad)


def test_reads_the_layout_comfyui_gguf_tools_write(tmp_path):
    """convert.py (BF16 main weights, F32 1-D) + fix_5d_tensors.py (5-D convs as F32 with 5 dims)."""
    path = write_gguf(
        tmp_path / "cg.gguf", tiny_model_tensors(Q.BF16, prefix="model.diffusion_model.")
    )
    sd = load_gguf_state_dict(path)
    for name, value in tiny_state_dict().items():
        expected = torch.from_numpy(value)
        if value.ndim in (2, 3, 4):
            expected = expected.to(torch.bfloat16)
        assert sd[name].dtype == expected.dtype and torch.equal(sd[name], expected), name
    assert sd["condition_embedding_temporal.0.spatial.weight"].shape == (16, 1, 1, 3, 3)


def test_unaligned_float_data_from_a_custom_alignment(tmp_path):
    tensors = tiny_model_tensors()
    writer_path = tmp_path / "align1.gguf"
    writer = gguf.GGUFWriter(str(writer_path), "wan")
    writer.add_custom_alignment(1)
    writer.add_tensor(
        "odd", np.zeros(3, np.uint8), raw_dtype=Q.I8
    )  # 3 bytes: what follows is unaligned
    for name, (value, qtype) in tensors.items():
        writer.add_tensor(
            name, value if qtype == Q.F32 else gguf.quants.quantize(value, qtype), raw_dtype=qtype
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedQuantError, match=r"odd \(I8\)"):
        load_gguf_state_dict(writer_path)
    with read_gguf(writer_path) as file:
        bias = file.tensors["blocks.0.ffn.0.bias"]
        assert bias.data.ctypes.data % 4 != 0  # really unaligned
        expected = torch.from_numpy(tiny_state_dict()["blocks.0.ffn.0.bias"])
        assert torch.equal(to_torch(bias), expected)


# --- config_from_state_dict on what the loader returns: every bad shape is ModelFileError ---
# (regression tests for files that load but made config_from_state_dict build a range of
# ~10**20 blocks, or raise IndexError / ZeroDivisionError)


def _config_of(path):
    from steadydancer.model import config_from_state_dict

    return config_from_state_dict(load_gguf_state_dict(path))


@pytest.mark.parametrize("number", ["99999999999999999999", "9" * 5000, "1000000", "130"])
def test_absurd_block_number_is_refused_before_anything_is_sized(tmp_path, number):
    tensors = tiny_model_tensors(Q.Q8_0, prefix="model.diffusion_model.")
    name = "model.diffusion_model.blocks.1.norm3.weight"
    tensors[f"model.diffusion_model.blocks.{number}.norm3.weight"] = tensors.pop(name)
    path = write_gguf(tmp_path / "blocks.gguf", tensors)
    sd = load_gguf_state_dict(path)  # the reader does not care about block numbers
    assert len(sd) < 130
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match=f"block number {number[:24]}, impossible in a file of"):
        _config_of(path)
    assert time.perf_counter() - t0 < 1.0


def test_block_gap_is_still_named(tmp_path):
    tensors = tiny_model_tensors(Q.Q8_0)
    tensors["blocks.5.norm3.weight"] = tensors.pop("blocks.1.norm3.weight")
    with pytest.raises(ModelFileError, match=r"missing blocks 2, 3, 4$"):
        _config_of(write_gguf(tmp_path / "gap.gguf", tensors))


def _with(tensors, name, value):
    tensors[name] = (np.asarray(value, np.float32), Q.F32)
    return tensors


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("head.modulation", np.float32(1.0)),  # rank 0: was IndexError
        ("head.modulation", np.zeros(128)),  # rank 1 (a coherent reshape of (1, 2, 64))
        ("text_embedding.0.weight", np.zeros(64 * 32)),  # rank 1: was IndexError
        ("img_emb.proj.1.weight", np.zeros((48, 48, 1))),
        ("time_embedding.0.weight", np.zeros((64,))),
        ("patch_embedding_ref_c.weight", np.zeros((64, 16))),
        ("blocks.0.ffn.0.weight", np.zeros((128, 64, 1))),
        ("head.head.weight", np.zeros((64,))),
        ("patch_embedding.weight", np.zeros((64, 36))),
    ],
)
def test_tensor_of_the_wrong_rank_is_refused(tmp_path, name, value):
    path = write_gguf(tmp_path / "rank.gguf", _with(tiny_model_tensors(Q.Q8_0), name, value))
    with pytest.raises(ModelFileError, match=rf"{name}( has shape|: expected)"):
        _config_of(path)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("patch_embedding.weight", (64, 36, 1, 0, 2)),  # zero patch: was ZeroDivisionError
        ("patch_embedding.weight", (64, 36, 1, 2, 0)),
        ("head.modulation", (1, 2, 0)),  # dim 0: was ZeroDivisionError
        ("head.head.weight", (0, 64)),
        ("blocks.0.ffn.0.weight", (0, 64)),
        ("text_embedding.0.weight", (64, 0)),
    ],
)
def test_zero_size_is_refused(tmp_path, name, shape):
    path = write_gguf(tmp_path / "zero.gguf", _with(tiny_model_tensors(Q.Q8_0), name, np.zeros(shape)))
    with pytest.raises(ModelFileError, match="positive sizes"):
        _config_of(path)


def test_head_rows_not_a_multiple_of_the_patch_is_refused(tmp_path):
    tensors = _with(tiny_model_tensors(Q.Q8_0), "head.head.weight", np.zeros((66, 64)))
    with pytest.raises(ModelFileError, match="66 rows, not a multiple of the 4"):
        _config_of(write_gguf(tmp_path / "head.gguf", tensors))


def test_wrong_rank_through_orig_shape_metadata(tmp_path):
    # readable (the element count agrees), but the model has no such shape
    tensors = tiny_model_tensors(Q.Q8_0)
    path = write_gguf(tmp_path / "r.gguf", tensors, orig_shapes={"head.modulation": (128,)})
    assert load_gguf_state_dict(path)["head.modulation"].shape == (128,)
    with pytest.raises(ModelFileError, match=r"head\.modulation has shape \(128,\)"):
        _config_of(path)


def test_only_ascii_digits_number_a_block():
    # "blocks.٣." (ARABIC-INDIC DIGIT THREE) is not block 3: it is an unknown tensor
    import torch

    from steadydancer.keys import tiny_state_dict
    from steadydancer.model import config_from_state_dict

    sd = {k: torch.from_numpy(v) for k, v in tiny_state_dict().items()}
    sd["blocks.\u0663.norm3.weight"] = sd["blocks.1.norm3.weight"]
    assert config_from_state_dict(sd).num_layers == 2

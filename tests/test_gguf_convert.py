"""The converter: tiny SteadyDancer -> safetensors -> GGUF -> loader round trip, conventions, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steadydancer.errors import GGUFError, ModelFileError, UnsupportedQuantError
from steadydancer.gguf import convert as convert_module
from steadydancer.gguf.convert import choose_storage, convert_file
from steadydancer.gguf.loader import load_gguf_state_dict
from steadydancer.gguf.ops import dequantize_tensor, is_quantized
from steadydancer.keys import POSE_PATH_KEYS, tiny_state_dict

Q = gguf.GGMLQuantizationType
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANT_BOUND = {
    "Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q5_1": 0.06, "Q5_0": 0.06,
    "Q4_K": 0.12, "Q4_1": 0.12, "Q4_0": 0.12, "Q3_K": 0.25, "Q2_K": 0.45,
}  # fmt: skip
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_tiny(path, dtype=torch.float32, prefix="model.diffusion_model.", drop=()):
    sd = {
        prefix + k: torch.from_numpy(v).to(dtype)
        for k, v in tiny_state_dict().items()
        if k not in drop
    }
    save_file(sd, str(path))
    return {k[len(prefix) :]: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {
        name: (root / f"tiny_{name}.safetensors", save_tiny(root / f"tiny_{name}.safetensors", dt))
        for name, dt in TORCH.items()
    }


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_round_trip_is_exact_for_float_types(tmp_path, sources, name):
    src, source = sources[name]
    dst = tmp_path / "out.gguf"
    report = convert_file(src, dst, name, progress=False)
    assert report.tensors == len(source) and not report.missing_pose_path
    loaded = load_gguf_state_dict(dst)
    assert set(loaded) == set(source)
    for key, value in source.items():
        got = loaded[key]
        assert not is_quantized(got) and got.shape == value.shape, key
        assert torch.equal(got.to(value.dtype), value), key


def test_float_targets_round_like_torch_from_a_float32_source(tmp_path, sources):
    src, source = sources["F32"]
    for name in ("F16", "BF16"):
        dst = tmp_path / f"{name}.gguf"
        convert_file(src, dst, name, progress=False)
        loaded = load_gguf_state_dict(dst)
        w = "blocks.0.ffn.0.weight"
        assert loaded[w].dtype == TORCH[name]
        assert torch.equal(loaded[w], source[w].to(TORCH[name]))


@pytest.mark.parametrize("name", sorted(QUANT_BOUND))
def test_round_trip_within_the_quant_error(tmp_path, sources, name):
    src, source = sources["BF16"]
    dst = tmp_path / "q.gguf"
    report = convert_file(src, dst, name, progress=False)
    loaded = load_gguf_state_dict(dst)
    assert set(loaded) == set(source)
    quantised = 0
    for key, value in source.items():
        got = loaded[key]
        assert tuple(got.shape) == tuple(value.shape), key
        ref = value.float()
        if is_quantized(got):
            quantised += 1
            err = (dequantize_tensor(got, torch.float32) - ref).norm() / ref.norm()
            assert err <= QUANT_BOUND[name], f"{key}: {err:.4f}"
        else:  # kept in F32: 1-D, small, .modulation, >4 axes
            assert got.dtype == torch.float32 and torch.equal(got, ref), key
    assert quantised == report.types[name] > 0


def test_storage_rules_follow_comfyui_gguf():
    t = Q.Q4_K
    assert choose_storage("blocks.0.norm3.weight", (5120,), "BF16", t) == (Q.F32, (5120,))
    assert choose_storage("x.weight", (16, 16, 1, 1), "BF16", t) == (
        Q.F32,
        (16, 16, 1, 1),
    )  # 256 <= 1024
    assert choose_storage("blocks.3.modulation", (1, 6, 5120), "BF16", t) == (Q.F32, (1, 6, 5120))
    assert choose_storage("patch_embedding.weight", (5120, 36, 1, 2, 2), "BF16", t) == (
        Q.F32,
        (5120, 36, 1, 2, 2),
    )
    assert choose_storage("blocks.0.ffn.0.weight", (13824, 5120), "BF16", t) == (
        Q.Q4_K,
        (13824, 5120),
    )
    # last axis not a multiple of 256: rows of 256 (orig_shape written), or the source float type
    assert choose_storage("a.in_proj_weight", (384, 128), "BF16", t) == (Q.Q4_K, (192, 256))
    assert choose_storage("a.w", (40, 40), "BF16", t) == (Q.BF16, (40, 40))
    assert choose_storage("a.w", (40, 40), "F8_E4M3", t) == (Q.F32, (40, 40))
    assert choose_storage("a.w", (48, 24), "F16", Q.Q8_0) == (Q.Q8_0, (36, 32))


def test_file_follows_comfyui_gguf_conventions(tmp_path, sources):
    src, source = sources["BF16"]
    dst = tmp_path / "c.gguf"
    report = convert_file(src, dst, "Q4_K", progress=False)
    reader = gguf.GGUFReader(str(dst))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == "wan"
    assert (
        int(reader.get_field("general.file_type").parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_S
    )
    by_name = {t.name: t for t in reader.tensors}
    assert not any(n.startswith("model.") for n in by_name)
    assert by_name["patch_embedding_fuse.weight"].tensor_type == Q.F32
    assert tuple(reversed(by_name["patch_embedding_fuse.weight"].shape.tolist())) == (
        64,
        68,
        1,
        2,
        2,
    )
    assert by_name["blocks.0.modulation"].tensor_type == Q.F32
    assert report.reshaped
    for name in report.reshaped:
        # exactly what ComfyUI-GGUF's loader requires: an ARRAY of INT32 under this key
        field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
        assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
        assert tuple(int(field.parts[i][0]) for i in field.data) == tuple(source[name].shape)


def test_fp8_scaled_source_as_in_kijai_files(tmp_path):
    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny_state_dict().items()}
    expected = {}
    for key in ("blocks.0.ffn.0.weight", "blocks.1.self_attn.q.weight"):
        w8 = torch.from_numpy(rng.standard_normal(sd[key].shape).astype(np.float32)).to(
            torch.float8_e4m3fn
        )
        scale = torch.tensor(0.0123, dtype=torch.float32)
        sd[key] = w8
        sd[key.replace(".weight", ".scale_weight")] = scale
        expected[key] = w8.to(torch.float32) * scale
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)  # marker tensor of those files
    src = tmp_path / "fp8.safetensors"
    save_file(
        {"model.diffusion_model." + k if k != "scaled_fp8" else k: v for k, v in sd.items()},
        str(src),
    )
    dst = tmp_path / "fp8.gguf"
    report = convert_file(src, dst, "F32", progress=False)
    loaded = load_gguf_state_dict(dst)
    assert "scaled_fp8" not in loaded and not any(k.endswith("scale_weight") for k in loaded)
    assert report.tensors == len(tiny_state_dict())
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_converter_streams_tensor_by_tensor(tmp_path, sources, monkeypatch):
    events = []
    load, write = convert_module._load, gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(convert_module, "_load", lambda h, p: events.append("read") or load(h, p))
    monkeypatch.setattr(
        gguf.GGUFWriter,
        "write_tensor_data",
        lambda self, t: events.append("write") or write(self, t),
    )
    convert_file(sources["F32"][0], tmp_path / "s.gguf", "Q8_0", progress=False)
    assert events == ["read", "write"] * len(tiny_state_dict())


def test_plain_wan_source_converts_with_a_warning(tmp_path):
    src = tmp_path / "wan.safetensors"
    save_tiny(src, drop=POSE_PATH_KEYS)
    messages = []
    report = convert_file(src, tmp_path / "wan.gguf", "Q8_0", progress=False, log=messages.append)
    assert len(report.missing_pose_path) == len(POSE_PATH_KEYS)
    assert any("pose-path tensors are missing" in m for m in messages)


def test_errors(tmp_path, sources):
    src = sources["F32"][0]
    with pytest.raises(ModelFileError, match="no such file"):
        convert_file(tmp_path / "missing.safetensors", tmp_path / "x.gguf")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        convert_file(bad, tmp_path / "x.gguf")
    other = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(ModelFileError, match="not a Wan model"):
        convert_file(other, tmp_path / "x.gguf")
    with pytest.raises(UnsupportedQuantError, match="IQ2_XS"):
        convert_file(src, tmp_path / "x.gguf", "IQ2_XS")
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(ModelFileError, match="exists"):
        convert_file(src, existing)
    assert existing.read_bytes() == b"keep me"


def test_failed_conversion_leaves_no_file(tmp_path):
    src = tmp_path / "big.safetensors"
    sd = {k: torch.from_numpy(v) for k, v in tiny_state_dict().items()}
    sd["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"] * 1e6  # beyond the F16 range
    save_file(sd, str(src))
    dst = tmp_path / "big.gguf"
    with pytest.raises(GGUFError, match=r"blocks\.1\.ffn\.2\.weight.*F16 range"):
        convert_file(src, dst, "F16", progress=False)
    assert not dst.exists() and not (tmp_path / "big.gguf.part").exists()


def _run(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_cli_convert_then_inspect(tmp_path, sources):
    dst = tmp_path / "cli.gguf"
    r = _run("steadydancer.gguf.convert", str(sources["BF16"][0]), str(dst), "--type", "Q4_K")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "Q4_K" in r.stdout
    assert "to Q4_K" in r.stderr  # the progress bar
    r = _run("steadydancer.gguf.inspect", str(dst))
    assert r.returncode == 0, r.stderr
    assert "architecture:  wan" in r.stdout
    assert f"tensors:       {len(tiny_state_dict())}" in r.stdout
    assert "Q4_K" in r.stdout and "F32" in r.stdout
    assert f"pose path:     present ({len(POSE_PATH_KEYS)} tensors)" in r.stdout
    assert "usable:        yes" in r.stdout


def test_cli_reports_problems_with_exit_status_1(tmp_path, sources):
    r = _run(
        "steadydancer.gguf.convert",
        str(sources["F32"][0]),
        str(tmp_path / "x.gguf"),
        "--type",
        "IQ2_XS",
    )
    assert r.returncode == 1 and "error: cannot write IQ2_XS" in r.stderr
    src = tmp_path / "wan.safetensors"
    save_tiny(src, drop=POSE_PATH_KEYS[:3])
    dst = tmp_path / "wan.gguf"
    assert _run("steadydancer.gguf.convert", str(src), str(dst), "--quiet").returncode == 0
    r = _run("steadydancer.gguf.inspect", str(dst))
    assert r.returncode == 1
    assert "INCOMPLETE: 3 of" in r.stdout and POSE_PATH_KEYS[0] in r.stdout
    r = _run("steadydancer.gguf.inspect", str(sources["F32"][0]))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr

"""Loading the DiT from files: GGUF (stays quantised), safetensors, Kijai's scaled fp8."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from gguf_testutils import tiny_model_tensors, write_gguf
from safetensors.torch import save_file
from test_model import make_inputs, rel, tiny_sd
from tiny_files import scaled_fp8

from steadydancer.errors import ModelFileError
from steadydancer.gguf.ops import GGMLOps, is_quantized
from steadydancer.keys import POSE_PATH_KEYS
from steadydancer.model import load_model
from steadydancer.weights import dequantize_fp8, load_weights

Q = gguf.GGMLQuantizationType


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def test_saved_state_dict_reloads_to_identical_outputs(tmp_path: Path):
    model = load_model(tiny_sd(seed=2), dtype=torch.float32, attention="math")
    inputs = make_inputs(b=2)
    expected = _run(model, inputs)
    path = tmp_path / "tiny.safetensors"
    save_file(
        {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
        str(path),
    )
    again = load_model(path, dtype=torch.float32, attention="math")
    assert torch.equal(_run(again, inputs), expected)


def test_bf16_and_fp16_safetensors_load_in_the_compute_dtype(tmp_path: Path):
    sd = tiny_sd(seed=3)
    inputs = make_inputs()
    ref = _run(load_model(sd, dtype=torch.float32, attention="math"), inputs)
    for dtype in (torch.bfloat16, torch.float16):
        path = tmp_path / f"tiny_{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(path))
        loaded = load_weights(path)
        assert {v.dtype for v in loaded.values()} == {dtype}
        model = load_model(path, dtype=dtype, attention="math")
        assert model.blocks[0].self_attn.q.weight.dtype == dtype
        assert model.blocks[0].modulation.dtype == torch.float32  # modulation tables stay fp32
        assert rel(_run(model, inputs), ref) < 3e-2


def _fp8_file(path: Path, sd: dict[str, torch.Tensor], scale_name: str) -> dict[str, torch.Tensor]:
    out = scaled_fp8(sd, scale_name)
    save_file(out, str(path))
    return out


@pytest.mark.parametrize("scale_name", ["scale_weight", "weight_scale"])
def test_scaled_fp8_safetensors(tmp_path: Path, scale_name: str):
    sd = tiny_sd(seed=4)
    path = tmp_path / "tiny_fp8_e4m3fn_scaled_KJ.safetensors"
    raw = _fp8_file(path, sd, scale_name)
    loaded = load_weights(path, dtype=torch.float32)
    assert set(loaded) == set(sd)  # prefix stripped, scales and marker dropped
    key = "blocks.0.self_attn.q.weight"
    fp8 = raw[f"model.diffusion_model.{key}"]
    scale = raw[f"model.diffusion_model.blocks.0.self_attn.q.{scale_name}"]
    assert torch.equal(loaded[key], fp8.float() * scale)
    assert rel(loaded[key], sd[key]) < 0.05  # fp8 e4m3: 3 mantissa bits
    inputs = make_inputs()
    ref = _run(load_model(sd, dtype=torch.float32, attention="math"), inputs)
    out = _run(load_model(path, dtype=torch.bfloat16, attention="math"), inputs)
    assert rel(out, ref) < 0.1


def test_fp8_scale_per_row_and_bad_scale():
    w = torch.randn(4, 8)
    rows = w.abs().amax(1) / 448.0
    q = (w / rows[:, None]).to(torch.float8_e4m3fn)
    out = dequantize_fp8({"a.weight": q, "a.scale_weight": rows}, torch.float32)
    torch.testing.assert_close(out["a.weight"], q.float() * rows[:, None])
    with pytest.raises(ModelFileError, match=r"scale of a\.weight"):
        dequantize_fp8({"a.weight": q, "a.scale_weight": torch.ones(3)}, torch.float32)
    with pytest.raises(ModelFileError, match="scales without a weight"):
        dequantize_fp8({"b.scale_weight": torch.ones(1)}, torch.float32)


def test_plain_wan_safetensors_refused(tmp_path: Path):
    path = tmp_path / "wan2.1_i2v.safetensors"
    save_file({k: v for k, v in tiny_sd().items() if k not in POSE_PATH_KEYS}, str(path))
    with pytest.raises(ModelFileError, match=r"plain Wan2\.1"):
        load_model(path)
    with pytest.raises(ModelFileError, match="no such file"):
        load_weights(tmp_path / "missing.safetensors")
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"1234")
    with pytest.raises(ModelFileError, match="unsupported file type"):
        load_weights(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_weights(junk)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K])
def test_gguf_model_stays_quantised_and_matches_float_model(tmp_path: Path, qtype):
    tensors = tiny_model_tensors(qtype, prefix="model.diffusion_model.")
    path = write_gguf(tmp_path / f"tiny_{qtype.name}.gguf", tensors)
    model = load_model(path, dtype=torch.float32, attention="math")
    quantised = [n for n, p in model.named_parameters() if is_quantized(p)]
    in_file = [
        k.removeprefix("model.diffusion_model.") for k, (_, q) in tensors.items() if q == qtype
    ]
    # layers keep their weights packed; the model's own tables (modulation, the alignment
    # unit's in_proj) are dequantised to float32 on loading
    own = [k for k in in_file if k.endswith(("modulation", "in_proj_weight"))]
    assert sorted(quantised) == sorted(set(in_file) - set(own)) and quantised
    params = dict(model.named_parameters())
    assert all(params[k].dtype == torch.float32 and not is_quantized(params[k]) for k in own)
    assert isinstance(model.blocks[0].ffn[0], GGMLOps.Linear)
    # the float model holding the dequantised weights computes the same (to float rounding)
    dequantised = {
        n: (p.dequantize(torch.float32) if is_quantized(p) else p)
        for n, p in model.state_dict().items()
    }
    inputs = make_inputs(b=2)
    out = _run(model, inputs)
    same = _run(load_model(dequantised, dtype=torch.float32, attention="math"), inputs)
    torch.testing.assert_close(out, same, rtol=1e-4, atol=1e-4)
    # and the original float weights within the quantisation error
    ref = _run(load_model(tiny_sd(), dtype=torch.float32, attention="math"), inputs)
    assert rel(out, ref) < (0.02 if qtype == Q.Q8_0 else 0.15)


def test_gguf_bf16_compute(tmp_path: Path):
    path = write_gguf(tmp_path / "tiny_q8.gguf", tiny_model_tensors(Q.Q8_0))
    inputs = make_inputs()
    out = _run(load_model(path, dtype=torch.bfloat16, attention="sdpa"), inputs)
    ref = _run(load_model(path, dtype=torch.float32, attention="math"), inputs)
    assert rel(out, ref) < 3e-2


def test_gguf_without_pose_path_refused(tmp_path: Path):
    path = write_gguf(tmp_path / "wan.gguf", tiny_model_tensors(Q.Q8_0, drop=POSE_PATH_KEYS))
    with pytest.raises(ModelFileError, match=r"plain Wan2\.1"):
        load_model(path)


def test_plain_load_state_dict_with_ggml_ops(tmp_path: Path):
    """As ComfyUI loads: build with GGMLOps, then load_state_dict (no assign)."""
    from steadydancer.gguf.loader import load_gguf_state_dict
    from steadydancer.model import SteadyDancerDiT, config_from_state_dict

    path = write_gguf(tmp_path / "tiny_q8.gguf", tiny_model_tensors(Q.Q8_0))
    sd = load_gguf_state_dict(path)
    model = SteadyDancerDiT(
        config_from_state_dict(sd), operations=GGMLOps, dtype=torch.float32, attention="math"
    )
    model.requires_grad_(False)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert is_quantized(model.blocks[0].self_attn.q.weight)
    assert (
        not is_quantized(model.blocks[0].modulation)
        and model.blocks[0].modulation.dtype == torch.float32
    )
    inputs = make_inputs()
    torch.testing.assert_close(
        _run(model, inputs), _run(load_model(path, dtype=torch.float32, attention="math"), inputs)
    )


def test_a_file_is_checked_once_on_its_way_to_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pose-path check runs where the file is read, not again in load_model and the config."""
    import steadydancer.keys as keys
    import steadydancer.model as model_module

    calls = []
    original = keys.check_pose_path

    def counting(names, source="the weights"):
        calls.append(source)
        return original(names, source)

    monkeypatch.setattr(keys, "check_pose_path", counting)
    monkeypatch.setattr(model_module, "check_pose_path", counting)
    path = tmp_path / "tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in tiny_sd(seed=4).items()}, str(path))
    read = load_weights(path, dtype=torch.float32)
    load_model(read, dtype=torch.float32, attention="math")
    assert len(calls) == 1
    calls.clear()
    load_model({f"model.diffusion_model.{k}": v for k, v in tiny_sd(seed=4).items()}, dtype=torch.float32, attention="math")
    assert calls == ["the state dict"]  # a dict from elsewhere: checked once, by load_model

"""Scaled fp8 weights kept fp8 in memory (steadydancer.quantized.Fp8Tensor)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_model import make_inputs, tiny_sd
from tiny_files import scaled_fp8

from steadydancer.errors import GGUFError, ModelFileError
from steadydancer.gguf.ops import GGMLTensor
from steadydancer.model import load_model
from steadydancer.quantized import Fp8Tensor, _rebuild, dequantize_tensor, is_quantized
from steadydancer.weights import dequantize_fp8, from_safetensors

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _fp8(rows: int = 6, cols: int = 10, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5)) * 3
    scale = (w.abs().amax(1) if per_row else w.abs().amax().reshape(1)) / 448.0
    q = (w / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
    return q, scale * 1.000123  # a scale that is not a round number in bf16


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
def test_values_are_those_of_the_load_time_conversion(per_row: bool, dtype: torch.dtype) -> None:
    q, scale = _fp8(per_row=per_row)
    # the load-time conversion's arithmetic: the float32 product, rounded once to `dtype`
    expected = (q.float() * (scale[:, None] if per_row else scale)).to(dtype)
    assert torch.equal(dequantize_fp8({"a.weight": q, "a.scale_weight": scale}, dtype)["a.weight"], expected)
    kept = dequantize_fp8({"a.weight": q, "a.scale_weight": scale}, dtype, keep=True)["a.weight"]
    assert isinstance(kept, Fp8Tensor) and is_quantized(kept)
    out = kept.dequantize(dtype)
    assert out.dtype == dtype and torch.equal(out, expected)  # bit for bit
    assert torch.equal(dequantize_tensor(kept, dtype), expected)


def test_device_moves_copies_and_pickling_keep_the_fp8_data_and_scale() -> None:
    q, scale = _fp8(per_row=True)
    t = Fp8Tensor(q, scale=scale)
    expected = t.dequantize(torch.float32)
    moved = [t.to("cpu"), t.cpu(), t.detach(), t.clone(), t.contiguous(), copy.deepcopy(t)]
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    # weights_only loading runs no code: the two names a pickled Fp8Tensor needs are allowed by hand
    with torch.serialization.safe_globals([Fp8Tensor, _rebuild]):
        moved.append(torch.load(buffer, weights_only=True))
    param = torch.nn.Parameter(t, requires_grad=False)
    moved.append(copy.deepcopy(param))
    for m in moved:
        assert isinstance(m, Fp8Tensor) and m.storage_dtype() == torch.float8_e4m3fn
        assert torch.equal(m.dequantize(torch.float32), expected)
    assert isinstance(moved[-1], torch.nn.Parameter)
    # a view of the stored values is not a weight any more: plain tensors come out
    assert type(t[0]) is torch.Tensor


def test_casts_are_refused_with_the_way_to_get_float_values() -> None:
    q, scale = _fp8()
    t = Fp8Tensor(q, scale=scale)
    for cast in (lambda: t.float(), lambda: t.to(torch.bfloat16), lambda: t.half()):
        with pytest.raises(ModelFileError, match=r"fp8 scaled weight cannot be cast .*dequantize"):
            cast()
    packed = GGMLTensor(
        torch.zeros(34, dtype=torch.uint8), tensor_type="Q8_0", tensor_shape=(1, 32)
    )
    with pytest.raises(GGUFError, match="quantised Q8_0 weight cannot be cast"):
        packed.float()


def test_bad_scales_and_non_fp8_data_are_refused_with_the_tensor_named() -> None:
    q, _ = _fp8()
    with pytest.raises(ModelFileError, match=r"my\.file: a\.weight: an fp8 scale of shape \(3,\)"):
        dequantize_fp8(
            {"a.weight": q, "a.scale_weight": torch.ones(3)},
            torch.float32,
            source="my.file",
            keep=True,
        )
    with pytest.raises(ModelFileError, match="holds float8 values"):
        Fp8Tensor(torch.ones(2, 2))


def test_kept_weights_share_the_file_data_instead_of_copying_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "fp8.safetensors"
    save_file(scaled_fp8(tiny_sd(seed=6)), str(path))
    raw = load_file(str(path))
    sd = from_safetensors(raw, keep_fp8=True)
    key = "blocks.0.self_attn.q.weight"
    assert isinstance(sd[key], Fp8Tensor)
    assert sd[key].data_ptr() == raw[f"model.diffusion_model.{key}"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_with_fp8_weights_predicts_what_the_expanded_model_does(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # Every 2-D+ weight fp8, the pose path's too: those that no compact-weight layer holds are
    # expanded once at load, the others per forward; the numbers are the same either way.
    sd = tiny_sd(seed=7)
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim >= 2:
            scale = v.abs().max() / 448.0
            out[k], out[k[: -len("weight")] + "scale_weight"] = (
                (v / scale).to(torch.float8_e4m3fn),
                scale.reshape(1),
            )
        else:
            out[k] = v
    kept = load_model(
        from_safetensors(out, dtype=dtype, keep_fp8=True), dtype=dtype, attention="math"
    )
    expanded = load_model(from_safetensors(out, dtype=dtype), dtype=dtype, attention="math")
    q = kept.blocks[0].self_attn.q.weight
    assert isinstance(q, Fp8Tensor) and q.storage_dtype() == torch.float8_e4m3fn
    stored = sum(p.numel() * p.element_size() for p in kept.parameters())
    assert stored < 0.6 * sum(p.numel() * p.element_size() for p in expanded.parameters())
    inputs = make_inputs()
    with torch.no_grad():
        a, b = kept(**inputs), expanded(**inputs)
    if dtype == torch.float32:
        assert torch.equal(a, b)
    else:  # layers that keep float32 weights see them expanded in the input's dtype: bf16 noise
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-2


@pytest.mark.gpu
def test_expansion_on_the_gpu_equals_the_load_time_conversion() -> None:
    cuda_device = torch.device("cuda")
    for per_row in (False, True):
        q, scale = _fp8(rows=64, cols=256, per_row=per_row)
        t = Fp8Tensor(q, scale=scale)
        for dtype in FLOATS:
            expected = dequantize_fp8({"a.weight": q, "a.scale_weight": scale}, dtype)["a.weight"]
            out = t.to(cuda_device).dequantize(dtype)
            assert out.device.type == "cuda" and torch.equal(out.cpu(), expected), (per_row, dtype)
            assert torch.equal(t.dequantize(dtype, cuda_device).cpu(), expected)


def _fp8_weight(out_features: int, in_features: int, per_row: bool = False, seed: int = 0) -> Fp8Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    scale = values.abs().amax(dim=1 if per_row else None) / 448.0
    data = (values / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
    return Fp8Tensor(data, scale=scale)


def test_fp8_matmul_is_the_expanded_product_up_to_the_inputs_fp8_rounding() -> None:
    """The opt-in fp8 product (torch._scaled_mm; its CPU kernel here, the GPU's on sm89+)
    against the expanded weight's bf16 product: only the input's e4m3 rounding differs."""
    from steadydancer.quantized import fp8_linear

    weight = _fp8_weight(96, 64)
    bias = torch.randn(96)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    fast = fp8_linear(x, weight, bias)
    exact = torch.nn.functional.linear(x.float(), weight.dequantize(torch.float32), bias)
    assert fast is not None and fast.shape == (2, 7, 96) and fast.dtype == torch.bfloat16
    relative = float((fast.float() - exact).norm() / exact.norm())
    assert 1e-4 < relative < 0.05, relative  # lossy (so opt-in), but by the input's rounding only


@pytest.mark.parametrize("peak", [448.0, 1000.0, -3.0e4, 1.0e-3])
def test_fp8_matmul_input_scaling_never_overflows_e4m3(peak: float) -> None:
    """The input is scaled in its own dtype (bf16) with a rounded inverse scale; the largest
    value must still land inside e4m3's range (past 448 it would cast to NaN)."""
    from steadydancer.quantized import fp8_linear

    weight = _fp8_weight(32, 64, seed=1)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    x[1, 5] = peak
    out = fp8_linear(x, weight)
    assert out is not None and torch.isfinite(out).all()
    exact = torch.nn.functional.linear(x.float(), weight.dequantize(torch.float32))
    assert float((out.float() - exact).norm() / exact.norm()) < 0.1


def test_fp8_matmul_declines_what_it_cannot_compute_exactly_as_stored() -> None:
    from steadydancer.quantized import fp8_linear

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert fp8_linear(x, _fp8_weight(96, 64, per_row=True)) is None  # one scale per row
    assert fp8_linear(torch.randn(3, 40), _fp8_weight(96, 40)) is None  # not a multiple of 16
    assert fp8_linear(x, torch.randn(96, 64)) is None  # not fp8


def test_fp8_matmul_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from steadydancer.quantized import FP8_MATMUL_ENV, fp8_matmul_enabled

    monkeypatch.delenv(FP8_MATMUL_ENV, raising=False)
    assert not fp8_matmul_enabled()
    monkeypatch.setenv(FP8_MATMUL_ENV, "1")
    assert fp8_matmul_enabled()

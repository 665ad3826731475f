"""The fused norm kernels (`steadydancer.fused`): the maths, the dispatch and the fallbacks.

On the CPU the PyTorch path is checked against the reference formulas in float64, and the
Triton kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which must
be set before Triton is imported). The interpreter rounds float32 to bfloat16 by truncation,
not to nearest as the GPU does, so there half-precision results are compared within two
units in the last place; the GPU test (marker `gpu`) checks the real rounding. Where a test
needs "a Triton whose kernel cannot compile" it puts a fake kernels module in place (said in
its docstring): a broken Triton cannot be installed on purpose.
"""

from __future__ import annotations

import logging
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F
from triton_testutils import check_stochastic_rounding, needs_triton, run_in_interpreter

from steadydancer import fused
from steadydancer.fused import (
    apply_rope,
    layer_norm_affine,
    layer_norm_modulate,
    quantize_fp8,
    rms_norm,
    stochastic_round_fp8,
)
from steadydancer.model import rope_table


def _modulation(b: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, c, generator=g), torch.randn(b, 1, c, generator=g) * 0.3


def test_layer_norm_modulate_matches_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 40, generator=g) * 4 + 2
    shift, scale = _modulation(2, 40, 1)
    xd = x.double()
    normed = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = normed * (1 + scale.double()) + shift.double()
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2.0**-8)):
        out = layer_norm_modulate(x, shift, scale, 1e-6, dtype)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    # one modulation row serves every sample
    shared = layer_norm_modulate(x, shift[:1], scale[:1], 1e-6, torch.float32)
    torch.testing.assert_close(shared[1], layer_norm_modulate(x[1:], shift[:1], scale[:1], 1e-6, torch.float32)[0])
    with pytest.raises(ValueError, match="modulation of shape"):
        layer_norm_modulate(x, torch.zeros(3, 1, 40), scale, 1e-6, torch.float32)


def test_rms_norm_with_rope_is_the_norm_then_the_rotation():
    g = torch.Generator().manual_seed(2)
    table = rope_table((3, 2, 4), 32, torch.device("cpu"))  # 24 tokens, heads of 32 channels
    weight = torch.rand(96, generator=g) + 0.5
    x = (torch.randn(2, 24, 96, generator=g) * 3).bfloat16()
    normed = rms_norm(x, weight, 1e-6)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * weight.bfloat16()
    torch.testing.assert_close(normed, expected, rtol=0, atol=0)
    rotated = rms_norm(x, weight, 1e-6, table)
    assert torch.equal(rotated, apply_rope(normed.view(2, 24, 3, 32), table).view(2, 24, 96))
    with pytest.raises(ValueError, match="does not fit 23 tokens"):
        rms_norm(x[:, :23], weight, 1e-6, table)


def test_quantize_fp8_scales_by_the_largest_magnitude():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(37, 96, generator=g) * 5).bfloat16()
    x[3, 7] = -40.0  # the largest magnitude is negative: it must still set the scale
    values, scale = quantize_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and values.shape == x.shape and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(40.0 / 448, rel=1e-7) and values[3, 7].float().item() == -448.0
    back = values.float() * scale
    torch.testing.assert_close(back, x.float(), rtol=2.0**-4, atol=scale.item() * 2.0**-9)  # e4m3: 3 bits
    zeros, tiny = quantize_fp8(torch.zeros(4, 16, dtype=torch.bfloat16))
    assert tiny.item() == pytest.approx(1e-12) and not zeros.float().any()


def test_one_input_is_quantised_once_for_the_products_that_read_it(monkeypatch):
    """q, k and v read one normed input: its fp8 form is computed once and kept with that
    tensor object, recomputed after an in-place change, and let go with the tensor."""
    calls = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda x: calls.append(x.shape) or aminmax(x))
    x = (torch.randn(8, 32) * 3).bfloat16()
    first = quantize_fp8(x)
    assert quantize_fp8(x) is first and quantize_fp8(x) is first and len(calls) == 1
    other = x.clone()
    assert quantize_fp8(other) is not first and len(calls) == 2  # the same values, another tensor
    x.mul_(2)  # changed in place: quantised again, to twice the scale
    again = quantize_fp8(x)
    assert len(calls) == 3 and again[1].item() == pytest.approx(2 * first[1].item())
    with torch.inference_mode():  # inference tensors have no version counter: identity decides
        y = (torch.randn(8, 32) * 3).bfloat16()
        assert quantize_fp8(y) is quantize_fp8(y) and len(calls) == 4
    note = fused._notes.last
    del y
    assert note.fp8 is None and note.partial_amax is None  # nothing outlives the activation


def test_forget_drops_the_fp8_copy_of_a_tensor_that_lives_on():
    """The self-attention input outlives its three products (the block holds it): `forget`
    lets its fp8 copy go before the attention runs; the next quantisation computes it anew."""
    import weakref

    x = torch.randn(64, 32).bfloat16()
    values = weakref.ref(quantize_fp8(x)[0])
    fused.forget(torch.randn(2))  # another tensor: nothing happens to x's note
    assert values() is not None
    fused.forget(x)
    assert values() is None and fused._noted(x).fp8 is None
    assert quantize_fp8(x)[1].item() == pytest.approx(x.float().abs().max().item() / 448)


def test_a_replaced_note_frees_its_fp8_copy_at_once():
    """The note of the previous input goes when the next input is quantised, with its fp8
    copy, by reference counting alone: a cycle would hold GPU memory until the collector ran."""
    import gc
    import weakref

    x, y = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    values = weakref.ref(quantize_fp8(x)[0])
    gc.disable()
    try:
        assert values() is not None  # kept with x while x is the noted input
        quantize_fp8(y)
        assert values() is None  # x still lives, its note was replaced: the copy is gone
    finally:
        gc.enable()


def test_a_noted_largest_value_saves_the_search_and_gives_the_same_fp8(monkeypatch):
    """The fused norms and GELU note max |out| as they write it (kernels in the interpreter
    test); quantize_fp8 then skips its own pass and must give the very same result."""
    x = (torch.randn(2, 6, 32) * 3).bfloat16()
    want_values, want_scale = quantize_fp8(x.clone())
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(1))
    fused.remember_amax(x, x.float().abs().amax(dim=-1).flatten())  # per-row maxima, as the LN kernel
    values, scale = quantize_fp8(x)
    assert not calls and scale.item() == want_scale.item() and torch.equal(values.float(), want_values.float())


class _FakeKernel:
    """Counts launches; raises like a Triton that cannot compile for this GPU, if asked."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches += 1
            if self.error is not None:
                raise self.error

        return launch


def _fake_kernels(monkeypatch, error: Exception | None = None) -> types.SimpleNamespace:
    names = ("layer_norm_rows", "add_rows", "gelu_tanh", "rms_norm_rope", "scale_to_fp8")
    kernels = types.SimpleNamespace(**{name: _FakeKernel(error) for name in names})
    monkeypatch.setattr(fused, "_kernels", lambda: kernels)
    monkeypatch.setattr(fused, "_interpreting", lambda: True)  # let CPU tensors reach the kernel
    monkeypatch.setattr(fused, "_broken", set())
    return kernels


def test_a_kernel_that_cannot_compile_is_dropped_once_with_a_warning(monkeypatch, caplog):
    """A fake kernels module stands in for a Triton that fails on this GPU (out of reach here).
    The caller still gets the right result, from PyTorch's kernels, and only one warning."""
    kernels = _fake_kernels(monkeypatch, RuntimeError("PTX for sm_75 not supported"))
    x = torch.randn(2, 5, 16)
    shift, scale = _modulation(2, 16, 3)
    expected = F.layer_norm(x, (16,), eps=1e-6) * (1 + scale) + shift
    with caplog.at_level(logging.WARNING, logger="steadydancer.fused"):
        for _ in range(3):
            torch.testing.assert_close(layer_norm_modulate(x, shift, scale, 1e-6, torch.float32), expected)
    assert kernels.layer_norm_rows.launches == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "PTX for sm_75" in warnings[0] and fused.ENV_SWITCH in warnings[0]
    assert rms_norm(x, torch.ones(16), 1e-6).shape == x.shape  # the other kernels are tried on their own
    assert kernels.rms_norm_rope.launches == 1
    xh = x.bfloat16()
    values, scale = quantize_fp8(xh)
    assert kernels.scale_to_fp8.launches == 1
    assert scale == torch.maximum(xh.max(), xh.min().neg()).float() / 448
    assert torch.equal(values.float(), (xh * scale.reciprocal().bfloat16()).to(torch.float8_e4m3fn).float())


def test_the_kernels_are_skipped_when_switched_off_or_the_input_is_strided(monkeypatch):
    """Fake kernels module (counts launches): the switch and inputs the kernels cannot address
    (channels not contiguous; for RMSNorm any stride or an odd width) keep PyTorch's path."""
    kernels = _fake_kernels(monkeypatch)
    x = torch.randn(2, 6, 16)
    shift, scale = _modulation(2, 16, 4)
    monkeypatch.setenv(fused.ENV_SWITCH, "off")
    layer_norm_modulate(x, shift, scale, 1e-6, torch.float32)
    rms_norm(x, torch.ones(16), 1e-6)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    rms_norm(x.transpose(0, 1).contiguous().transpose(0, 1), torch.ones(16), 1e-6)
    layer_norm_modulate(x.transpose(1, 2).contiguous().transpose(1, 2), shift, scale, 1e-6, torch.float32)
    odd = torch.randn(2, 6, 15)  # the kernel works on channel pairs: an odd width is PyTorch's
    expected = odd * torch.rsqrt(odd.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(odd, torch.ones(15), 1e-6), expected)
    assert kernels.layer_norm_rows.launches == kernels.rms_norm_rope.launches == 0
    layer_norm_modulate(x, shift, scale, 1e-6, torch.float32)  # the same call, contiguous: the kernel
    assert kernels.layer_norm_rows.launches == 1


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from steadydancer import fused
    from steadydancer.keys import TinyConfig, tiny_state_dict
    from steadydancer.model import load_model, rope_table

    def unfused(fn, *args):
        os.environ[fused.ENV_SWITCH] = "0"
        try:
            return fn(*args)
        finally:
            os.environ[fused.ENV_SWITCH] = "1"

    def check(name, got, want, dtype):
        # float32: rounding of sums taken in another order; half precision: the interpreter
        # truncates to it, so two units in the last place
        ulp = {torch.float32: 2.0 ** -21, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}[dtype]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * want.abs().max().item())
        print(name, dtype, "close")

    g = torch.Generator().manual_seed(0)
    b, n, c = 2, 24, 96  # 3 heads of 32 channels; 96 is not a power of two
    x = torch.randn(b, n, c, generator=g) * 3 + 1
    shift, scale = torch.randn(b, 1, c, generator=g), torch.randn(b, 1, c, generator=g) * 0.3
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        args = (x, shift, scale, 1e-6, dtype)
        check("layer_norm_modulate", fused.layer_norm_modulate(*args), unfused(fused.layer_norm_modulate, *args), dtype)
    args = (x[:, 5:], shift, scale, 1e-6, torch.float32)  # a slice of the sequence: strided rows
    check("sliced", fused.layer_norm_modulate(*args), unfused(fused.layer_norm_modulate, *args), torch.float32)
    # the residual update in the norm's pass (x changes in place: each side gets its own copy),
    # with and without a gate; the affine LayerNorm; the residual update alone
    lw, lb = torch.randn(c, generator=g), torch.randn(c, generator=g)
    y = torch.randn(b, n, c, generator=g).bfloat16()
    for name, fn, params in (("modulate+add", fused.layer_norm_modulate, (shift, scale)),
                             ("affine+add", fused.layer_norm_affine, (lw, lb))):
        for gate in (None, scale):
            xa, xb = x.clone(), x.clone()
            got = fn(xa, *params, 1e-6, torch.bfloat16, add=y, gate=gate)
            want = unfused(lambda: fn(xb, *params, 1e-6, torch.bfloat16, add=y, gate=gate))
            check(name, got, want, torch.bfloat16)
            check(name + " residual", xa, xb, torch.float32)
            assert torch.equal(fused._noted(got).partial_amax.amax(), got.float().abs().amax()), name
    xa, xb = x.clone(), x.clone()
    check("add_residual", fused.add_residual(xa, y, shift), unfused(fused.add_residual, xb, y, shift), torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        xg = (torch.randn(3, 5000, generator=g) * 4).to(dtype)  # more than one program of GELU
        got = fused.gelu_tanh(xg)
        check("gelu_tanh", got, unfused(fused.gelu_tanh, xg), dtype)
        assert torch.equal(fused._noted(got).partial_amax.amax(), got.float().abs().amax())
    table = rope_table((2, 3, 4), 32, torch.device("cpu"))
    weight = torch.rand(c, generator=g) + 0.5
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xx = (torch.randn(b, n, c, generator=g) * 3).to(dtype)
        check("rms_norm", fused.rms_norm(xx, weight, 1e-6), unfused(fused.rms_norm, xx, weight, 1e-6), dtype)
        args = (xx, weight, 1e-6, table)
        check("rms_norm_rope", fused.rms_norm(*args), unfused(fused.rms_norm, *args), dtype)
    # heads of 24 channels: 12 pairs per head, not a power of two (the index modulo is no mask)
    args = (xx, weight, 1e-6, rope_table((2, 3, 4), 24, torch.device("cpu")))
    check("RoPE, heads of 24 channels,", fused.rms_norm(*args), unfused(fused.rms_norm, *args), dtype)
    assert not fused._broken
    # values that e4m3 holds exactly once scaled (quarter steps up to 4, and 112 setting the
    # scale to 1/4): the interpreter's own fp8 rounding cannot matter, indexing and scale do
    xq = (torch.randint(-16, 17, (50, 96), generator=g) / 4).bfloat16()
    xq[7, 5] = 112.0
    got, got_scale = fused.quantize_fp8(xq)
    want, want_scale = unfused(fused.quantize_fp8, xq)
    assert got_scale.item() == want_scale.item() == 0.25
    assert torch.equal(got.float(), want.float()) and torch.equal(got.float() * 0.25, xq.float())
    print("quantize_fp8 close")
    sys.path.insert(0, "tests")
    from triton_testutils import check_stochastic_rounding

    launched = []
    launch = fused._launch
    fused._launch = lambda name, *a, **k: launched.append(name) or launch(name, *a, **k)
    check_stochastic_rounding(fused.stochastic_round_fp8)
    fused._launch = launch
    assert launched and set(launched) == {"stochastic_round_e4m3"}, launched
    print("stochastic_round_fp8 close")
    assert not fused._broken

    # the whole tiny DiT, fused against unfused (every block and the head go through the kernels)
    cfg = TinyConfig()
    sd = {k: torch.from_numpy(v) for k, v in tiny_state_dict(cfg, seed=0).items()}
    model = load_model(sd, dtype=torch.float32, attention="math")
    f, h, w = 3, 4, 6
    inputs = dict(
        x=torch.randn(2, 16, f, h, w, generator=g), t=torch.tensor([900.0, 300.0]),
        text=torch.randn(2, 7, cfg.text_dim, generator=g),
        clip_x=torch.randn(2, 257, cfg.clip_dim, generator=g),
        clip_c=torch.randn(2, 257, cfg.clip_dim, generator=g),
        y=torch.randn(2, 20, f, h, w, generator=g), pose=torch.randn(2, 16, f, h, w, generator=g),
        ref_x=torch.randn(2, 36, 1, h, w, generator=g), ref_c=torch.randn(2, 36, 1, h, w, generator=g),
    )
    launched = []
    launch = fused._launch
    fused._launch = lambda name, *a, **k: launched.append(name) or launch(name, *a, **k)
    with torch.no_grad():
        out = model(**inputs)
        ref = unfused(lambda: model(**inputs))
    # RMSNorm of q and k (with RoPE), of q, k and k_img (cross-attention): all of them
    # through the kernels, and:
    # per block: LN1, norm3 and LN2 (the last two with the residual update before them), the
    # FFN's GELU and residual update; the head's modulated LayerNorm
    blocks = len(model.blocks)
    assert launched.count("layer_norm_rows") == 3 * blocks + 1, launched
    assert launched.count("gelu_tanh") == launched.count("add_rows") == blocks, launched
    assert launched.count("rms_norm_rope") == 5 * blocks, launched
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    assert not fused._broken
    print("model close", err)
    """
)


def test_stochastic_rounding_to_fp8_is_unbiased_between_neighbours():
    """The PyTorch path (CPU): see `check_stochastic_rounding` for what is asserted."""
    check_stochastic_rounding(stochastic_round_fp8)


@needs_triton
def test_kernels_in_triton_interpreter_match_the_pytorch_path(repo_root):
    proc = run_in_interpreter(_INTERPRETER_SCRIPT, repo_root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in ("layer_norm_modulate", "rms_norm", "rms_norm_rope"):
        assert proc.stdout.count(f"{name} ") == 3, proc.stdout
    assert "sliced torch.float32 close" in proc.stdout and "model close" in proc.stdout
    assert "RoPE, heads of 24 channels, torch.bfloat16 close" in proc.stdout
    for name in ("modulate+add", "affine+add", "modulate+add residual", "affine+add residual"):
        assert proc.stdout.count(f"{name} torch") == 2, proc.stdout  # with and without a gate
    assert "add_residual torch.float32 close" in proc.stdout and proc.stdout.count("gelu_tanh ") == 2
    assert "quantize_fp8 close" in proc.stdout and "stochastic_round_fp8 close" in proc.stdout


@pytest.mark.gpu
@needs_triton
def test_gpu_kernels_round_like_the_pytorch_path(monkeypatch):
    """At the 14B width on the GPU: results within one unit in the last place of PyTorch's
    kernels, almost all of them equal, the fp8 cast bit-exact (float32 product, round to
    nearest even), and the kernels really ran (none dropped)."""
    monkeypatch.setattr(fused, "_broken", set())
    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, c = 2, 3000, 5120
    x = torch.randn(b, n, c, device="cuda", generator=g) * 3 + 1
    shift = torch.randn(b, 1, c, device="cuda", generator=g)
    scale = torch.randn(b, 1, c, device="cuda", generator=g) * 0.3
    table = rope_table((3, 25, 40), 128, torch.device("cuda"))
    weight = torch.rand(c, device="cuda", generator=g) + 0.5
    xh = (torch.randn(b, n, c, device="cuda", generator=g) * 3).bfloat16()
    bias = torch.randn(c, device="cuda", generator=g)
    xg = (torch.randn(b * n, 13824, device="cuda", generator=g) * 3).bfloat16()
    cases = {
        "layer_norm_modulate": lambda: layer_norm_modulate(x, shift, scale, 1e-6, torch.bfloat16),
        "rms_norm": lambda: rms_norm(xh, weight, 1e-6),
        "rms_norm_rope": lambda: rms_norm(xh, weight, 1e-6, table),
        "gelu_tanh": lambda: fused.gelu_tanh(xg),
        # the residual update in place, then the norm: both results compared
        "modulate+add": lambda: (
            layer_norm_modulate(r := x.clone(), shift, scale, 1e-6, torch.bfloat16, add=xh, gate=scale), r
        ),
        "affine+add": lambda: (layer_norm_affine(r := x.clone(), weight, bias, 1e-6, torch.bfloat16, add=xh), r),
        "add_residual": lambda: fused.add_residual(x.clone(), xh, scale),
    }
    xq = (torch.randn(b * n, c, device="cuda", generator=g) * 4).bfloat16()
    fp8_values, fp8_scale = quantize_fp8(xq)
    exact = (xq.float() * fp8_scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)  # float32, then RNE
    assert torch.equal(fp8_values.view(torch.uint8), exact.view(torch.uint8))
    for name, call in cases.items():
        got = call()
        monkeypatch.setenv(fused.ENV_SWITCH, "0")
        want = call()
        monkeypatch.setenv(fused.ENV_SWITCH, "1")
        for got_part, want_part in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want)), strict=True):
            scale_of = want_part.abs().max().item()
            torch.testing.assert_close(got_part, want_part, rtol=2.0**-8, atol=2.0**-8 * scale_of, msg=name)
            assert (got_part != want_part).double().mean().item() < 0.02, name
    assert not fused._broken


@pytest.mark.gpu
@needs_triton
def test_gpu_stochastic_rounding_kernel(monkeypatch):
    """The Triton kernel on the GPU keeps the same promises as the PyTorch path (and ran)."""
    monkeypatch.setattr(fused, "_broken", set())
    check_stochastic_rounding(stochastic_round_fp8, "cuda")
    assert not fused._broken

"""The SteadyDancer DiT on tiny random weights: shapes, pieces against independent maths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from steadydancer.errors import ConditioningError, ModelFileError
from steadydancer.fused import apply_rope
from steadydancer.keys import POSE_PATH_KEYS, TinyConfig, model_shapes, tiny_state_dict
from steadydancer.model import (
    DynamicConv1x1,
    FrameAlignment,
    SteadyDancerConfig,
    config_from_state_dict,
    load_model,
    rope_split,
    rope_table,
)

CFG = TinyConfig()


def tiny_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in tiny_state_dict(CFG, seed=seed).items()}


def make_inputs(
    b: int = 1, f: int = 3, h: int = 4, w: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(b, 16, f, h, w, generator=g),
        "t": torch.linspace(900.0, 100.0, b),
        "text": torch.randn(b, 7, CFG.text_dim, generator=g),
        "clip_x": torch.randn(b, 257, CFG.clip_dim, generator=g),
        "clip_c": torch.randn(b, 257, CFG.clip_dim, generator=g),
        "y": torch.randn(b, 20, f, h, w, generator=g),
        "pose": torch.randn(b, 16, f, h, w, generator=g),
        "ref_x": torch.randn(b, 36, 1, h, w, generator=g),
        "ref_c": torch.randn(b, 36, 1, h, w, generator=g),
    }


@pytest.fixture(scope="module")
def model32():
    return load_model(tiny_sd(), dtype=torch.float32, attention="math")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- configuration
def test_config_inferred_from_tiny_and_14b_shapes():
    cfg = config_from_state_dict(tiny_sd())
    assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (
        64,
        128,
        2,
        2,
        32,
    )
    assert (cfg.in_dim, cfg.in_dim_c, cfg.out_dim, cfg.text_dim, cfg.clip_dim, cfg.freq_dim) == (
        36, 16, 16, CFG.text_dim, CFG.clip_dim, 256,
    )  # fmt: skip
    assert config_from_state_dict(tiny_sd(), num_heads=4).head_dim == 16
    big = {
        f"model.diffusion_model.{k}": torch.empty(s, device="meta")
        for k, s in model_shapes(5120, 13824, 40).items()
    }
    assert config_from_state_dict(big) == SteadyDancerConfig()  # the 14B defaults, from shapes


def test_plain_wan_file_is_refused_naming_the_pose_path():
    sd = {k: v for k, v in tiny_sd().items() if k not in POSE_PATH_KEYS}
    with pytest.raises(ModelFileError, match=r"plain Wan2\.1") as err:
        load_model(sd, dtype=torch.float32)
    assert "condition_embedding" in str(err.value) or "patch_embedding_fuse" in str(err.value)
    partial = tiny_sd()
    del partial["condition_embedding_align.norm2.bias"]
    with pytest.raises(ModelFileError, match=r"condition_embedding_align\.norm2\.bias"):
        load_model(partial, dtype=torch.float32)
    with pytest.raises(ModelFileError, match=r"not a Wan2\.1"):
        config_from_state_dict({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)})


def test_missing_and_unexpected_keys_reported_together():
    sd = tiny_sd()
    del sd["blocks.1.cross_attn.k_img.bias"]
    sd["blocks.1.cross_attn.alpha"] = torch.zeros(1)
    with pytest.raises(ModelFileError) as err:
        load_model(sd, dtype=torch.float32)
    msg = str(err.value)
    assert "1 missing: blocks.1.cross_attn.k_img.bias" in msg
    assert "1 unexpected: blocks.1.cross_attn.alpha" in msg


def test_wrong_shape_is_refused():
    sd = tiny_sd()
    sd["blocks.0.ffn.2.weight"] = torch.zeros(64, 96)
    with pytest.raises(ModelFileError, match=r"blocks.0.ffn.2.weight has shape \(64, 96\)"):
        load_model(sd, dtype=torch.float32)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_and_dtype(dtype):
    model = load_model(tiny_sd(), dtype=dtype, attention="sdpa")
    inputs = make_inputs(b=2, f=3, h=4, w=6)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == (2, 16, 3, 4, 6)
    assert out.dtype == torch.float32  # follows x
    assert torch.isfinite(out).all()
    assert model.attention.backend_used == "sdpa"
    assert all(p.dtype == dtype for n, p in model.named_parameters() if n.endswith("ffn.0.weight"))


def test_batch_items_are_independent(model32):
    inputs = make_inputs(b=2)
    with torch.no_grad():
        both = model32(**inputs)
        for i in range(2):
            one = model32(**{k: v[i : i + 1] for k, v in inputs.items()})
            torch.testing.assert_close(one, both[i : i + 1], rtol=1e-4, atol=1e-5)


def test_batch_one_conditioning_broadcasts(model32):
    inputs = make_inputs(b=2)
    shared = {k: (v if k in ("x", "t") else v[:1]) for k, v in inputs.items()}
    full = {k: (v if k in ("x", "t") else v[:1].expand_as(v)) for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(model32(**shared), model32(**full))


def test_fp32_and_bf16_agree():
    sd = tiny_sd()
    inputs = make_inputs(b=1, f=5)
    with torch.no_grad():
        ref = load_model(sd, dtype=torch.float32, attention="math")(**inputs)
        out = load_model(sd, dtype=torch.bfloat16, attention="math")(**inputs)
    assert rel(out, ref) < 2e-2


def test_text_is_zero_padded_to_512_rows(model32):
    inputs = make_inputs()
    padded = dict(inputs, text=F.pad(inputs["text"], (0, 0, 0, 512 - inputs["text"].shape[1])))
    with torch.no_grad():
        assert torch.equal(model32(**inputs), model32(**padded))


def test_every_input_matters(model32):
    inputs = make_inputs()
    with torch.no_grad():
        base = model32(**inputs)
        for name in ("t", "text", "clip_x", "clip_c", "y", "pose", "ref_x", "ref_c"):
            changed = dict(inputs, **{name: inputs[name] + 0.5})
            assert not torch.allclose(model32(**changed), base), name
        # only the first 16 channels of ref_c are used (the rest repeat it, spec step 5)
        tail = inputs["ref_c"].clone()
        tail[:, 16:] += 1.0
        assert torch.equal(model32(**dict(inputs, ref_c=tail)), base)


def test_ffn_chunking_changes_nothing(model32):
    inputs = make_inputs(f=3, h=4, w=6)  # 5 * 2 * 3 = 30 tokens
    with torch.no_grad():
        whole = model32(**inputs)
        for block in model32.blocks:
            block.ffn_chunk_size = 7
        try:
            chunked = model32(**inputs)
        finally:
            for block in model32.blocks:
                block.ffn_chunk_size = None
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_norm3_patched_per_call_runs_through_the_layer():
    """A norm whose weight ComfyUI patches per call (`weight_function`, as low-VRAM loading
    does with a LoRA's norm diffs) is not read directly by the fused residual+norm pass: the
    layer itself runs, so the patch counts. Here the patch doubles norm3's weight in every
    block; the result must equal a model whose norm3 weights are doubled in its file. (The
    layer is a small stand-in with ComfyUI's contract: ComfyUI is not imported here.)"""

    class PatchedLayerNorm(torch.nn.LayerNorm):
        def __init__(self, norm: torch.nn.LayerNorm) -> None:
            super().__init__(norm.normalized_shape, eps=norm.eps)
            self.load_state_dict(norm.state_dict())
            self.weight_function = [lambda w: w * 2]
            self.bias_function = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.weight
            for function in self.weight_function:
                weight = function(weight)
            return F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)

    inputs = make_inputs()
    patched = load_model(tiny_sd(), dtype=torch.float32, attention="math")
    for block in patched.blocks:
        block.norm3 = PatchedLayerNorm(block.norm3)
    sd = tiny_sd()
    for key in [k for k in sd if k.endswith("norm3.weight")]:
        sd[key] = sd[key] * 2
    doubled = load_model(sd, dtype=torch.float32, attention="math")
    plain = load_model(tiny_sd(), dtype=torch.float32, attention="math")
    with torch.no_grad():
        got, want, unpatched = patched(**inputs), doubled(**inputs), plain(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rel(got, unpatched) > 1e-3  # the patch changed the result: the layer really ran


def test_attention_override_is_used(model32):
    from steadydancer.attention import math_attention

    shapes = []

    def override(q, k, v):
        shapes.append(tuple(q.shape))
        return math_attention(q, k, v)

    inputs = make_inputs(f=3, h=4, w=6)
    with torch.no_grad():
        expected = model32(**inputs)
        out = model32(**inputs, attention=override)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # per block: self-attention over (3+2)*2*3 tokens, then text and image cross-attention
    assert shapes[:3] == [(1, 30, 2, 32)] * 3 and len(shapes) == 3 * CFG.num_layers


def test_bad_inputs_raise_conditioning_error(model32):
    inputs = make_inputs()
    with pytest.raises(ConditioningError, match="y must be"):
        model32(**dict(inputs, y=inputs["y"][:, :16]))
    with pytest.raises(ConditioningError, match="multiple of the patch"):
        model32(**{k: (v[..., :5] if v.ndim == 5 else v) for k, v in inputs.items()})
    with pytest.raises(ConditioningError, match="clip_c"):
        model32(**dict(inputs, clip_c=inputs["clip_c"][:, :256]))


# --------------------------------------------------------------------------- RoPE
def independent_rope_angles(frame: int, row: int, col: int, head_dim: int) -> list[float]:
    """The spec's formula, token by token, in Python floats."""
    angles = []
    for pos, pairs in zip((frame, row, col), rope_split(head_dim), strict=True):
        d_axis = 2 * pairs
        angles += [pos / 10000 ** (2 * j / d_axis) for j in range(pairs)]
    return angles


def test_rope_split_of_a_128_head():
    assert rope_split(128) == (22, 21, 21)
    assert rope_split(32) == (6, 5, 5)


def test_rope_table_matches_formula_with_reference_frames_after_the_video(model32):
    f, h, w = 3, 4, 6
    with torch.no_grad():
        model32(**make_inputs(f=f, h=h, w=w))
    key, table = model32._rope_cache
    gf, gh, gw = f + 2, h // 2, w // 2
    assert key[:3] == (gf, gh, gw)  # the two reference frames extend the frame axis
    assert table.shape == (gf * gh * gw, 16) and table.dtype == torch.complex64
    for n in range(gf * gh * gw):
        i, rest = divmod(n, gh * gw)
        j, k = divmod(rest, gw)
        expected = torch.tensor(independent_rope_angles(i, j, k, 32), dtype=torch.float64)
        torch.testing.assert_close(
            table[n].angle().double(),
            torch.atan2(expected.sin(), expected.cos()),
            atol=1e-6,
            rtol=0,
        )
    # ref_x tokens sit at frame position F, ref_c tokens at F+1
    first_ref_x, first_ref_c = f * gh * gw, (f + 1) * gh * gw
    assert table[first_ref_x, 0].angle().item() == pytest.approx(float(f))
    assert table[first_ref_c, 0].angle().item() == pytest.approx(float(f + 1) - 2 * math.pi)


def test_apply_rope_rotates_channel_pairs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 2, 32, generator=g)
    table = rope_table((3, 2, 2), 32, torch.device("cpu"))
    out = apply_rope(x, table)
    c, s = table.real[None, :, None, :], table.imag[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], even * c - odd * s)
    torch.testing.assert_close(out[..., 1::2], even * s + odd * c)
    assert apply_rope(x.bfloat16(), table).dtype == torch.bfloat16


# --------------------------------------------------------------------------- pose path pieces
def _load_part(
    module: torch.nn.Module, prefix: str, sd: dict[str, torch.Tensor]
) -> torch.nn.Module:
    part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    module.load_state_dict(part, strict=True)
    return module.eval()


def test_alignment_unit_attends_across_frames_like_sequence_first_mha():
    sd = tiny_sd(seed=5)
    unit = _load_part(
        FrameAlignment(16, 128, 8, torch.nn, None, torch.float32), "condition_embedding_align.", sd
    )
    a = "condition_embedding_align."
    mha = torch.nn.MultiheadAttention(128, 8)  # sequence-first, as the original
    mha.load_state_dict(
        {
            "in_proj_weight": sd[a + "cross_attn.in_proj_weight"],
            "in_proj_bias": sd[a + "cross_attn.in_proj_bias"],
            "out_proj.weight": sd[a + "cross_attn.out_proj.weight"],
            "out_proj.bias": sd[a + "cross_attn.out_proj.bias"],
        }
    )
    mha.eval()
    g = torch.Generator().manual_seed(0)
    b, t, h, w = 2, 5, 3, 4

    def conv1x1(x, name):
        return F.conv2d(x, sd[a + name + ".weight"], sd[a + name + ".bias"])

    def layer_norm_channels(x, name):
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-5) * sd[a + name + ".weight"] + sd[
            a + name + ".bias"
        ]

    def reference(pose, ref):  # one sample: [1, 16, T, H, W]
        p = conv1x1(pose[0].transpose(0, 1), "proj_p").flatten(2).transpose(1, 2)  # [T, HW, 128]
        r = conv1x1(ref[0].transpose(0, 1), "proj_r").flatten(2).transpose(1, 2)
        out = mha(r, p, p, need_weights=False)[0]  # sequence = T frames, batch = HW positions
        out = out.transpose(1, 2).reshape(t, 128, h, w)
        out = layer_norm_channels(out, "norm1")
        ffn = conv1x1(F.silu(conv1x1(out, "ffn_pose.0")), "ffn_pose.2")
        out = layer_norm_channels(out + ffn, "norm2")
        return conv1x1(out, "proj_p_back").unsqueeze(0).transpose(1, 2)  # [1, 16, T, H, W]

    pose, ref = torch.randn(b, 16, t, h, w, generator=g), torch.randn(b, 16, t, h, w, generator=g)
    with torch.no_grad():
        ours = unit(pose, ref)
        for i in range(b):
            torch.testing.assert_close(
                ours[i : i + 1], reference(pose[i : i + 1], ref[i : i + 1]), rtol=1e-4, atol=1e-5
            )
        # frames do interact: changing one frame's pose changes the other frames' output
        moved = pose.clone()
        moved[:, :, 0] += 1.0
        changed = unit(moved, ref)
        assert not torch.allclose(changed[:, :, 1:], ours[:, :, 1:])
        # spatial positions do not: a change at one position leaves the others alone
        moved = pose.clone()
        moved[:, :, :, 0, 0] += 1.0
        changed = unit(moved, ref)
        torch.testing.assert_close(changed[..., 1:, :], ours[..., 1:, :], rtol=0, atol=1e-6)


def test_dynamic_1x1_module_matches_hand_computation():
    sd = tiny_sd(seed=7)
    s = "condition_embedding_spatial."
    module = _load_part(DynamicConv1x1(16, torch.nn, None, torch.float32), s, sd)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 16, 5, 6, generator=g)

    def hsig(a):
        return torch.clamp(a + 3.0, 0.0, 6.0) / 3.0

    def group_norm_4(x, name):  # 4 groups over 4 channels: each channel normalised on its own
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-5) * sd[s + name + ".weight"][:, None] + sd[
            s + name + ".bias"
        ][:, None]

    def w2(name):
        return sd[s + name + ".weight"].reshape(sd[s + name + ".weight"].shape[0], -1)

    n = z.shape[0]
    flat = z.reshape(n, 16, -1)  # [n, 16, hw]
    r = torch.einsum("oc,ncp->nop", w2("conv"), flat)
    gavg = flat.mean(-1)
    v = gavg @ sd[s + "fc.0.weight"].T
    v = v * hsig(v @ sd[s + "fc.1.fc.0.weight"].T)
    phi = (v @ sd[s + "fc_phi.weight"].T).reshape(n, 4, 4)
    scale = hsig(v @ sd[s + "fc_scale.weight"].T)  # [n, 16]
    r = scale[:, :, None] * r
    q = group_norm_4(torch.einsum("oc,ncp->nop", w2("conv_q"), flat), "bn1")
    q = group_norm_4(torch.einsum("nij,njp->nip", phi, q), "bn2") + q
    expected = (torch.einsum("oc,ncp->nop", w2("conv_p"), q) + r).reshape(z.shape)
    with torch.no_grad():
        torch.testing.assert_close(module(z), expected, rtol=1e-4, atol=1e-5)


def test_apply_rope_in_chunks_is_exact(monkeypatch):
    import steadydancer.fused as fused_module

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 50, 3, 32, generator=g).bfloat16()
    table = rope_table((5, 2, 5), 32, torch.device("cpu"))
    whole = apply_rope(x, table)
    monkeypatch.setattr(fused_module, "ROPE_CHUNK_ELEMENTS", 7 * 2 * 3 * 32)  # 7 tokens a chunk
    assert torch.equal(apply_rope(x, table), whole)


def test_rms_norm_matches_reference_formula():
    from steadydancer.model import RMSNorm

    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 9, 64, generator=g) * 3).to(dtype)
        xf = x.float()
        expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
            dtype
        ) * norm.weight.to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_bf16_forward_with_every_available_backend_matches_cpu_fp32():
    from steadydancer.attention import available_backends

    sd = tiny_sd()
    inputs = make_inputs(b=2)
    with torch.no_grad():
        ref = load_model(sd, dtype=torch.float32, attention="math")(**inputs)
        gpu_inputs = {k: v.cuda() for k, v in inputs.items()}
        for name in available_backends("cuda", torch.bfloat16, CFG.dim // CFG.num_heads):
            model = load_model(sd, device="cuda", dtype=torch.bfloat16, attention=name)
            out = model(**gpu_inputs)
            assert model.attention.backend_used == name
            assert rel(out.cpu(), ref) < (5e-2 if name == "sage" else 2e-2), name


@pytest.mark.parametrize(("num_heads", "message"), [(0, "positive whole number"), (-2, "positive whole number"),
                                                    (3, "does not split into 3 heads")])  # fmt: skip
def test_a_bad_head_count_is_refused_with_one_clear_error(num_heads: int, message: str) -> None:
    """A wrong `num_heads` argument names itself, instead of a ZeroDivisionError or a shape
    error deep inside attention."""
    with pytest.raises(ModelFileError, match=message):
        load_model(tiny_sd(), num_heads=num_heads)

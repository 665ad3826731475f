"""The whole forward pass against an independent float64 implementation of docs/MODEL.md.

The reference below is written in the style of the original code (a loop over samples,
RoPE as complex float64 multipliers split by `freqs.split`, torch.nn.MultiheadAttention
in its sequence-first layout, einsum unpatchify) and shares no code with steadydancer.model,
so a wiring mistake (channel order of the fused input, context row order, head modulation,
reference-frame positions) cannot hide in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from test_model import make_inputs, rel, tiny_sd

from steadydancer.model import load_model

HEADS = 2


def _attn(q, k, v):  # [L, H, D] each, float64
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def _rope_freqs(d):
    def params(dim):
        ang = torch.outer(
            torch.arange(64, dtype=torch.float64),
            1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim),
        )
        return torch.polar(torch.ones_like(ang), ang)

    return torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)


def _rope(x, grid, freqs):  # x [L, H, D]
    c = x.shape[2] // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    mult = torch.cat(
        [
            parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.reshape(x.shape[0], x.shape[1], -1, 2))
    return torch.view_as_real(xc * mult).flatten(2)


def _ln2d(v, W, name):  # LayerNorm over channels of [N, C, H, W], biased variance
    m, var = v.mean(1, keepdim=True), v.var(1, keepdim=True, unbiased=False)
    return (v - m) / torch.sqrt(var + 1e-5) * W[name + ".weight"] + W[name + ".bias"]


def reference_forward(sd, x, t, text, clip_x, clip_c, y, pose, ref_x, ref_c):
    W = {k: v.double() for k, v in sd.items()}

    def lin(h, name):
        return F.linear(h, W[name + ".weight"], W.get(name + ".bias"))

    def ln(h, eps, name=None):
        return F.layer_norm(
            h,
            h.shape[-1:],
            W[name + ".weight"] if name else None,
            W[name + ".bias"] if name else None,
            eps,
        )

    def rms(h, name):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * W[name + ".weight"]

    def hsig(a):
        return F.relu6(a + 3) / 3

    outs = []
    for i in range(x.shape[0]):
        xi, yi, ci = x[i : i + 1].double(), y[i : i + 1].double(), pose[i : i + 1].double()
        nf, hh, ww = xi.shape[2:]
        # temporal: three factorised convolutions, SiLU after each
        tmp = ci
        for j in (0, 2, 4):
            p = f"condition_embedding_temporal.{j}"
            tmp = F.conv3d(tmp, W[p + ".spatial.weight"], padding=(0, 1, 1), groups=16)
            tmp = F.silu(
                F.conv3d(
                    F.silu(tmp),
                    W[p + ".temporal.weight"],
                    W[p + ".temporal.bias"],
                    padding=(1, 0, 0),
                )
            )
        # spatial: the dynamic 1x1 module per frame
        s = "condition_embedding_spatial."
        z = ci[0].transpose(0, 1)  # [F, 16, h, w]
        r = F.conv2d(z, W[s + "conv.weight"])
        g = z.mean((2, 3))
        g = lin(g, s + "fc.0")
        g = g * hsig(lin(g, s + "fc.1.fc.0"))
        phi = lin(g, s + "fc_phi").view(-1, 4, 4)
        r = hsig(lin(g, s + "fc_scale")).view(-1, 16, 1, 1) * r
        q = F.group_norm(
            F.conv2d(z, W[s + "conv_q.weight"]), 4, W[s + "bn1.weight"], W[s + "bn1.bias"]
        )
        q = q.view(q.shape[0], 4, -1)
        q = F.group_norm(phi @ q, 4, W[s + "bn2.weight"], W[s + "bn2.bias"]) + q
        sp = F.conv2d(q.view(-1, 4, hh, ww), W[s + "conv_p.weight"]) + r
        fused = ci + tmp + sp.transpose(0, 1).unsqueeze(0)
        # alignment: sequence = frames, batch = positions
        a = "condition_embedding_align."
        mha = torch.nn.MultiheadAttention(128, 8).double().eval()
        mha.load_state_dict(
            {
                k[len(a + "cross_attn.") :]: v
                for k, v in W.items()
                if k.startswith(a + "cross_attn.")
            }
        )
        pp = (
            F.conv2d(fused[0].transpose(0, 1), W[a + "proj_p.weight"], W[a + "proj_p.bias"])
            .flatten(2)
            .transpose(1, 2)
        )
        rr = (
            F.conv2d(xi[0].transpose(0, 1), W[a + "proj_r.weight"], W[a + "proj_r.bias"])
            .flatten(2)
            .transpose(1, 2)
        )
        o = mha(rr, pp, pp, need_weights=False)[0].transpose(1, 2).reshape(nf, 128, hh, ww)

        o = _ln2d(o, W, a + "norm1")
        ffn = F.conv2d(
            F.silu(F.conv2d(o, W[a + "ffn_pose.0.weight"], W[a + "ffn_pose.0.bias"])),
            W[a + "ffn_pose.2.weight"],
            W[a + "ffn_pose.2.bias"],
        )
        o = _ln2d(o + ffn, W, a + "norm2")
        aligned = (
            F.conv2d(o, W[a + "proj_p_back.weight"], W[a + "proj_p_back.bias"])
            .transpose(0, 1)
            .unsqueeze(0)
        )
        # tokens
        u = F.conv3d(
            torch.cat([xi, yi, fused, aligned], 1),
            W["patch_embedding_fuse.weight"],
            W["patch_embedding_fuse.bias"],
            stride=(1, 2, 2),
        )
        rx = F.conv3d(
            ref_x[i : i + 1].double(),
            W["patch_embedding.weight"],
            W["patch_embedding.bias"],
            stride=(1, 2, 2),
        )
        rc = F.conv3d(
            ref_c[i : i + 1, :16].double(),
            W["patch_embedding_ref_c.weight"],
            W["patch_embedding_ref_c.bias"],
            stride=(1, 2, 2),
        )
        u = torch.cat([u, rx, rc], dim=2)
        grid = tuple(u.shape[2:])
        u = u.flatten(2).transpose(1, 2)[0]  # [L, dim]
        dim = u.shape[1]
        # time
        half = 128
        sinus = torch.outer(
            t[i : i + 1].double(), torch.pow(10000, -torch.arange(half).double().div(half))
        )
        sinus = torch.cat([torch.cos(sinus), torch.sin(sinus)], dim=1)
        e = lin(F.silu(lin(sinus, "time_embedding.0")), "time_embedding.2")[0]
        e0 = lin(F.silu(e), "time_projection.1").view(6, dim)
        # context
        txt = torch.cat(
            [text[i].double(), text.new_zeros(512 - text.shape[1], text.shape[2]).double()]
        )
        ctx_text = lin(F.gelu(lin(txt, "text_embedding.0"), approximate="tanh"), "text_embedding.2")

        def img(cf):
            h1 = lin(ln(cf.double(), 1e-5, "img_emb.proj.0"), "img_emb.proj.1")
            return ln(lin(F.gelu(h1), "img_emb.proj.3"), 1e-5, "img_emb.proj.4")

        context = torch.cat([img(clip_x[i]) + img(clip_c[i]), ctx_text])
        ctx_img, ctx_txt = context[:257], context[257:]
        freqs = _rope_freqs(dim // HEADS)
        for n in range(sum(k.startswith("blocks.") and k.endswith(".modulation") for k in W)):
            b = f"blocks.{n}."
            m = (W[b + "modulation"][0] + e0).unbind(0)
            h = ln(u, 1e-6) * (1 + m[1]) + m[0]
            q = rms(lin(h, b + "self_attn.q"), b + "self_attn.norm_q").view(-1, HEADS, dim // HEADS)
            k = rms(lin(h, b + "self_attn.k"), b + "self_attn.norm_k").view(-1, HEADS, dim // HEADS)
            v = lin(h, b + "self_attn.v").view(-1, HEADS, dim // HEADS)
            o = _attn(_rope(q, grid, freqs), _rope(k, grid, freqs), v).flatten(1)
            u = u + lin(o, b + "self_attn.o") * m[2]
            h = ln(u, 1e-6, b + "norm3")
            q = rms(lin(h, b + "cross_attn.q"), b + "cross_attn.norm_q").view(
                -1, HEADS, dim // HEADS
            )
            kt = rms(lin(ctx_txt, b + "cross_attn.k"), b + "cross_attn.norm_k").view(
                -1, HEADS, dim // HEADS
            )
            vt = lin(ctx_txt, b + "cross_attn.v").view(-1, HEADS, dim // HEADS)
            ki = rms(lin(ctx_img, b + "cross_attn.k_img"), b + "cross_attn.norm_k_img").view(
                -1, HEADS, dim // HEADS
            )
            vi = lin(ctx_img, b + "cross_attn.v_img").view(-1, HEADS, dim // HEADS)
            o = _attn(q, kt, vt).flatten(1) + _attn(q, ki, vi).flatten(1)
            u = u + lin(o, b + "cross_attn.o")
            h = ln(u, 1e-6) * (1 + m[4]) + m[3]
            u = u + lin(F.gelu(lin(h, b + "ffn.0"), approximate="tanh"), b + "ffn.2") * m[5]
        hm = (W["head.modulation"][0] + e).unbind(0)
        out = lin(ln(u, 1e-6) * (1 + hm[1]) + hm[0], "head.head")
        out = out.view(*grid, 1, 2, 2, 16)
        out = torch.einsum("fhwpqrc->cfphqwr", out).reshape(16, grid[0], grid[1] * 2, grid[2] * 2)
        outs.append(out[:, :nf])
    return torch.stack(outs)


def test_forward_matches_independent_float64_reference():
    sd = tiny_sd(seed=11)
    inputs = make_inputs(b=2, f=3, h=4, w=6, seed=4)
    expected = reference_forward(sd, **inputs)
    model = load_model(sd, dtype=torch.float32, attention="math")
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == expected.shape
    assert rel(out, expected) < 1e-5

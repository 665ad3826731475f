"""The SteadyDancer DiT: Wan2.1-I2V-14B with SteadyDancer's pose path (docs/MODEL.md).

Layout and names follow the published checkpoints so that a state dict loads as it is. The
same code runs the 14B file and the tiny test models: every size is read from tensor shapes
(`config_from_state_dict`). Layers come from an `operations` namespace (torch.nn by default;
`steadydancer.gguf.ops.GGMLOps` for quantised weights; ComfyUI's `comfy.ops` classes in the
nodes), so any layer class with torch.nn's constructor and forward plugs in.

Precision follows the reference: matrix products run in the compute dtype (bf16, fp16 or
fp32), while normalisations, RoPE and the modulation arithmetic run in float32. The residual
stream between blocks is kept in float32 as well: it costs one fp32 copy of the token
sequence and keeps fp16 runs from overflowing. Norm weights and modulation tables are
float32 parameters for the same reason (they are tiny).
On CUDA with Triton the blocks' norms, modulation and RoPE run as fused kernels with the
same precision (`fused.py`); elsewhere as PyTorch expressions.

Memory: the token sequence is built once, in place; the residual updates are in place; RoPE
multiplies by a complex64 table of one row per token (no per-sample loops, no float64
tensor of token size); the alignment unit attends across frames with batched attention
whose batch is the spatial positions, so nothing of size tokens x tokens exists; the head
runs on the video tokens only (the two reference frames are dropped before it). Each block's
FFN can run in token chunks (`ffn_chunk_size`) so that its hidden activation stays small.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionDispatcher, AttentionFn
from .errors import ConditioningError, ModelFileError
from .fused import add_residual, forget, gelu_tanh, layer_norm_affine, layer_norm_modulate, rms_norm
from .keys import (
    ALIGN_HIDDEN,
    SteadyDancerStateDict,
    check_pose_path,
    checked_state_dict,
    strip_prefix,
)

HEAD_DIM = 128  # every Wan2.1 size uses heads of 128 channels
# heads of the tiny test models (keys.TinyConfig), whose dim is not a multiple of 128
TEST_HEAD_DIM = 32
ALIGN_HEADS = 8
# A replacement of one block for one call: (block, x, the block's keyword arguments) -> new x.
BlockPatch = Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]
CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens per image: the image rows of the cross-attention context


@dataclass(frozen=True)
class SteadyDancerConfig:
    """Sizes of a SteadyDancer DiT (14B defaults); read them off weights with config_from_state_dict."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    in_dim_c: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    clip_dim: int = 1280
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    eps: float = 1e-6
    align_hidden: int = ALIGN_HIDDEN
    align_heads: int = ALIGN_HEADS

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ModelFileError(f"num_heads must be a positive whole number, got {self.num_heads!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ModelFileError(
                f"dim {self.dim} does not split into {self.num_heads} heads of an even size"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


_REQUIRED_FOR_CONFIG = (
    "head.modulation",
    "blocks.0.ffn.0.weight",
    "patch_embedding.weight",
    "patch_embedding_ref_c.weight",
    "head.head.weight",
    "text_embedding.0.weight",
    "img_emb.proj.1.weight",
    "time_embedding.0.weight",
)


def config_from_state_dict(
    sd: Mapping[str, Any], head_dim: int = HEAD_DIM, *, num_heads: int | None = None
) -> SteadyDancerConfig:
    """Read every size off tensor shapes (works on quantised GGMLTensors: logical shapes).

    Heads are `head_dim` (128, as in all Wan2.1 models) channels wide unless `num_heads` is
    given; a dim that is not a multiple of 128 is a test model, whose heads are 32 wide.
    Names may carry a container prefix. Refuses a state dict without the pose path, and
    (ModelFileError) any shape read here that no SteadyDancer model has: a tensor of another
    rank, a size that is not positive, blocks not numbered 0..N-1.
    """
    # the rank of each tensor whose shape is read here, by its shape in the 14B model
    example_shapes = {
        "head.modulation": (1, 2, 5120),
        "blocks.0.ffn.0.weight": (13824, 5120),
        "patch_embedding.weight": (5120, 36, 1, 2, 2),
        "patch_embedding_ref_c.weight": (5120, 16, 1, 2, 2),
        "head.head.weight": (64, 5120),
        "text_embedding.0.weight": (5120, 4096),
        "img_emb.proj.1.weight": (1280, 1280),
        "time_embedding.0.weight": (5120, 256),
    }
    if isinstance(sd, SteadyDancerStateDict):  # read and checked by this library
        names = {k: k for k in sd}
    else:
        names = {strip_prefix(k): k for k in sd}
        check_pose_path(names)
    missing = [k for k in _REQUIRED_FOR_CONFIG if k not in names]
    if missing:
        raise ModelFileError(
            f"incomplete Wan2.1/SteadyDancer state dict: missing {', '.join(missing)}"
        )

    def shape(key: str) -> tuple[int, ...]:
        value = tuple(int(s) for s in sd[names[key]].shape)
        if len(value) != len(example_shapes[key]) or min(value) <= 0:
            raise ModelFileError(
                f"{key} has shape {value}: expected {len(example_shapes[key])} positive sizes, "
                f"as {example_shapes[key]} in the 14B model"
            )
        return value

    dim = shape("head.modulation")[-1]
    patch = shape("patch_embedding.weight")[2:]
    if patch[0] != 1:
        raise ModelFileError(
            f"patch_embedding.weight has shape {shape('patch_embedding.weight')}: expected a (1, ph, pw) "
            "patch (each reference image is one latent frame)"
        )
    # A block has many tensors: a block number at or above the tensor count cannot be part
    # of a 0..N-1 numbering, and refusing it first keeps a corrupt name such as
    # blocks.99999999999999999999.x from sizing the range below (or int() from parsing
    # thousands of digits).
    layers = set()
    for k in names:
        if (m := re.match(r"blocks\.([0-9]+)\.", k)) is None:
            continue
        if len(m.group(1)) > 6 or int(m.group(1)) >= len(names):
            raise ModelFileError(
                f"tensor {k[:100]!r} has block number {m.group(1)[:24]}, impossible in a file "
                f"of {len(names)} tensors: the file is corrupt"
            )
        layers.add(int(m.group(1)))
    if layers != set(range(len(layers))):
        gaps = sorted(set(range(max(layers) + 1)) - layers)
        shown = ", ".join(map(str, gaps[:16])) + (", ..." if len(gaps) > 16 else "")
        raise ModelFileError(f"blocks are not numbered 0..N-1: missing blocks {shown}")
    head_rows = shape("head.head.weight")[0]
    if head_rows % math.prod(patch):
        raise ModelFileError(
            f"head.head.weight has {head_rows} rows, not a multiple of the "
            f"{math.prod(patch)} values of a {patch} patch"
        )
    if num_heads is None:
        if dim % head_dim and head_dim == HEAD_DIM and dim % TEST_HEAD_DIM == 0:
            head_dim = TEST_HEAD_DIM
        if dim % head_dim:
            raise ModelFileError(f"dim {dim} is not a multiple of the head size {head_dim}")
        num_heads = dim // head_dim
    return SteadyDancerConfig(
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_heads=num_heads,
        num_layers=len(layers),
        in_dim=shape("patch_embedding.weight")[1],
        in_dim_c=shape("patch_embedding_ref_c.weight")[1],
        out_dim=head_rows // math.prod(patch),
        text_dim=shape("text_embedding.0.weight")[1],
        clip_dim=shape("img_emb.proj.1.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        patch=(patch[0], patch[1], patch[2]),
    )


# ------------------------------------------------------------------------------- helpers
def _as_float(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A parameter as float values in `dtype` on `device`, dequantising packed GGUF weights."""
    if getattr(t, "tensor_type", None) is not None and hasattr(t, "tensor_shape"):
        return t.dequantize(dtype, device)
    return t.to(device=device, dtype=dtype)


class _FloatParams(nn.Module):
    """Base for modules with parameters of their own (not an `operations` layer).

    Those parameters must hold float values: packed GGUF tensors for them are dequantised to
    float32 when loaded, whoever loads the state dict.
    """

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self._parameters:
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and getattr(value, "tensor_type", None) is not None:
                state_dict[prefix + name] = _as_float(value, torch.float32, value.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class RMSNorm(_FloatParams):
    """RMS normalisation over the last axis, computed in float32 (WanRMSNorm)."""

    def __init__(self, dim: int, eps: float, device: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C] normalised (no float32 copy of x); then rotated by `rope` if given."""
        return rms_norm(x, _as_float(self.weight, torch.float32, x.device), self.eps, rope)


class ChannelLayerNorm(_FloatParams):
    """LayerNorm over the channel axis of [N, C, H, W] (biased variance), in float32."""

    def __init__(self, channels: int, eps: float = 1e-5, device: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(1, channels, 1, 1, device=device, dtype=torch.float32)
        )
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=1, keepdim=True, correction=0)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        return out * _as_float(self.weight, out.dtype, x.device) + _as_float(
            self.bias, out.dtype, x.device
        )


class GeluTanh(nn.Module):
    """nn.GELU(approximate="tanh") through `fused.gelu_tanh` (one kernel that also notes the
    result's largest value for the fp8 product that follows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def hsigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 3: the published weights were trained with this (not the usual / 6)."""
    return F.relu6(x + 3.0) / 3.0


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = 10000^(-i/(dim/2)): float32 [B, dim] on t's device.

    Computed in float64 on the CPU (a few hundred numbers; not every device has float64).
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(t.detach().to("cpu", torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(t.device, torch.float32)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (frame, row, column) of a head: 22/21/21 for 128 channels."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_table(
    grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0
) -> torch.Tensor:
    """Rotations of every token of a (frames, rows, columns) grid: complex64 [f*h*w, head_dim/2].

    Token n = (i*h + j)*w + k sits at frame i, row j, column k. Each axis has its own
    frequencies 1/theta^(2m/d_axis), d_axis = 2 * its pairs. Angles are computed in float64
    per axis on the CPU (small tables; not every device has float64) and the token table is
    assembled in complex64 on `device`.
    """
    tables = []
    for size, pairs in zip(grid, rope_split(head_dim), strict=True):
        d_axis = 2 * pairs
        inv = 1.0 / torch.pow(theta, torch.arange(0, d_axis, 2, dtype=torch.float64) / d_axis)
        angles = torch.outer(torch.arange(size, dtype=torch.float64), inv)
        tables.append(torch.polar(torch.ones_like(angles), angles).to(device, torch.complex64))
    f, h, w = grid
    full = torch.cat(
        [
            tables[0][:, None, None, :].expand(f, h, w, -1),
            tables[1][None, :, None, :].expand(f, h, w, -1),
            tables[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return full.reshape(f * h * w, head_dim // 2)


# ------------------------------------------------------------------------------- pose path
class FactorConv3d(nn.Module):
    """(2+1)-D convolution: depthwise 1x3x3 spatial, SiLU, 3x1x1 temporal (with bias)."""

    def __init__(self, channels: int, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.spatial = ops.Conv3d(
            channels,
            channels,
            (1, 3, 3),
            padding=(0, 1, 1),
            groups=channels,
            bias=False,
            device=device,
            dtype=dtype,
        )
        self.temporal = ops.Conv3d(
            channels, channels, (3, 1, 1), padding=(1, 0, 0), device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(F.silu(self.spatial(x)))


class DynamicConv1x1(nn.Module):
    """The spatial structure extractor: a dynamic 1x1 convolution (DCD) per frame.

    A static 1x1 convolution scaled per channel, plus a rank-`rank` path whose 4x4 mixing
    matrix is predicted from the frame's mean feature.
    """

    def __init__(self, channels: int, ops: Any, device: Any, dtype: Any, rank: int = 4) -> None:
        super().__init__()
        self.rank = rank
        self.conv = ops.Conv2d(channels, channels, 1, bias=False, device=device, dtype=dtype)
        self.conv_q = ops.Conv2d(channels, rank, 1, bias=False, device=device, dtype=dtype)
        self.conv_p = ops.Conv2d(rank, channels, 1, bias=False, device=device, dtype=dtype)
        squeeze = max(4, max(channels, rank * rank) // 8)
        self.fc = nn.Sequential(
            ops.Linear(channels, squeeze, bias=False, device=device, dtype=dtype),
            _SqueezeGate(squeeze, ops, device, dtype),
        )
        self.fc_phi = ops.Linear(squeeze, rank * rank, bias=False, device=device, dtype=dtype)
        self.fc_scale = ops.Linear(squeeze, channels, bias=False, device=device, dtype=dtype)
        self.bn1 = ops.GroupNorm(4, rank, device=device, dtype=torch.float32)
        self.bn2 = ops.GroupNorm(4, rank, device=device, dtype=torch.float32)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, _, h, w = z.shape
        r = self.conv(z)
        s = self.fc(z.float().mean(dim=(2, 3)).to(z.dtype))  # [n, squeeze]
        phi = self.fc_phi(s).float().view(n, self.rank, self.rank)
        scale = hsigmoid(self.fc_scale(s)).view(n, -1, 1, 1)
        q = self.bn1(self.conv_q(z).float()).view(n, self.rank, h * w)
        q = self.bn2(phi @ q) + q
        return self.conv_p(q.view(n, self.rank, h, w).to(z.dtype)) + scale * r


class _SqueezeGate(nn.Module):
    """s * hsigmoid(W s) (the checkpoint's `fc.1.fc.0`)."""

    def __init__(self, width: int, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.fc = nn.Sequential(ops.Linear(width, width, bias=False, device=device, dtype=dtype))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s * hsigmoid(self.fc(s))


class _AlignAttention(_FloatParams):
    """Multi-head attention with torch.nn.MultiheadAttention's parameter names."""

    def __init__(self, width: int, heads: int, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(
            torch.empty(3 * width, width, device=device, dtype=dtype)
        )
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width, device=device, dtype=dtype))
        self.out_proj = ops.Linear(width, width, device=device, dtype=dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """query, key [N, S, width] -> [N, S, width]; value = key; no mask."""
        n, s, width = query.shape
        weight = _as_float(self.in_proj_weight, query.dtype, query.device)
        bias = _as_float(self.in_proj_bias, query.dtype, query.device)
        q = F.linear(query, weight[:width], bias[:width])
        k, v = F.linear(key, weight[width:], bias[width:]).chunk(2, dim=-1)
        q, k, v = (t.reshape(n, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, S, head]
        return self.out_proj(out.transpose(1, 2).reshape(n, s, width))


class FrameAlignment(nn.Module):
    """The frame-wise attention alignment unit: at every spatial position, the reference
    features of each frame attend to the pose features of all frames of the same sample.

    The original calls torch.nn.MultiheadAttention in its sequence-first layout on
    [B*T, H*W, 128] tensors: the frames are the sequence and the positions the batch. It only
    ever runs one sample (B = 1); with B > 1 its sequence would mix the frames of different
    samples, so here each sample attends over its own T frames (identical for B = 1, and a
    batch gives the same result as its samples run one by one). The attention batch is
    B*H*W sequences of T frames, so nothing larger than [B*H*W, heads, T, T] is formed.
    """

    def __init__(
        self, channels: int, hidden: int, heads: int, ops: Any, device: Any, dtype: Any
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.proj_p = ops.Conv2d(channels, hidden, 1, device=device, dtype=dtype)
        self.proj_r = ops.Conv2d(channels, hidden, 1, device=device, dtype=dtype)
        self.proj_p_back = ops.Conv2d(hidden, channels, 1, device=device, dtype=dtype)
        self.cross_attn = _AlignAttention(hidden, heads, ops, device, dtype)
        self.ffn_pose = nn.Sequential(
            ops.Conv2d(hidden, hidden, 1, device=device, dtype=dtype),
            nn.SiLU(),
            ops.Conv2d(hidden, hidden, 1, device=device, dtype=dtype),
        )
        self.norm1 = ChannelLayerNorm(hidden, device=device)
        self.norm2 = ChannelLayerNorm(hidden, device=device)

    def forward(self, pose: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """pose, ref [B, C, T, H, W] -> aligned pose [B, C, T, H, W]."""
        b, c, t, h, w = pose.shape
        p = self.proj_p(_frames(pose))  # [B*T, hidden, H, W]
        r = self.proj_r(_frames(ref))
        # sequences over frames, one per (sample, position): [B*H*W, T, hidden]
        p = p.view(b, t, self.hidden, h * w).permute(0, 3, 1, 2).reshape(b * h * w, t, self.hidden)
        r = r.view(b, t, self.hidden, h * w).permute(0, 3, 1, 2).reshape(b * h * w, t, self.hidden)
        a = self.cross_attn(r, p)
        a = a.view(b, h, w, t, self.hidden).permute(0, 3, 4, 1, 2).reshape(b * t, self.hidden, h, w)
        a = self.norm1(a)
        a = self.norm2(a + self.ffn_pose(a.to(pose.dtype)).float())
        out = self.proj_p_back(a.to(pose.dtype))  # [B*T, C, H, W]
        return out.view(b, t, c, h, w).transpose(1, 2)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (frames into the batch)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


# ------------------------------------------------------------------------------- DiT blocks
class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.heads = heads
        self.q = ops.Linear(dim, dim, device=device, dtype=dtype)
        self.k = ops.Linear(dim, dim, device=device, dtype=dtype)
        self.v = ops.Linear(dim, dim, device=device, dtype=dtype)
        self.o = ops.Linear(dim, dim, device=device, dtype=dtype)
        self.norm_q = RMSNorm(dim, eps, device)
        self.norm_k = RMSNorm(dim, eps, device)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.q(x), rope).view(b, n, self.heads, -1)
        k = self.norm_k(self.k(x), rope).view(b, n, self.heads, -1)
        v = self.v(x).view(b, n, self.heads, -1)
        forget(x)  # its fp8 copy (fp8 matmul) is not needed during the attention
        return self.o(attention(q, k, v).reshape(b, n, -1))


class ImageTextCrossAttention(nn.Module):
    """Cross-attention to the text rows and, separately, to the CLIP image rows; summed."""

    def __init__(self, dim: int, heads: int, eps: float, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.heads = heads
        for name in ("q", "k", "v", "o", "k_img", "v_img"):
            setattr(self, name, ops.Linear(dim, dim, device=device, dtype=dtype))
        self.norm_q = RMSNorm(dim, eps, device)
        self.norm_k = RMSNorm(dim, eps, device)
        self.norm_k_img = RMSNorm(dim, eps, device)

    def forward(
        self,
        x: torch.Tensor,
        context_img: torch.Tensor,
        context_text: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1)
        k = self.norm_k(self.k(context_text)).view(b, -1, self.heads, q.shape[-1])
        v = self.v(context_text).view(b, -1, self.heads, q.shape[-1])
        out = attention(q, k, v)
        k = self.norm_k_img(self.k_img(context_img)).view(b, -1, self.heads, q.shape[-1])
        v = self.v_img(context_img).view(b, -1, self.heads, q.shape[-1])
        out.add_(attention(q, k, v))  # attention results are fresh tensors
        return self.o(out.reshape(b, n, -1))


class Block(_FloatParams):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: SteadyDancerConfig, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        dim = cfg.dim
        self.ffn_chunk_size: int | None = None  # tokens per FFN chunk; None = all at once
        self.norm1 = ops.LayerNorm(
            dim, eps=cfg.eps, elementwise_affine=False, device=device, dtype=torch.float32
        )
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, ops, device, dtype)
        self.norm3 = ops.LayerNorm(
            dim, eps=cfg.eps, elementwise_affine=True, device=device, dtype=torch.float32
        )
        self.cross_attn = ImageTextCrossAttention(dim, cfg.num_heads, cfg.eps, ops, device, dtype)
        self.norm2 = ops.LayerNorm(
            dim, eps=cfg.eps, elementwise_affine=False, device=device, dtype=torch.float32
        )
        self.ffn = nn.Sequential(
            ops.Linear(dim, cfg.ffn_dim, device=device, dtype=dtype),
            GeluTanh(),
            ops.Linear(cfg.ffn_dim, dim, device=device, dtype=dtype),
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim, device=device, dtype=torch.float32))

    def forward(
        self,
        x: torch.Tensor,
        *,
        e0: torch.Tensor,
        rope: torch.Tensor,
        context_img: torch.Tensor,
        context_text: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """x: float32 residual stream [B, L, dim] (updated in place and returned);
        e0: float32 [B, 6, dim] time modulation; contexts in the compute dtype."""
        dtype = context_text.dtype
        mod = _as_float(self.modulation, torch.float32, x.device) + e0
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(2).unbind(1)
        h = layer_norm_modulate(x, shift1, scale1, self.norm1.eps, dtype)
        # each residual update is done by the pass of the norm that follows it
        h = self._norm3(x, self.self_attn(h, rope, attention), gate1, dtype)
        y = self.cross_attn(h, context_img, context_text, attention)
        h = layer_norm_modulate(x, shift2, scale2, self.norm2.eps, dtype, add=y)
        del y
        return add_residual(x, self._ffn(h), gate2)

    def _norm3(self, x: torch.Tensor, add: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x += add * gate, then norm3(x) in `dtype` (one fused pass where the layer allows)."""
        norm = self.norm3
        if getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None):
            add_residual(x, add, gate)  # ComfyUI patches applied per call: the layer runs them
            return norm(x).to(dtype)
        weight = _as_float(norm.weight, torch.float32, x.device)
        bias = _as_float(norm.bias, torch.float32, x.device)
        return layer_norm_affine(x, weight, bias, norm.eps, dtype, add=add, gate=gate)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        chunk = self.ffn_chunk_size
        if chunk is None or chunk >= h.shape[1]:
            return self.ffn(h)
        out = torch.empty_like(h)
        for start in range(0, h.shape[1], chunk):
            out[:, start : start + chunk] = self.ffn(h[:, start : start + chunk])
        return out


class Head(_FloatParams):
    def __init__(self, cfg: SteadyDancerConfig, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.norm = ops.LayerNorm(
            cfg.dim, eps=cfg.eps, elementwise_affine=False, device=device, dtype=torch.float32
        )
        self.head = ops.Linear(
            cfg.dim, cfg.out_dim * math.prod(cfg.patch), device=device, dtype=dtype
        )
        self.modulation = nn.Parameter(
            torch.zeros(1, 2, cfg.dim, device=device, dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mod = _as_float(self.modulation, torch.float32, x.device) + e.unsqueeze(1)
        shift, scale = mod.unsqueeze(2).unbind(1)
        return self.head(layer_norm_modulate(x, shift, scale, self.norm.eps, dtype))


class ImageEmbedding(nn.Module):
    """CLIP features -> context rows: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, clip_dim: int, dim: int, ops: Any, device: Any, dtype: Any) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ops.LayerNorm(clip_dim, device=device, dtype=torch.float32),
            ops.Linear(clip_dim, clip_dim, device=device, dtype=dtype),
            nn.GELU(),
            ops.Linear(clip_dim, dim, device=device, dtype=dtype),
            ops.LayerNorm(dim, device=device, dtype=torch.float32),
        )

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = self.proj[0](x.float()).to(dtype)
        h = self.proj[3](self.proj[2](self.proj[1](h)))
        return self.proj[4](h.float()).to(dtype)


# ------------------------------------------------------------------------------- the model
class SteadyDancerDiT(nn.Module):
    """SteadyDancer's diffusion transformer.

    Call it with named tensors (B = batch, F latent frames, h x w latent size):
    x [B,16,F,h,w], t [B], text [B,L,text_dim] (L <= 512, zero-padded here to 512),
    clip_x and clip_c [B,257,clip_dim], y [B,20,F,h,w], pose [B,16,F,h,w],
    ref_x and ref_c [B,36,1,h,w]; it returns the prediction [B,16,F,h,w] in x's dtype.
    """

    def __init__(
        self,
        config: SteadyDancerConfig,
        *,
        operations: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attention: str | None = "auto",
    ) -> None:
        super().__init__()
        ops = operations or nn
        dtype = dtype or torch.float32
        cfg = config
        self.config = cfg
        self.compute_dtype = dtype
        self.attention: Callable[..., torch.Tensor] = AttentionDispatcher(attention)
        c = cfg.in_dim_c
        kw: dict[str, Any] = {"device": device, "dtype": dtype}

        self.patch_embedding = ops.Conv3d(cfg.in_dim, cfg.dim, cfg.patch, stride=cfg.patch, **kw)
        self.patch_embedding_fuse = ops.Conv3d(
            cfg.in_dim + 2 * c, cfg.dim, cfg.patch, stride=cfg.patch, **kw
        )
        self.patch_embedding_ref_c = ops.Conv3d(c, cfg.dim, cfg.patch, stride=cfg.patch, **kw)
        self.condition_embedding_spatial = DynamicConv1x1(c, ops, device, dtype)
        self.condition_embedding_temporal = nn.Sequential(
            *(m for _ in range(3) for m in (FactorConv3d(c, ops, device, dtype), nn.SiLU()))
        )
        self.condition_embedding_align = FrameAlignment(
            c, cfg.align_hidden, cfg.align_heads, ops, device, dtype
        )
        self.text_embedding = nn.Sequential(
            ops.Linear(cfg.text_dim, cfg.dim, **kw),
            nn.GELU(approximate="tanh"),
            ops.Linear(cfg.dim, cfg.dim, **kw),
        )
        self.time_embedding = nn.Sequential(
            ops.Linear(cfg.freq_dim, cfg.dim, **kw), nn.SiLU(), ops.Linear(cfg.dim, cfg.dim, **kw)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(cfg.dim, 6 * cfg.dim, **kw))
        self.blocks = nn.ModuleList([Block(cfg, ops, device, dtype) for _ in range(cfg.num_layers)])
        self.head = Head(cfg, ops, device, dtype)
        self.img_emb = ImageEmbedding(cfg.clip_dim, cfg.dim, ops, device, dtype)
        self._rope_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # --------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        clip_x: torch.Tensor,
        clip_c: torch.Tensor,
        y: torch.Tensor,
        pose: torch.Tensor,
        ref_x: torch.Tensor,
        ref_c: torch.Tensor,
        *,
        attention: AttentionFn | None = None,
        block_patches: Mapping[int, BlockPatch] | None = None,
    ) -> torch.Tensor:
        """The velocity prediction. `attention` ([B, L, H, D] in and out) replaces the model's
        own backend for this call: the ComfyUI glue passes ComfyUI's attention here.
        `block_patches` replaces blocks by index for this call (`run_blocks`): the ComfyUI glue
        passes ComfyUI's per-block patches (`patches_replace["dit"]`) here."""
        cfg, dtype = self.config, self.compute_dtype
        b, _, f, h, w = x.shape
        t, text, clip_x, clip_c, y, pose, ref_x, ref_c = self._check_inputs(
            x, t, text, clip_x, clip_c, y, pose, ref_x, ref_c
        )
        attention = attention or self.attention
        pt, ph, pw = cfg.patch
        grid = (f // pt, h // ph, w // pw)

        # pose path: temporal + spatial features, fused, then aligned to the noisy latent
        c, xd = pose.to(dtype), x.to(dtype)
        spatial = self.condition_embedding_spatial(_frames(c)).view(b, f, -1, h, w).transpose(1, 2)
        fused = c + self.condition_embedding_temporal(c) + spatial
        del spatial
        aligned = self.condition_embedding_align(fused, xd)

        # tokens: video frames (x, y, fused, aligned), then the two reference frames
        video = self.patch_embedding_fuse(torch.cat([xd, y.to(dtype), fused, aligned], dim=1))
        del fused, aligned
        refs = [
            self.patch_embedding(ref_x.to(dtype)),
            self.patch_embedding_ref_c(ref_c[:, : cfg.in_dim_c].to(dtype)),
        ]
        u = _token_sequence([video, *refs])  # float32 [B, (F+2)*h'*w', dim]
        del video, refs
        rope = self._rope(grid[0] + 2, grid[1], grid[2], u.device)  # reference frames at F, F+1

        # time and context
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(dtype))
        e0 = self.time_projection(e).float().unflatten(1, (6, cfg.dim))
        if text.shape[1] < cfg.text_len:  # zero rows take part in attention, as in the reference
            text = F.pad(text, (0, 0, 0, cfg.text_len - text.shape[1]))
        context_text = self.text_embedding(text.to(dtype))
        clip = self.img_emb(torch.cat([clip_x, clip_c]), dtype)
        context_img = clip[:b] + clip[b:]
        del clip

        u = self.run_blocks(
            u,
            block_patches,
            e0=e0,
            rope=rope,
            context_img=context_img,
            context_text=context_text,
            attention=attention,
        )

        # head on the video tokens only, then unpatchify
        n_video = math.prod(grid)
        out = self.head(u[:, :n_video], e.float(), dtype)
        return self._unpatchify(out, grid).to(x.dtype)

    def run_blocks(
        self, x: torch.Tensor, block_patches: Mapping[int, BlockPatch] | None = None, **block_kwargs: Any
    ) -> torch.Tensor:
        """The transformer blocks in order (the seam that block streaming wraps); a block
        with an entry in `block_patches` runs as `patch(block, x, block_kwargs)` instead."""
        for index, block in enumerate(self.blocks):
            patch = block_patches.get(index) if block_patches else None
            x = block(x, **block_kwargs) if patch is None else patch(block, x, block_kwargs)
        return x

    # --------------------------------------------------------------------------- pieces
    def _rope(self, f: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (f, h, w, str(device))
        if self._rope_cache is None or self._rope_cache[0] != key:
            self._rope_cache = (key, rope_table((f, h, w), self.config.head_dim, device))
        return self._rope_cache[1]

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, C*pt*ph*pw] -> [B, C, f*pt, h*ph, w*pw]."""
        b = out.shape[0]
        pt, ph, pw = self.config.patch
        out = out.view(b, *grid, pt, ph, pw, self.config.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, self.config.out_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def _check_inputs(
        self, x: torch.Tensor, t: torch.Tensor, *conds: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Validate shapes; broadcast batch-1 conditioning and a scalar t to the batch."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.out_dim:
            raise ConditioningError(f"x must be [B, {cfg.out_dim}, F, h, w], got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch
        if f % pt or h % ph or w % pw:
            raise ConditioningError(
                f"latent size {f}x{h}x{w} is not a multiple of the patch {cfg.patch}"
            )
        y_ch = cfg.in_dim - cfg.out_dim
        expected = {
            "text": (None, cfg.text_dim),
            "clip_x": (CLIP_TOKENS, cfg.clip_dim),
            "clip_c": (CLIP_TOKENS, cfg.clip_dim),
            "y": (y_ch, f, h, w),
            "pose": (cfg.in_dim_c, f, h, w),
            "ref_x": (cfg.in_dim, 1, h, w),
            "ref_c": (cfg.in_dim, 1, h, w),
        }
        out: list[torch.Tensor] = []
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() not in (1, b):
            raise ConditioningError(f"t must hold 1 or {b} timesteps, got {t.numel()}")
        out.append(t.expand(b))
        for (name, shape), value in zip(expected.items(), conds, strict=True):
            if not isinstance(value, torch.Tensor):
                raise ConditioningError(f"{name} is missing (got {type(value).__name__})")
            got = tuple(value.shape[1:])
            ok = len(got) == len(shape) and all(
                s is None or s == g for s, g in zip(shape, got, strict=True)
            )
            if not ok or value.shape[0] not in (1, b):
                want = ", ".join("L" if s is None else str(s) for s in shape)
                raise ConditioningError(
                    f"{name} must be [B, {want}] with B = {b} (or 1), got {tuple(value.shape)}"
                )
            out.append(value.expand(b, *value.shape[1:]) if value.shape[0] != b else value)
        return tuple(out)


def _token_sequence(grids: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B, dim, f_i, h, w] grids along time into one float32 [B, L, dim] sequence,
    written once into its final buffer."""
    b, dim = grids[0].shape[:2]
    sizes = [math.prod(g.shape[2:]) for g in grids]
    u = torch.empty(b, sum(sizes), dim, device=grids[0].device, dtype=torch.float32)
    start = 0
    for g, n in zip(grids, sizes, strict=True):
        u[:, start : start + n].copy_(g.flatten(2).transpose(1, 2))
        start += n
    return u


# ------------------------------------------------------------------------------- loading
def parameter_layout(
    config: SteadyDancerConfig, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every parameter of a DiT of `config` whose weights are `dtype`.

    Read off a model of plain torch.nn layers on the meta device (nothing is allocated), so it
    does not depend on the `operations` a caller builds with: ComfyUI's layers under dynamic
    VRAM create their weights only when the state dict is loaded.
    """
    template = SteadyDancerDiT(config, operations=nn, device="meta", dtype=dtype, attention=None)
    return {name: (tuple(p.shape), p.dtype) for name, p in template.named_parameters()}


def _check_names(sd: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if not (missing or unexpected):
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            more = " ..." if len(names) > 12 else ""
            parts.append(f"{len(names)} {label}: {', '.join(names[:12])}{more}")
    raise ModelFileError("the weights do not fit a SteadyDancer DiT: " + "; ".join(parts))


def load_model(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: str | None = "auto",
    operations: Any = None,
    num_heads: int | None = None,
    memory: str | int | None = None,
) -> SteadyDancerDiT:
    """A ready-to-run SteadyDancer DiT (eval mode, no gradients) from a file or a state dict.

    `source`: a .gguf (weights stay quantised; GGMLOps layers are used), a .safetensors
    (bf16/fp16/fp32, or fp8 with per-tensor scales, dequantised to `dtype`) or a state dict
    (names may carry a prefix; GGMLTensors in it stay packed). `dtype` is the compute dtype
    and the dtype of float weights. `attention`: a backend name of steadydancer.attention or
    "auto". The model is built without allocating weights first, then takes the tensors of
    the state dict as they are (no second copy). `memory` (issue 7, `steadydancer.streaming`):
    None/"full" puts everything on `device`; "auto" or a number of resident blocks keeps the
    other blocks packed in pinned host memory and streams them in per forward.
    """
    from .gguf.ops import GGMLLayer, GGMLOps
    from .quantized import is_quantized
    from .streaming import enable_streaming, parse_memory_option
    from .weights import load_weights

    streaming = parse_memory_option(memory) != "full"
    place = torch.device("cpu") if streaming else device  # streamed weights stay on the host

    if isinstance(source, Mapping):  # a file's tensors are checked where it was read, others here
        sd = checked_state_dict(source, "the state dict")
    else:
        sd = load_weights(source, dtype=dtype)
    config = config_from_state_dict(sd, num_heads=num_heads)
    quantised = any(is_quantized(v) for v in sd.values())
    if operations is None:
        operations = GGMLOps if quantised else nn
    expected = parameter_layout(config, dtype)
    _check_names(sd, expected)
    model = SteadyDancerDiT(
        config, operations=operations, device="meta", dtype=dtype, attention=attention
    )
    model.requires_grad_(False)
    # Only layers of the quantised operations expand compact weights per forward pass; a compact
    # tensor anywhere else (a plain parameter, a layer of the pose path) is expanded here, once.
    expands = {
        f"{module_name}.{param}".lstrip(".")
        for module_name, module in model.named_modules()
        if isinstance(module, GGMLLayer)
        for param in module._param_names
    }
    ready: dict[str, torch.Tensor] = {}
    for name, value in sd.items():
        shape, target_dtype = expected[name]
        if tuple(value.shape) != shape:
            raise ModelFileError(
                f"{name} has shape {tuple(value.shape)}, the model (read from the other tensors) expects {shape}"
            )
        if is_quantized(value) and name in expands:
            ready[name] = value
        elif is_quantized(value):
            ready[name] = value.dequantize(target_dtype, place)
        elif value.is_floating_point():
            ready[name] = value.to(device=place, dtype=target_dtype)  # the same tensor when it fits
        else:
            raise ModelFileError(f"{name} holds {value.dtype} values; a float tensor was expected")
    model.load_state_dict(ready, strict=True, assign=True)
    if streaming:
        enable_streaming(model, device, memory)
    else:
        model.to(device)
    return model.eval()
